"""Counters of a label set that do not go back when its cgroup is replaced.

A series is a label set: {namespace, pod, container, node} (+ the point's own attributes).
Several cgroups can stand behind one label set over time: a container that restarts gets a
new cgroup, and its counters start from 0 there.  What a user sees, per label set:

1. While the old cgroup is gone but retained (kpod.cgroup.gone_retention), its final counts
   are reported with it: the label set shows old final + new (the pipeline sums the points of
   one label set, kpod.model.merge_duplicates).
   eBPF counters of a removed cgroup stay in the kernel, so these are exact; counters read
   from cgroup files (cpu usage, io) cannot be read once the cgroup is removed, so the last
   values read before (up to one cycle old) stand in for them.
2. When the old cgroup is let go, its last values become a carried offset of the label set:
   the series keeps showing old final + new, for as long as the pod exists (in Kubernetes
   modes; locally: as long as some live cgroup has that label set, or gone_retention after
   the last one).  A pod between two restarts still shows its carried value.
3. When the pod is gone for gone_retention, its carried offsets go, and so do its series.

So counters per pod and container never decrease within the agent's run: the sum of a label
set's cgroups, past ones included.  After an agent restart everything starts over, which
Prometheus reads as a counter reset.  Only counters and histograms are carried; gauges of a
gone cgroup simply disappear.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kpod.model import CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource, sum_values

OTEL_CONTAINER_ID = "container.id"
OTEL_POD_UID = "k8s.pod.uid"

SeriesKey = tuple[MetricDef, Any, Any]  # (metric, attributes, resource labels)
CUMULATIVE = (Kind.COUNTER, Kind.HISTOGRAM)


@dataclass(slots=True)
class _Last:
    """One series of one cgroup as last seen: enough to report it again or carry it."""

    metric: MetricDef
    attributes: Any
    resource: Resource
    value: float | HistogramValue
    start_time_ns: int


@dataclass(slots=True)
class _Carry:
    metric: MetricDef
    attributes: Any
    resource: Resource
    value: float | HistogramValue
    start_time_ns: int
    pod_uid: str
    seen: float  # monotonic: last time a cgroup with this label set was live


def _pod_uid(resource: Resource) -> str:
    return next((v for k, v in resource.otel if k == OTEL_POD_UID), "")


def _without_container_id(resource: Resource) -> Resource:
    # The point then stands for several container instances: no single container.id.
    return Resource(resource.labels, tuple(item for item in resource.otel if item[0] != OTEL_CONTAINER_ID))


class Continuity:
    """Per cycle, on the resolved points: `remember`, then `add_carried` (the pipeline then sums
    the points of each label set)."""

    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        # cgroup id -> its cumulative series as last seen (live cgroups and retained gone ones).
        self._last: dict[int, dict[tuple[MetricDef, Any], _Last]] = {}
        self._gone_paths: dict[int, str] = {}
        self._carry: dict[SeriesKey, _Carry] = {}

    def status(self) -> dict[str, int]:
        return {"cgroups_remembered": len(self._last), "carried_series": len(self._carry)}

    def remember(self, points: list[Point], live: set[int], gone: dict[int, str], now: float) -> list[Point]:
        """Remember this cycle's cumulative series per cgroup; report again the series a gone
        (retained) cgroup no longer has in the batch; carry the last values of cgroups the
        index let go (neither `live` nor in `gone`, id -> path).  Returns the points to merge."""
        seen: dict[int, dict[tuple[MetricDef, Any], _Last]] = {}
        for point in points:
            cgroup, resource = point.cgroup, point.resource
            if cgroup is None or resource is None or point.metric.kind not in CUMULATIVE:
                continue
            series = seen.get(cgroup.id)
            if series is None:
                series = seen[cgroup.id] = {}
            series[(point.metric, point.attributes)] = _Last(
                point.metric, point.attributes, resource, point.value, point.start_time_ns
            )
        out = points
        for cgroup_id, last in self._last.items():
            if cgroup_id in live:
                continue  # live: its receivers report it (or skipped it this cycle)
            if cgroup_id not in gone:
                self._fold(last.values(), now)  # let go by the index
                continue
            # Retained, gone: what its receivers can no longer read (cgroup files), last values stand.
            now_seen = seen.setdefault(cgroup_id, {})
            ref = None
            for key, s in last.items():
                if key in now_seen:
                    continue
                if ref is None:
                    ref = CgroupRef(cgroup_id, gone[cgroup_id], gone=True)
                if out is points:
                    out = list(points)
                out.append(Point(s.metric, ref, s.attributes, s.value, s.resource, s.start_time_ns))
                now_seen[key] = s
        self._last = {i: series for i, series in seen.items() if i in live or i in gone}
        return out

    def _fold(self, series: Any, now: float) -> None:
        for s in series:
            key = (s.metric, s.attributes, s.resource.labels)
            carry = self._carry.get(key)
            if carry is None:
                self._carry[key] = _Carry(
                    s.metric, s.attributes, s.resource, s.value, s.start_time_ns, _pod_uid(s.resource), now
                )
                continue
            total = sum_values(carry.value, s.value)
            if total is not None:
                carry.value = total
                starts = [t for t in (carry.start_time_ns, s.start_time_ns) if t]
                carry.start_time_ns = min(starts) if starts else 0

    def add_carried(self, points: list[Point], now: float, pod_exists: Callable[[str], bool] | None) -> list[Point]:
        """Add each label set's carried offset to one of its points (the pipeline sums them
        all), or report the offset alone for a label set with no cgroup now; drop offsets of
        pods gone for longer than the retention."""
        if not self._carry:
            return points
        used: set[SeriesKey] = set()
        for point in points:  # a live cgroup keeps its label set's offset
            if point.resource is not None and point.cgroup is not None and not point.cgroup.gone:
                carry = self._carry.get((point.metric, point.attributes, point.resource.labels))
                if carry is not None:
                    carry.seen = now
        for index, point in enumerate(points):
            if point.resource is None or point.metric.kind not in CUMULATIVE:
                continue
            key = (point.metric, point.attributes, point.resource.labels)
            carry = self._carry.get(key)
            if carry is None or key in used:
                continue
            used.add(key)
            total = sum_values(point.value, carry.value)
            if total is None:
                continue
            starts = [t for t in (point.start_time_ns, carry.start_time_ns) if t]
            points[index] = Point(
                point.metric,
                point.cgroup,
                point.attributes,
                total,
                _without_container_id(point.resource),
                min(starts) if starts else 0,
            )
        expired: list[SeriesKey] = []
        for key, carry in self._carry.items():
            if key in used:
                continue
            if pod_exists is not None and carry.pod_uid and pod_exists(carry.pod_uid):
                carry.seen = now
            if now - carry.seen >= self.retention_s:
                expired.append(key)
                continue
            points.append(
                Point(
                    carry.metric,
                    None,
                    carry.attributes,
                    carry.value,
                    _without_container_id(carry.resource),
                    carry.start_time_ns,
                )
            )
        for key in expired:
            del self._carry[key]
        return points
