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

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any

from kpod.model import CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource, sum_values

OTEL_CONTAINER_ID = "container.id"
OTEL_POD_UID = "k8s.pod.uid"

CUMULATIVE = (Kind.COUNTER, Kind.HISTOGRAM)


@dataclass(slots=True, eq=False)
class _Carry:
    metric: MetricDef
    attributes: Any
    resource: Resource  # without container.id: the offset stands for several containers
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
    the points of each label set).

    Nothing is done per point while cgroups stay: the cycle's point list is kept as it is, and
    only when a cgroup stops being live are its series looked up in the list of the cycle before.
    """

    def __init__(self, retention_s: float) -> None:
        self.retention_s = retention_s
        # The last cycle's points (a copy of the list, the points themselves are never changed)
        # and the cgroups that were live or retained then.
        self._previous: list[Point] = []
        self._previous_ids: set[int] = set()
        # Gone (retained) cgroups: their cumulative series as last seen, by (metric, attributes).
        self._gone: dict[int, dict[tuple[MetricDef, Any], Point]] = {}
        # Carried offsets by label set (resource labels), then by (metric, attributes).
        self._carry: dict[Any, dict[tuple[MetricDef, Any], _Carry]] = {}

    def status(self) -> dict[str, int]:
        return {
            "cgroups_remembered": len(self._previous_ids),
            "carried_series": sum(len(series) for series in self._carry.values()),
        }

    def remember(self, points: list[Point], live: set[int], gone: dict[int, str], now: float) -> list[Point]:
        """Remember this cycle's points; report again the cumulative series a gone (retained)
        cgroup no longer has in the batch; carry the last values of cgroups the index let go
        (neither `live` nor in `gone`, id -> path).  Returns the points to merge."""
        # Cgroups live (or gone without being tracked yet) last cycle and not live now: their
        # series as the last cycle had them.
        left = self._previous_ids - live
        left.difference_update(self._gone)
        if left:
            last = _series_of(self._previous, left)
            for cgroup_id in left:
                series = last.get(cgroup_id, {})
                if cgroup_id in gone:
                    self._gone[cgroup_id] = series
                else:
                    self._fold(series.values(), now)  # let go by the index
        out = points
        if self._gone:
            current = _series_of(points, self._gone.keys())  # eBPF counters of gone cgroups go on
            for cgroup_id, series in list(self._gone.items()):
                if cgroup_id in live or cgroup_id not in gone:
                    del self._gone[cgroup_id]
                    if cgroup_id not in live:
                        self._fold(series.values(), now)  # let go by the index
                    continue
                # Retained, gone: what its receivers can no longer read (cgroup files), last values stand.
                seen = current.get(cgroup_id, {})
                ref = None
                for key, s in series.items():
                    if key in seen:
                        continue
                    if ref is None:
                        ref = CgroupRef(cgroup_id, gone[cgroup_id], gone=True)
                    if out is points:
                        out = list(points)
                    out.append(Point(s.metric, ref, s.attributes, s.value, s.resource, s.start_time_ns))
                series.update(seen)
        self._previous = points[:]  # the caller goes on changing its list (add_carried)
        self._previous_ids = set(live)
        self._previous_ids.update(gone)
        return out

    def _fold(self, series: Iterable[Point], now: float) -> None:
        for s in series:
            if s.resource is None:
                continue
            mine = self._carry.setdefault(s.resource.labels, {})
            key = (s.metric, s.attributes)
            carry = mine.get(key)
            if carry is None:
                resource = _without_container_id(s.resource)
                mine[key] = _Carry(s.metric, s.attributes, resource, s.value, s.start_time_ns, _pod_uid(resource), now)
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
        carried = self._carry
        if not carried:
            return points
        used: set[_Carry] = set()
        # A cgroup's points come one after another with one Resource: its label set is looked
        # up once per run of points, a point's own series only when the label set has offsets.
        run: Resource | None = None
        mine: dict[tuple[MetricDef, Any], _Carry] | None = None
        for index, point in enumerate(points):
            resource = point.resource
            if resource is not run:
                run = resource
                mine = carried.get(resource.labels) if resource is not None else None
            if mine is None:
                continue
            carry = mine.get((point.metric, point.attributes))
            if carry is None:
                continue
            if point.cgroup is not None and not point.cgroup.gone:
                carry.seen = now  # a live cgroup keeps its label set's offset
            if carry in used:
                continue
            used.add(carry)
            total = sum_values(point.value, carry.value)
            if total is None:
                continue
            starts = [t for t in (point.start_time_ns, carry.start_time_ns) if t]
            points[index] = Point(
                point.metric, point.cgroup, point.attributes, total, carry.resource, min(starts) if starts else 0
            )
        for labels, mine in list(carried.items()):
            for key, carry in list(mine.items()):
                if carry in used:
                    continue
                if pod_exists is not None and carry.pod_uid and pod_exists(carry.pod_uid):
                    carry.seen = now
                if now - carry.seen >= self.retention_s:
                    del mine[key]
                    continue
                points.append(
                    Point(carry.metric, None, carry.attributes, carry.value, carry.resource, carry.start_time_ns)
                )
            if not mine:
                del carried[labels]
        return points


def _series_of(points: list[Point], ids: Collection[int]) -> dict[int, dict[tuple[MetricDef, Any], Point]]:
    """The cumulative series of the cgroups `ids` among `points`, by cgroup (the last point of a
    series wins)."""
    out: dict[int, dict[tuple[MetricDef, Any], Point]] = {}
    run: CgroupRef | None = None
    series: dict[tuple[MetricDef, Any], Point] | None = None
    for point in points:
        cgroup = point.cgroup
        if cgroup is not run:
            run = cgroup
            series = out.setdefault(cgroup.id, {}) if cgroup is not None and cgroup.id in ids else None
        if series is not None and point.resource is not None and point.metric.kind in CUMULATIVE:
            series[(point.metric, point.attributes)] = point
    return out
