"""The one rule for points of one series (kpod.model.merge_duplicates), which the pipeline
applies once per cycle after the processors."""

from __future__ import annotations

import random

from kpod.model import (
    CgroupRef,
    HistogramValue,
    Kind,
    MetricDef,
    Point,
    Resource,
    SeriesMerger,
    merge_duplicates,
    sum_values,
)

SWITCHES = MetricDef("kpod.cpu.context.switches", Kind.COUNTER, "1", "Switches.")
MEMORY = MetricDef("kpod.mem.usage.bytes", Kind.GAUGE, "By", "Memory.")
LATENCY = MetricDef("kpod.cpu.runqueue.latency", Kind.HISTOGRAM, "s", "Latency.")
POD = (("container", ""), ("namespace", "a"), ("node", "n"), ("pod", "b"))
SANDBOX = Resource(POD, (("container.id", "sandbox-id"), ("k8s.pod.name", "b"), ("k8s.pod.uid", "u")))
POD_LEVEL = Resource(POD, (("k8s.pod.name", "b"), ("k8s.pod.uid", "u")))


def point(metric: MetricDef, cgroup: int, value: float | HistogramValue, resource: Resource | None = SANDBOX,
          attributes: tuple[tuple[str, str], ...] = (), start: int = 0) -> Point:  # fmt: skip
    return Point(metric, CgroupRef(cgroup, f"/c{cgroup}"), attributes, value, resource, start)


def test_sandbox_and_pod_level_cgroups_become_one_summed_series() -> None:
    merged = merge_duplicates(
        [
            point(SWITCHES, 1, 3, SANDBOX, start=200),
            point(MEMORY, 1, 100.0, SANDBOX),
            point(LATENCY, 1, HistogramValue((1.0, 2.0), (1, 0, 2), 5.0), SANDBOX),
            point(SWITCHES, 2, 4, POD_LEVEL, start=100),
            point(MEMORY, 2, 50.0, POD_LEVEL),
            point(LATENCY, 2, HistogramValue((1.0, 2.0), (0, 3, 1), 7.0), POD_LEVEL),
        ]
    )
    assert [(p.metric, p.value) for p in merged] == [
        (SWITCHES, 7),  # counters summed
        (MEMORY, 150.0),  # gauges too: the pod's overhead is what its cgroups hold together
        (LATENCY, HistogramValue((1.0, 2.0), (1, 3, 3), 12.0)),  # bucket by bucket, and the sums
    ]
    assert merged[0].start_time_ns == 100  # the earliest start
    # Several cgroups: no single container.id; the attributes they share stay.
    assert {p.resource for p in merged} == {Resource(POD, (("k8s.pod.name", "b"), ("k8s.pod.uid", "u")))}
    assert merged[0].cgroup == CgroupRef(1, "/c1")  # the first point's place and cgroup


def test_other_series_stay_apart_in_first_seen_order() -> None:
    other_pod = Resource((("container", ""), ("namespace", "a"), ("node", "n"), ("pod", "c")))
    points = [
        point(SWITCHES, 1, 1, SANDBOX, (("direction", "in"),)),
        point(SWITCHES, 2, 2, other_pod, (("direction", "in"),)),
        point(SWITCHES, 1, 3, SANDBOX, (("direction", "out"),)),
        point(MEMORY, 1, 4.0, SANDBOX, (("direction", "in"),)),
        point(SWITCHES, 3, 5, None),
        point(SWITCHES, 4, 6, None),  # no labels at all (no k8sattributes): one series too
    ]
    merged = merge_duplicates(points)
    assert [p.value for p in merged] == [1, 2, 3, 4.0, 11]
    assert merged[:4] == points[:4]  # untouched, same objects' values


def test_values_that_cannot_be_added_keep_the_first() -> None:
    first = point(LATENCY, 1, HistogramValue((1.0,), (1, 1), 1.0))
    merged = merge_duplicates([first, point(LATENCY, 2, HistogramValue((2.0,), (5, 5), 9.0)), point(LATENCY, 3, 7.0)])
    assert [p.value for p in merged] == [first.value]
    assert sum_values(HistogramValue((1.0,), (1,), 1.0), HistogramValue((1.0,), (1, 2), 2.0)) == HistogramValue(
        (1.0,), (2, 2), 3.0
    )  # a short count tuple is padded, not an error
    assert sum_values(1.5, 2) == 3.5


def _merged_one_by_one(points: list[Point]) -> list[Point]:
    """The rule of merge_duplicates as the plain loop it is: the reference."""
    out: list[Point] = []
    where: dict[tuple[MetricDef, tuple[tuple[str, str], ...], object], int] = {}
    for p in points:
        key = (p.metric, p.attributes, p.resource.labels if p.resource is not None else None)
        if key not in where:
            where[key] = len(out)
            out.append(p)
            continue
        first = out[where[key]]
        value = sum_values(first.value, p.value)
        if value is None:
            continue
        resource = first.resource
        if resource is not None and p.resource is not None and resource.otel != p.resource.otel:
            resource = Resource(resource.labels, tuple(item for item in resource.otel if item in set(p.resource.otel)))
        start = min([t for t in (first.start_time_ns, p.start_time_ns) if t], default=0)
        out[where[key]] = Point(first.metric, first.cgroup, first.attributes, value, resource, start)
    return out


def _random_batch(generator: random.Random) -> list[Point]:
    """A few pods' cgroups sharing label sets (sandbox, pod level, an app container, no labels)
    with counters, gauges and histograms, some of which cannot be added to each other."""
    resources: list[Resource | None] = [None]
    for container in ("", "", "app"):
        labels = (("container", container), ("namespace", "a"), ("node", "n"), ("pod", f"p{generator.randrange(3)}"))
        otel = generator.sample([("container.id", "x"), ("k8s.pod.uid", "u"), ("k8s.pod.name", "b")], 2)
        resources.append(Resource(labels, tuple(sorted(otel))))
    points = []
    for cgroup in range(generator.randrange(1, 8)):
        resource = generator.choice(resources)
        for metric in generator.sample([SWITCHES, MEMORY, LATENCY], generator.randrange(1, 4)):
            attrs = generator.choice([(), (("direction", "in"),), (("direction", "out"),)])
            points.append(point(metric, cgroup, _random_value(generator, metric), resource, attrs,
                                generator.choice([0, 0, 5, 100])))  # fmt: skip
    if generator.random() < 0.5:
        generator.shuffle(points)
    return points


def _random_value(generator: random.Random, metric: MetricDef) -> float | HistogramValue:
    if metric is LATENCY:
        choice = generator.randrange(4)
        if choice == 3:
            return float(generator.randrange(9))  # a number in a histogram family: cannot be added
        return HistogramValue((1.0, 2.0) if choice else (4.0,), (1, generator.randrange(5), 2), 1.5)
    return generator.choice([generator.randrange(100), generator.random()])


def test_random_batches_merge_as_the_plain_loop_does_also_cycle_after_cycle() -> None:
    """merge_duplicates and a SeriesMerger fed cycle after cycle (the same series with new
    values, which reuses where the duplicates are; then other series) give the reference loop's
    points, values, resources and start times, in its order."""
    generator = random.Random(17)
    merger = SeriesMerger()
    for _ in range(200):
        points = _random_batch(generator)
        for _cycle in range(3):
            expected = _merged_one_by_one(points)
            for merged in (merge_duplicates(points), merger(points)):
                assert merged == expected
                assert [p.resource for p in merged] == [p.resource for p in expected]
            # The next cycle: the same series, new values (some of which no longer add up).
            points = [
                Point(p.metric, p.cgroup, p.attributes, _random_value(generator, p.metric), p.resource, p.start_time_ns)
                for p in points
            ]
