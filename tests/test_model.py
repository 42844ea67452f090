"""The one rule for points of one series (kpod.model.merge_duplicates), which the pipeline
applies once per cycle after the processors."""

from __future__ import annotations

from kpod.model import CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource, merge_duplicates, sum_values

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
