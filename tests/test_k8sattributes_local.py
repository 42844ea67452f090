"""The k8sattributes processor in local mode: labels from the cgroup path alone."""

from __future__ import annotations

import logging

import pytest
from kpod.processors.k8sattributes import factory
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.processor import UNRESOLVED_METRIC, K8sAttributesProcessor

from kpod.cgroup.index import CgroupIndex
from kpod.component import Context
from kpod.model import Batch, CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource, merge_duplicates
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings

CPU = MetricDef("kpod.cpu.usage", Kind.COUNTER, "s", "cpu time")
HIST = MetricDef("kpod.cpu.runqueue.latency", Kind.HISTOGRAM, "s", "wait")
CID = "a38b6325e8f53ac409df59c7e8415bdad54139296ebfa17f5dbb24a9774ed983"
POD1 = (
    "/kubepods.slice/kubepods-burstable.slice/"
    "kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice"
)
UID1 = "0a1b2c3d-0000-4000-8000-000000000001"


def make(settings: KpodSettings | None = None) -> tuple[K8sAttributesProcessor, Context]:
    settings = settings or KpodSettings()
    settings.discovery.mode = "local"
    settings.node_name = "node-a"
    context = Context(
        "k8sattributes", settings, CgroupIndex("/nonexistent"), SelfMetrics(), logging.getLogger("t")
    )
    processor = factory.create(context, K8sAttributesConfig())
    assert isinstance(processor, K8sAttributesProcessor)
    processor.start()
    return processor, context


def labels_of(point: Point) -> dict[str, str]:
    assert point.resource is not None
    return dict(point.resource.labels)


def otel_of(point: Point) -> dict[str, str]:
    assert point.resource is not None
    return dict(point.resource.otel)


def test_factory_is_registered_as_entry_point() -> None:
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="kpod.processors") if e.name == "k8sattributes"]
    assert ep.load() is factory
    assert factory.type == "k8sattributes" and factory.kind == "processor"


@pytest.mark.parametrize(
    ("path", "labels", "otel"),
    [
        (
            f"{POD1}/cri-containerd-{CID}.scope",
            {"namespace": "", "pod": "", "container": CID[:12], "node": "node-a"},
            {"k8s.pod.uid": UID1, "container.id": CID, "k8s.node.name": "node-a"},
        ),
        (
            POD1,
            {"namespace": "", "pod": "", "container": POD1.rsplit("/", 1)[1], "node": "node-a"},
            {"k8s.pod.uid": UID1, "k8s.node.name": "node-a", "kpod.cgroup.name": POD1.rsplit("/", 1)[1]},
        ),
        (
            f"/kubepods/pod{UID1}/crio-conmon-{CID}",
            {"namespace": "", "pod": "", "container": f"crio-conmon-{CID}", "node": "node-a"},
            {"k8s.pod.uid": UID1, "k8s.node.name": "node-a", "kpod.cgroup.name": f"crio-conmon-{CID}"},
        ),
        (
            "/system.slice/nginx.service",
            {"namespace": "", "pod": "", "container": "nginx.service", "node": "node-a"},
            {"k8s.node.name": "node-a", "kpod.cgroup.name": "nginx.service"},
        ),
        (
            f"/system.slice/docker-{CID}.scope",
            {"namespace": "", "pod": "", "container": CID[:12], "node": "node-a"},
            {"container.id": CID, "k8s.node.name": "node-a"},
        ),
        ("/", {"namespace": "", "pod": "", "container": "", "node": "node-a"}, {"k8s.node.name": "node-a"}),
    ],
)
def test_local_labels(path: str, labels: dict[str, str], otel: dict[str, str]) -> None:
    processor, _ = make()
    batch = processor.process(Batch([Point(CPU, CgroupRef(7, path), (), 1.0)]))
    (point,) = batch.points
    assert labels_of(point) == labels
    assert otel_of(point) == otel


def test_self_metrics_pass_untouched_and_gone_cgroups_are_dropped() -> None:
    processor, context = make()
    own = Point(CPU, None, (("receiver", "x"),), 3.0)
    gone = Point(CPU, CgroupRef(9, ""), (), 1.0)
    batch = processor.process(Batch([own, gone]))
    assert batch.points == [own] and own.resource is None
    assert context.self_metrics.get(UNRESOLVED_METRIC, (("reason", "gone"),)) == 1


def test_one_resource_object_per_cgroup() -> None:
    processor, _ = make()
    ref = CgroupRef(5, "/system.slice/a.service")
    first = processor.process(
        Batch([Point(CPU, ref, (), 1.0), Point(HIST, ref, (), HistogramValue((1.0,), (1, 2), 3))])
    )
    second = processor.process(Batch([Point(CPU, ref, (), 2.0)]))
    assert first.points[0].resource is first.points[1].resource is second.points[0].resource


def test_given_points_stay_as_they_are_and_a_cgroup_is_resolved_once_per_batch() -> None:
    """Kept points are new points with their resource: the ones given (a receiver's batch, which
    the pipeline hands over again while that receiver is not due) are never changed, so the
    pipeline need not copy the batch first.  A cgroup is resolved once per batch, also when its
    points come back after another cgroup's (a second receiver's)."""
    processor, _ = make()
    looked_up: list[int] = []
    resolve = processor.resolve

    def counting(point: Point) -> Resource | str:
        assert point.cgroup is not None
        looked_up.append(point.cgroup.id)
        return resolve(point)

    processor.resolve = counting  # type: ignore[method-assign]
    assert not K8sAttributesProcessor.mutates_data
    a, b = CgroupRef(5, "/system.slice/a.service"), CgroupRef(6, "/system.slice/b.service")
    given = [
        Point(CPU, a, (), 1.0),
        Point(HIST, a, (), HistogramValue((1.0,), (1, 2), 3)),
        Point(CPU, b, (), 2.0),
        Point(CPU, a, (("cpu", "0"),), 3.0),
    ]
    out = processor.process(Batch(list(given)))
    assert all(p.resource is None for p in given)
    assert [(p.metric, p.cgroup, p.attributes, p.value) for p in out.points] == [
        (p.metric, p.cgroup, p.attributes, p.value) for p in given
    ]
    assert [labels_of(p)["container"] for p in out.points] == ["a.service", "a.service", "b.service", "a.service"]
    assert looked_up == [5, 6]


def test_include_labels_are_present_and_empty_in_local_mode() -> None:
    settings = KpodSettings()
    settings.filter.include_labels = ["app.kubernetes.io/name", "team"]
    processor, _ = make(settings)
    (point,) = processor.process(Batch([Point(CPU, CgroupRef(5, "/x.service"), (), 1.0)])).points
    assert labels_of(point)["label_app_kubernetes_io_name"] == ""
    assert labels_of(point)["label_team"] == ""


def test_include_labels_that_collide_are_a_config_error() -> None:
    settings = KpodSettings()
    settings.filter.include_labels = ["a.b", "a_b"]
    with pytest.raises(ValueError, match="both become 'label_a_b'"):
        make(settings)


def test_points_with_one_label_set_are_merged() -> None:
    # Two cgroups, one label set (same leaf name in two slices): one series after the pipeline's
    # merge, values summed.
    processor, _ = make()
    h1 = HistogramValue((1.0, 2.0), (1, 0, 2), 5.0)
    h2 = HistogramValue((1.0, 2.0), (0, 3, 1), 7.0)
    processed = processor.process(
        Batch(
            [
                Point(CPU, CgroupRef(1, "/a.slice/init.scope"), (), 1.5),
                Point(CPU, CgroupRef(2, "/b.slice/init.scope"), (), 2.0),
                Point(HIST, CgroupRef(1, "/a.slice/init.scope"), (), h1),
                Point(HIST, CgroupRef(2, "/b.slice/init.scope"), (), h2),
                Point(CPU, CgroupRef(3, "/b.slice/other.scope"), (), 4.0),
            ]
        )
    )
    assert len(processed.points) == 5  # the processor labels; it does not merge
    batch = Batch(merge_duplicates(processed.points))
    values = {(p.metric.name, labels_of(p)["container"]): p.value for p in batch.points}
    assert values == {
        ("kpod.cpu.usage", "init.scope"): 3.5,
        ("kpod.cpu.runqueue.latency", "init.scope"): HistogramValue((1.0, 2.0), (1, 3, 3), 12.0),
        ("kpod.cpu.usage", "other.scope"): 4.0,
    }


def test_node_defaults_to_host_name() -> None:
    import socket

    settings = KpodSettings()
    settings.discovery.mode = "local"
    context = Context("k8sattributes", settings, CgroupIndex("/nonexistent"), SelfMetrics())
    processor = factory.create(context, K8sAttributesConfig())
    (point,) = processor.process(Batch([Point(CPU, CgroupRef(5, "/x.service"), (), 1.0)])).points
    assert point.resource == Resource(
        (("container", "x.service"), ("namespace", ""), ("node", socket.gethostname()), ("pod", "")),
        (("k8s.node.name", socket.gethostname()), ("kpod.cgroup.name", "x.service")),
    )
