"""Each series' encoded labels, kept across cycles for the exposition renderers.

A renderer looks up the labels of every point of every cycle (some 37,000 for a 110-pod node), so
the lookup is two dict hits on objects whose hashes are cached: the id of the point's resource,
then its attributes.  The label text (or protobuf LabelPairs) is made once per resource and
attribute set and is the same object every cycle, so the renderer's own dicts keyed by it find
it by identity.  When a processor hands over a new Resource object with the same labels (a pod
updated, a resource rebuilt), its label text is found by the labels themselves, and every series
of it keeps its cached bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import compress, repeat
from operator import is_, itemgetter
from typing import Generic, TypeVar

from kpod.model import Attributes, Batch, HistogramValue, MetricDef, Point, Resource

L = TypeVar("L", str, bytes)  # a renderer's encoding of labels

# (resource, its encoded labels, {attributes: the series' encoded labels})
Head = tuple[Resource, L, dict[Attributes, L]]


class LabelCache(Generic[L]):
    """plan() reads `heads` inline (the fast path); a renderer calls prune() once per render,
    so that resources of gone cgroups do not pile up."""

    def __init__(self, encode: Callable[[Iterable[tuple[str, str]]], L], join: Callable[[L, L], L]) -> None:
        self._encode = encode
        self._join = join
        # id(resource) -> Head; the resource is kept so that the id stays unique.
        self.heads: dict[int, Head[L]] = {}
        # resource.labels -> (encoded labels, {attributes: the series' encoded labels}), shared by
        # every resource with those labels.
        self._by_labels: dict[Attributes, tuple[L, dict[Attributes, L]]] = {}
        self._tails: dict[Attributes, L] = {}

    def head(self, resource: Resource) -> Head[L]:
        shared = self._by_labels.get(resource.labels)
        if shared is None:
            shared = self._by_labels[resource.labels] = (self._encode(resource.labels), {})
        head = self.heads[id(resource)] = (resource, *shared)
        return head

    def joined(self, head: Head[L], attrs: Attributes) -> L:
        joined = head[2][attrs] = self._join(head[1], self._tail(attrs))
        return joined

    def _tail(self, attrs: Attributes) -> L:
        tail = self._tails.get(attrs)
        if tail is None:
            tail = self._tails[attrs] = self._encode(attrs)
        return tail

    def bare(self, point: Point) -> L:
        """The labels of a point without a resource (no enrichment processor in the pipeline):
        the cgroup names it, so that series stay apart."""
        cgroup = point.cgroup
        head = self._encode((("cgroup", cgroup.path or str(cgroup.id)),) if cgroup is not None else ())
        return self._join(head, self._tail(point.attributes)) if point.attributes else head

    def prune(self, batch: Batch, series: int) -> None:
        """Forget the resources a batch of `series` series did not use, once they outnumber it.
        Resources of gone cgroups (and the ones k8sattributes replaces when pods change) would
        otherwise pile up, ~1 KiB each: measured as the agent's RSS creeping by 4.47 MiB over
        1500 pod churn cycles (docs/perf/readings/soak.md).  One pass over the points, once in a
        while."""
        if len(self.heads) > series // 4 + 256:
            used = {id(point.resource) for point in batch.points if point.resource is not None}
            self.heads = {key: head for key, head in self.heads.items() if key in used}
            self._by_labels = {head[0].labels: (head[1], head[2]) for head in self.heads.values()}
        if len(self.heads) > 4 * series + 1000 or len(self._tails) > 4 * series + 1000:
            self.heads.clear()  # resources of gone cgroups
            self._by_labels.clear()
            self._tails.clear()


# A family's series, in first-seen order: their encoded labels, and what takes their values (a
# tuple) out of the list of the batch's values.
Take = Callable[[list[object]], tuple[object, ...]]
Plan = dict[MetricDef, tuple[list[L], Take]]


class Grouping(Generic[L]):
    """The batch's values by metric, each family's series with their encoded labels, cycle after
    cycle: the first point of a series is the one rendered.  The pipeline hands over one point per
    series (kpod.model.merge_duplicates adds up a pod's sandbox and pod-level cgroups, which share
    one label set); should a batch repeat a series anyway, Prometheus would reject a scrape that
    repeats it.

    Which point is which family's which series depends only on the points' metrics, attributes
    and label owners (the resource, or the cgroup of a point without one), and these are the same,
    in the same order, cycle after cycle while no pod comes or goes.  They are compared as lists
    (in C: the same objects cycle after cycle), and only when they changed is the batch planned
    again point by point (plan()); otherwise the values are taken out of the batch by position, in
    C.  A new Resource object with the same labels and OTel attributes compares equal: its labels
    are the same text."""

    __slots__ = ("_cache", "_plan", "_positions", "_series")

    def __init__(self, cache: LabelCache[L]) -> None:
        self._cache = cache
        self._series: tuple[list[object], ...] | None = None
        self._plan: Plan[L] = {}
        # 0, 1, 2, ...: each int made once (enumerate() makes one per point past 256, per plan).
        self._positions: list[int] = []

    def __call__(self, batch: Batch) -> dict[MetricDef, tuple[list[L], tuple[float | HistogramValue, ...]]]:
        points = batch.points
        series = _series(points)
        if series != self._series:
            if len(self._positions) < len(points):
                self._positions.extend(range(len(self._positions), len(points)))
            self._plan = plan(points, self._cache, self._positions)
        self._series = series
        values = [point.value for point in points]
        return {metric: (labels, take(values)) for metric, (labels, take) in self._plan.items()}  # type: ignore[misc]


def _series(points: list[Point]) -> tuple[list[object], ...]:
    """What the labels of the batch's series depend on: each point's resource, metric and
    attributes, and the cgroups of the points without a resource (LabelCache.bare)."""
    # Comprehensions, not map(attrgetter): an attribute read in a comprehension is the
    # interpreter's specialised slot read, about half the cost of attrgetter's.
    resources = [point.resource for point in points]
    bare = compress(points, map(is_, resources, repeat(None)))
    return (
        resources,
        [point.metric for point in points],
        [point.attributes for point in points],
        [point.cgroup for point in bare],
    )


def plan(points: list[Point], cache: LabelCache[L], positions: Iterable[int]) -> Plan[L]:
    """Each family's series (the first point of each label set, see Grouping), point by point
    (`positions`: 0, 1, 2, ...).  This runs over every point each time the batch's series
    changed: the label lookup is written out here."""
    heads_get = cache.heads.get
    grouped: dict[MetricDef, dict[L, int]] = {}
    grouped_get = grouped.get
    # A receiver emits a cgroup's points one after the other: the labels of their resource are
    # looked up once per run of points.
    last: Resource | None = None
    head: Head[L] | None = None
    joined_get: Callable[[Attributes], L | None] = {}.get
    for index, point in zip(positions, points, strict=False):  # positions may be longer
        resource = point.resource
        if resource is not last:
            last = resource
            if resource is None:
                head = None
            else:
                head = heads_get(id(resource))
                if head is None or head[0] is not resource:
                    head = cache.head(resource)
                joined_get = head[2].get
        attrs = point.attributes
        if head is None:
            labels = cache.bare(point)
        elif attrs:
            found = joined_get(attrs)
            labels = found if found is not None else cache.joined(head, attrs)
        else:
            labels = head[1]
        family = grouped_get(point.metric)
        if family is None:
            family = grouped[point.metric] = {}
        family.setdefault(labels, index)
    return {metric: (list(family), _take(list(family.values()))) for metric, family in grouped.items()}


def _take(indexes: list[int]) -> Take:
    """What takes the values at `indexes` out of a list, as a tuple."""
    if len(indexes) == 1:
        only = indexes[0]
        return lambda values: (values[only],)
    return itemgetter(*indexes)  # type: ignore[return-value]
