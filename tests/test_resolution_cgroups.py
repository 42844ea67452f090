"""cgroup -> pod/container resolution on real cgroup directories with real processes in them.

For both kubelet cgroup drivers and the three runtimes' naming (containerd, CRI-O, docker), a
pod tree is created under the cgroup2 mount, below a unique prefix (so that nothing of anyone
else is touched, and so that the prefixed-path case of nested nodes is exercised too):

    <cgroup2>/kpod-test-<random>/kubepods.slice/.../<pod>/<sandbox>    a process named "pause"
                                                     .../<app>        a "sleep" (in the status)
                                                     .../<starting>   a "sleep" (not in the status yet)
                                                     .../crio-conmon-<id> (CRI-O) a "sleep"
                                                 <pod> itself          a "sleep" in the pod-level cgroup

The cgroup ids come from walking the tree (CgroupIndex), exactly as the receivers get them, and
/proc/<pid>/cgroup is checked to name the same cgroup.  Everything created is removed again,
also on failure: our processes are killed by PID, stragglers moved to the root, directories
removed deepest first.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fake_apiserver import make_pod
from kernel_util import CgroupTree, cgroup2_skip_reason, cgroup_tree
from kpod.processors.k8sattributes import factory
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.pods import pod_from_json
from kpod.processors.k8sattributes.processor import UNRESOLVED_METRIC, K8sAttributesProcessor

from kpod.cgroup.index import CgroupIndex
from kpod.component import Context
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point, merge_duplicates
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings

pytestmark = pytest.mark.skipif(cgroup2_skip_reason() is not None, reason=cgroup2_skip_reason() or "")

CPU = MetricDef("kpod.cpu.usage", Kind.COUNTER, "s", "cpu time")
NODE = "node-a"


@dataclass(frozen=True)
class Layout:
    driver: str  # systemd | cgroupfs
    runtime: str  # containerd | crio | docker
    qos: str  # burstable | besteffort | guaranteed

    @property
    def scheme(self) -> str:
        return {"containerd": "containerd", "crio": "cri-o", "docker": "docker"}[self.runtime]

    def pod_dir(self, uid: str) -> str:
        if self.driver == "systemd":
            flat = uid.replace("-", "_")
            if self.qos == "guaranteed":
                return f"kubepods.slice/kubepods-pod{flat}.slice"
            return f"kubepods.slice/kubepods-{self.qos}.slice/kubepods-{self.qos}-pod{flat}.slice"
        if self.qos == "guaranteed":
            return f"kubepods/pod{uid}"
        return f"kubepods/{self.qos}/pod{uid}"

    def container_dir(self, cid: str, conmon: bool = False) -> str:
        monitor = "conmon-" if conmon else ""
        if self.driver == "systemd":
            prefix = {"containerd": "cri-containerd", "crio": "crio", "docker": "docker"}[self.runtime]
            return f"{prefix}-{monitor}{cid}.scope"
        # cgroupfs: containerd and docker use the bare id, CRI-O keeps its prefix.
        return f"crio-{monitor}{cid}" if self.runtime == "crio" else cid


LAYOUTS = [
    Layout("systemd", "containerd", "burstable"),
    Layout("systemd", "crio", "guaranteed"),
    Layout("systemd", "docker", "besteffort"),
    Layout("cgroupfs", "containerd", "guaranteed"),
    Layout("cgroupfs", "crio", "burstable"),
    Layout("cgroupfs", "docker", "besteffort"),
]


class Processes:
    """Processes we start (sleep, or sleep under the name "pause"), killed by PID at the end."""

    def __init__(self, bindir: Path) -> None:
        self.pause = bindir / "pause"
        shutil.copy(shutil.which("sleep") or "/bin/sleep", self.pause)  # comm is the binary's name
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, tree: CgroupTree, cgroup: Path, pause: bool = False) -> int:
        proc = subprocess.Popen([str(self.pause) if pause else "sleep", "300"])
        self.started.append(proc)
        tree.move(proc.pid, cgroup)
        return proc.pid

    def stop(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        self.started.clear()


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[CgroupTree, Processes, str]]:
    procs = Processes(tmp_path)
    prefix = f"kpod-test-{uuid.uuid4().hex[:12]}"
    with cgroup_tree() as tree:
        try:
            yield tree, procs, prefix
        finally:
            procs.stop()  # before the tree's cleanup: empty cgroups can be removed


def make_processor(cgroup_root: str) -> tuple[K8sAttributesProcessor, SelfMetrics, CgroupIndex]:
    settings = KpodSettings()
    settings.discovery.mode = "informer"  # discovery is not started: the store is filled by hand
    settings.node_name = NODE
    settings.filter.exclude_namespaces = []
    index = CgroupIndex(cgroup_root, scope="kubepods")
    self_metrics = SelfMetrics()
    processor = factory.create(Context("k8sattributes", settings, index, self_metrics), K8sAttributesConfig())
    assert isinstance(processor, K8sAttributesProcessor)
    return processor, self_metrics, index


def proc_cgroup(pid: int) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return line[3:].strip()
    raise AssertionError(f"no cgroup2 line for {pid}")


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda layout: f"{layout.driver}-{layout.runtime}-{layout.qos}")
def test_resolution_on_real_cgroups(layout: Layout, world: tuple[CgroupTree, Processes, str]) -> None:
    tree, procs, prefix = world
    uid = str(uuid.uuid4())
    app, sandbox, starting = (uuid.uuid4().hex + uuid.uuid4().hex for _ in range(3))
    pod_rel = f"{prefix}/{layout.pod_dir(uid)}"
    cgroups = {
        "app": tree.mkdir(f"{pod_rel}/{layout.container_dir(app)}"),
        "sandbox": tree.mkdir(f"{pod_rel}/{layout.container_dir(sandbox)}"),
        "starting": tree.mkdir(f"{pod_rel}/{layout.container_dir(starting)}"),
    }
    if layout.runtime == "crio":
        cgroups["conmon"] = tree.mkdir(f"{pod_rel}/{layout.container_dir(app, conmon=True)}")
    cgroups["pod"] = tree.root / pod_rel
    pids = {name: procs.start(tree, path, pause=name == "sandbox") for name, path in cgroups.items()}

    # The pod as the API shows it: "app" runs, "sidecar" is still being created (no id), so a
    # container cgroup with an unknown id is either the sandbox or a container that is starting.
    pod_json = make_pod(
        "web-1", namespace="shop", uid=uid, containers=[("app", app), ("sidecar", "")], runtime=layout.scheme
    )
    processor, self_metrics, index = make_processor(str(tree.root / prefix))
    assert processor.store is not None
    processor.store.replace([pod_from_json(pod_json)])
    index.refresh()

    refs: dict[str, CgroupRef] = {}
    for name, path in cgroups.items():
        relative = "/" + str(path.relative_to(tree.root / prefix))
        ref = index.ref(os.stat(path).st_ino)
        assert ref == CgroupRef(os.stat(path).st_ino, relative)
        # What the kernel says about the process is the same cgroup (seen with the prefix).
        assert proc_cgroup(pids[name]) == f"/{prefix}{relative}"
        refs[name] = ref
    assert {r.path for r in index.workloads()} == {refs[n].path for n in cgroups if n != "pod"}

    processed = processor.process(Batch([Point(CPU, ref, (), 1.0 + i) for i, ref in enumerate(refs.values())]))
    batch = Batch(merge_duplicates(processed.points))  # what the pipeline does after the processors
    by_container: dict[str, list[Point]] = {}
    for point in batch.points:
        assert point.resource is not None
        labels = dict(point.resource.labels)
        assert (labels["namespace"], labels["pod"], labels["node"]) == ("shop", "web-1", NODE)
        by_container.setdefault(labels["container"], []).append(point)

    # app by name; the starting container by its short id until the status names it; sandbox
    # (recognised by its "pause" process), conmon and the pod level are one container="" series.
    assert set(by_container) == {"app", starting[:12], ""}
    (overhead,) = by_container[""]
    values = {name: 1.0 + i for i, name in enumerate(refs)}
    expected = values["sandbox"] + values["pod"] + values.get("conmon", 0.0)
    assert overhead.value == expected
    assert overhead.resource is not None and "container.id" not in dict(overhead.resource.otel)
    (app_point,) = by_container["app"]
    assert app_point.cgroup == refs["app"]
    assert dict(app_point.resource.otel) == {  # type: ignore[union-attr]
        "k8s.namespace.name": "shop",
        "k8s.pod.name": "web-1",
        "k8s.pod.uid": uid,
        "k8s.container.name": "app",
        "container.id": app,
        "k8s.node.name": NODE,
    }
    assert self_metrics.get(UNRESOLVED_METRIC, (("reason", "unknown_pod"),)) == 0

    # The sidecar's status arrives with the id we saw starting: it gets its name.
    pod_json["status"]["containerStatuses"][1]["containerID"] = f"{layout.scheme}://{starting}"
    processor.store.replace([pod_from_json(pod_json)])
    (point,) = processor.process(Batch([Point(CPU, refs["starting"], (), 1.0)])).points
    assert dict(point.resource.labels)["container"] == "sidecar"  # type: ignore[union-attr]

    # The pod is deleted: its cgroups keep its labels for kpod.cgroup.gone_retention (their
    # final counts are still exported), then they are dropped and counted, once per cgroup
    # per cycle.
    processor.context.cgroups.gone_retention_s = 0.3
    processor.store.retention_s = 0.3
    processor.store.replace([])
    kept = processor.process(Batch([Point(CPU, ref, (), 1.0) for ref in refs.values()])).points
    assert kept and {dict(p.resource.labels)["pod"] for p in kept} == {"web-1"}  # type: ignore[union-attr]
    time.sleep(0.35)
    assert processor.process(Batch([Point(CPU, ref, (), 1.0) for ref in refs.values()])).points == []
    assert self_metrics.get(UNRESOLVED_METRIC, (("reason", "unknown_pod"),)) == len(refs)


def test_sandbox_without_pause_process_is_found_by_elimination(world: tuple[CgroupTree, Processes, str]) -> None:
    # A sandbox whose process is not called "pause" (another runtime's pause binary, or a pid
    # namespace that hides it): when every container of the spec has its id, an unknown
    # container cgroup of the pod can only be the sandbox.
    tree, procs, prefix = world
    uid, app, sandbox = str(uuid.uuid4()), "a" * 64, "b" * 64
    layout = LAYOUTS[0]
    pod_rel = f"{prefix}/{layout.pod_dir(uid)}"
    sandbox_dir = tree.mkdir(f"{pod_rel}/{layout.container_dir(sandbox)}")
    tree.mkdir(f"{pod_rel}/{layout.container_dir(app)}")
    procs.start(tree, sandbox_dir, pause=False)
    processor, _, index = make_processor(str(tree.root / prefix))
    assert processor.store is not None
    processor.store.replace([pod_from_json(make_pod("web-1", uid=uid, containers=[("app", app)]))])
    index.refresh()
    ref = index.ref(os.stat(sandbox_dir).st_ino)
    assert ref is not None
    (point,) = processor.process(Batch([Point(CPU, ref, (), 1.0)])).points
    assert dict(point.resource.labels)["container"] == ""  # type: ignore[union-attr]


def test_non_pod_cgroups_are_dropped_and_counted(world: tuple[CgroupTree, Processes, str]) -> None:
    tree, procs, prefix = world
    qos = tree.mkdir(f"{prefix}/kubepods.slice/kubepods-burstable.slice")
    stranger = tree.mkdir(f"{prefix}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{'1' * 32}.slice")
    procs.start(tree, stranger)
    processor, self_metrics, index = make_processor(str(tree.root / prefix))
    assert processor.store is not None
    processor.store.replace([])
    index.refresh()
    refs = [index.ref(os.stat(path).st_ino) for path in (qos, stranger)]
    assert all(refs)
    assert processor.process(Batch([Point(CPU, ref, (), 1.0) for ref in refs if ref])).points == []
    assert self_metrics.get(UNRESOLVED_METRIC, (("reason", "not_a_pod"),)) == 1
    assert self_metrics.get(UNRESOLVED_METRIC, (("reason", "unknown_pod"),)) == 1
