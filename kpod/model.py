"""The data model that flows through the pipeline.

It mirrors the OpenTelemetry metrics data model (a monotonic cumulative Sum, a Gauge, an
explicit-bucket Histogram) but stays a few slotted classes, because kernel data arrives
pre-aggregated: a receiver reads cumulative counters and histogram bucket counts from BPF maps or
cgroup files and hands them over as they are.  Nothing here goes through the OTel metrics API
(it has no asynchronous histogram); the OTLP exporter converts these points to the SDK's
data classes only when it is configured.

A batch is a full snapshot: every cycle each receiver emits the current value of every series
it knows.  A series whose cgroup disappeared is simply absent from the next batch, so the
exporters never have to expire anything.
"""

from __future__ import annotations

import enum
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import compress, pairwise

# Attribute tuples are sorted (key, value) pairs: hashable, cheap to compare, and the order
# in which labels are rendered.
Attributes = tuple[tuple[str, str], ...]

NO_ATTRIBUTES: Attributes = ()


def attributes(**items: str) -> Attributes:
    """Build a sorted attribute tuple from keyword arguments."""
    return tuple(sorted(items.items()))


class Kind(enum.Enum):
    COUNTER = "counter"  # OTel Sum, monotonic, cumulative temporality
    GAUGE = "gauge"  # OTel Gauge
    HISTOGRAM = "histogram"  # OTel explicit-bucket Histogram, cumulative


# eq=False: a metric definition is a module-level constant, compared by identity; that keeps
# its hash (computed for every point in every cycle) as cheap as an object's.
@dataclass(frozen=True, slots=True, eq=False)
class MetricDef:
    """What a metric is: one definition per metric, owned by the receiver that emits it.

    `name` is the spec's dotted name (kpod.cpu.runqueue.latency); `unit` is UCUM
    ("s", "By", "1"); `attribute_keys` are the point's own attributes (syscall, device, ...),
    not the Kubernetes ones, which the enrichment processor adds as a Resource.
    """

    name: str
    kind: Kind
    unit: str
    description: str
    attribute_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CgroupRef:
    """The identity of a cgroup: its cgroup2 id (the directory's inode) and path.

    `path` is relative to the cgroup2 mount and starts with "/" ("/" is the root).  It is empty
    when the receiver saw only an id that no longer resolves.  `gone`: the cgroup was removed
    and is still retained (kpod.cgroup.index): its points are its final counts.
    """

    id: int
    path: str
    gone: bool = False


@dataclass(frozen=True, slots=True)
class Resource:
    """Who a point belongs to, set by the enrichment processor.

    `labels` are the Prometheus labels (namespace, pod, container, node, optional label_*);
    `otel` are the OpenTelemetry resource attributes (k8s.pod.name, container.id, ...).
    Resources are shared by every point of a cgroup, so they are built once per cgroup.
    """

    labels: Attributes
    otel: Attributes = NO_ATTRIBUTES


@dataclass(frozen=True, slots=True)
class HistogramValue:
    """Bucket counts as the kernel aggregated them.

    `bounds` are the explicit upper bounds (OTel semantics: bucket i counts values in
    (bounds[i-1], bounds[i]]; the last bucket, one longer than bounds, is (bounds[-1], +inf)).
    `counts` are per-bucket, not cumulative; `count` == sum(counts).
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        return sum(self.counts)


def base2_exponent(bounds: tuple[float, ...]) -> int | None:
    """e when `bounds` are consecutive powers of two from 2^e (2^e, 2^(e+1), ...), else None.

    Such a histogram (the kernel's, bpf/kpod.bpf.h) is exactly a Prometheus native histogram of
    schema 0 and an OpenTelemetry exponential histogram of scale 0: its first bucket is the zero
    bucket (threshold 2^e), bucket k >= 1 is (2^(e+k-1), 2^(e+k)], and the +Inf bucket has no
    counterpart (exporters count it in the bucket above the last bound).
    """
    if len(bounds) < 2 or not bounds[0] > 0:
        return None
    mantissa, exponent = math.frexp(bounds[0])
    if mantissa != 0.5:
        return None
    for low, high in pairwise(bounds):
        if high != 2 * low:
            return None
    return exponent - 1


@dataclass(slots=True)
class Point:
    """One data point of one metric for one cgroup (or for the agent itself, cgroup None)."""

    metric: MetricDef
    cgroup: CgroupRef | None
    attributes: Attributes
    value: float | HistogramValue
    resource: Resource | None = None
    start_time_ns: int = 0


@dataclass(slots=True)
class Batch:
    """The points of one collection cycle, in emission order."""

    points: list[Point] = field(default_factory=list)
    time_ns: int = field(default_factory=time.time_ns)

    def add(self, point: Point) -> None:
        self.points.append(point)

    def extend(self, points: Iterable[Point]) -> None:
        self.points.extend(points)

    def __iter__(self) -> Iterator[Point]:
        return iter(self.points)

    def __len__(self) -> int:
        return len(self.points)

    def copy(self) -> Batch:
        """A copy whose point list and points can be changed without touching this one."""
        return Batch(
            points=[
                Point(p.metric, p.cgroup, p.attributes, p.value, p.resource, p.start_time_ns)
                for p in self.points
            ],
            time_ns=self.time_ns,
        )


# --------------------------------------------------------------------------- one point per series


def sum_values(a: float | HistogramValue, b: float | HistogramValue) -> float | HistogramValue | None:
    """a + b for two points of one series: numbers added, histograms bucket by bucket (and their
    sums); None when they cannot be added (a histogram and a number, or different bounds)."""
    if isinstance(a, HistogramValue) and isinstance(b, HistogramValue):
        if a.bounds != b.bounds:
            return None
        width = max(len(a.counts), len(b.counts))
        counts = tuple(
            (a.counts[i] if i < len(a.counts) else 0) + (b.counts[i] if i < len(b.counts) else 0) for i in range(width)
        )
        return HistogramValue(a.bounds, counts, a.sum + b.sum)
    if isinstance(a, HistogramValue) or isinstance(b, HistogramValue):
        return None
    return a + b


def merge_duplicates(points: list[Point]) -> list[Point]:
    """One point per series, in first-seen order.

    Several cgroups can end up with one label set: a pod's sandbox, CRI-O's conmon and the pod
    level are all container="" of their pod (the pod's overhead), and without Kubernetes labels
    every cgroup has the same.  Two series with one label set would break the Prometheus
    exposition, so points that share metric, attributes and resource labels are merged: their
    values are summed (sum_values), the earliest start time is kept, and so are the OTel
    resource attributes they all share (a merged point stands for several containers: no single
    container.id).  A point whose value cannot be added to the first one's is left out.
    The pipeline applies this once per cycle, after the processors: the one place it happens
    (through a SeriesMerger, which finds the duplicates again only when the batch's series
    changed).
    """
    return _merge(points, _duplicates(points))


class SeriesMerger:
    """merge_duplicates, cycle after cycle: a batch whose points are the last one's series in
    the same order (metrics, attributes and resources compared as lists, in C: the same objects
    cycle after cycle) has its duplicates at the same places, so they are not looked for again
    (a dict operation per point, the Python loop of _duplicates).  Values are merged anew."""

    __slots__ = ("_plan", "_series")

    def __init__(self) -> None:
        self._series: tuple[list[MetricDef], list[Attributes], list[Resource | None]] | None = None
        self._plan: _Plan = None

    def __call__(self, points: list[Point]) -> list[Point]:
        # Comprehensions, not map(attrgetter): an attribute read in a comprehension is the
        # interpreter's specialised slot read, about half the cost of attrgetter's.
        series = (
            [point.metric for point in points],
            [point.attributes for point in points],
            [point.resource for point in points],
        )
        if series != self._series:
            self._plan = _duplicates(points)
        self._series = series
        return _merge(points, self._plan)


# (each later point of a series with its first point's index, whether each point is the first
# of its series); None when every point is.
_Plan = tuple[list[tuple[int, int]], list[bool]] | None


def _duplicates(points: list[Point]) -> _Plan:
    """Where the points of one series are: see merge_duplicates."""
    # A series is (metric, attributes, label set).  A label set is numbered once per run of
    # points with one Resource (a cgroup's points come one after another), so that a point's key
    # hashes a small int instead of the label tuple.
    label_sets: dict[Attributes | None, int] = {}
    run: object = False  # no point has this resource: the first point starts a run
    label_set = 0
    seen: dict[tuple[MetricDef, Attributes, int], int] = {}
    first_seen = seen.setdefault
    later: list[tuple[int, int]] = []
    for index, point in enumerate(points):
        resource = point.resource
        if resource is not run:
            run = resource
            labels = resource.labels if resource is not None else None
            label_set = label_sets.setdefault(labels, len(label_sets))
        first = first_seen((point.metric, point.attributes, label_set), index)
        if first != index:
            later.append((index, first))
    if not later:
        return None
    firsts = [True] * len(points)
    for index, _ in later:
        firsts[index] = False
    return later, firsts


def _merge(points: list[Point], plan: _Plan) -> list[Point]:
    """The points with each series' later points merged into its first (see merge_duplicates)."""
    if plan is None:
        return list(points)
    later, firsts = plan
    out = list(points)
    for index, at in later:
        point, first = points[index], out[at]
        value = sum_values(first.value, point.value)
        if value is None:
            continue
        resource = point.resource
        merged = first.resource
        if merged is not None and resource is not None and merged.otel != resource.otel:
            shared = set(resource.otel)
            merged = Resource(merged.labels, tuple(item for item in merged.otel if item in shared))
        starts = [t for t in (first.start_time_ns, point.start_time_ns) if t]
        out[at] = Point(first.metric, first.cgroup, first.attributes, value, merged, min(starts) if starts else 0)
    return list(compress(out, firsts))
