"""The cgroup index following the kernel's cgroup_mkdir/rmdir events instead of walking the
tree every cycle (kpod.cgroup.index, kpod.kernel.cgroupwatch), against the real kernel.

Ground truth is a fresh walk of the same tree at the same moment: after every change (pods,
containers, nested cgroups made and removed, a container gone with its nested cgroups), the
index that followed events knows exactly what the walk finds, and it did not walk to get
there.  When the ring buffer overflows, the index walks (and still agrees).  Other test runs
may make cgroups on this host at the same time: comparisons are restricted to this test's pods.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from kernel_util import cgroup2_root, cgroup_tree, context, kernel_test

from kpod.cgroup.index import CgroupIndex
from kpod.kernel import cgroupwatch

pytestmark = kernel_test


@contextlib.contextmanager
def _watched_index(scope: str) -> Iterator[CgroupIndex]:
    """The cgroup index of `scope` fed by the kernel's cgroup events; the event source released after."""
    ctx = context("syscall", scope=scope)
    watch = cgroupwatch.acquire(ctx.cgroups, ctx.settings.bpf)
    assert watch is not None
    try:
        yield ctx.cgroups
    finally:
        cgroupwatch.release(watch)


def _view(index: CgroupIndex, under: list[Path]) -> tuple[dict[int, str], set[int]]:
    """(id -> path, leaf ids) of the index's live cgroups below `under`."""
    root = cgroup2_root()
    prefixes = tuple("/" + str(p.relative_to(root)) for p in under)
    live = {}
    for cgroup_id in index.live_ids():
        ref = index.ref(cgroup_id)
        if ref is not None and ref.path.startswith(prefixes):
            live[cgroup_id] = ref.path
    leaves = {r.id for r in index.workloads() if r.id in live}
    return live, leaves


def _walked(scope: str, under: list[Path]) -> tuple[dict[int, str], set[int]]:
    index = CgroupIndex(cgroup2_root(), scope=scope)
    index.refresh()
    return _view(index, under)


def _follows(index: CgroupIndex, scope: str, under: list[Path]) -> None:
    """Refresh; the index agrees with a walk, and did not walk."""
    before = index.walk_status()
    index.refresh()
    after = index.walk_status()
    assert _view(index, under) == _walked(scope, under)
    assert after["walks"] == before["walks"], after
    assert after["followed"] == before["followed"] + 1


def test_the_index_follows_pods_containers_and_nested_cgroups_without_walking() -> None:
    for scope in ("kubepods", "all"):
        with _watched_index(scope) as index, cgroup_tree() as tree:
            first = tree.pod()
            pods = [first.pod_dir]
            index.refresh()  # the first sync added what existed before the watch: one more walk
            index.refresh()
            _follows(index, scope, pods)
            second = tree.pod(qos="guaranteed")
            pods.append(second.pod_dir)
            sidecar = tree.mkdir(str((first.pod_dir / "cri-containerd-sidecar.scope").relative_to(tree.root)))
            _follows(index, scope, pods)
            assert {first.container_id, second.container_id, sidecar.stat().st_ino} <= {r.id for r in index.workloads()}
            # Nested cgroups (no events in Kubernetes modes: the container is looked into).
            deeper = tree.mkdir(str((first.container_dir / "init" / "deeper").relative_to(tree.root)))
            _follows(index, scope, pods)
            leaves = {r.id for r in index.workloads()}
            assert deeper.stat().st_ino in leaves and first.container_id not in leaves
            deeper.rmdir()
            deeper.parent.rmdir()
            tree.created = [p for p in tree.created if p not in (deeper, deeper.parent)]
            _follows(index, scope, pods)
            assert first.container_id in {r.id for r in index.workloads()}
            # A container removed (after its nested cgroup): gone with its path.
            nested = tree.mkdir(str((sidecar / "inner").relative_to(tree.root)))
            _follows(index, scope, pods)
            sidecar_id, nested_id = sidecar.stat().st_ino, nested.stat().st_ino
            nested.rmdir()
            sidecar.rmdir()
            tree.created = [p for p in tree.created if p not in (nested, sidecar)]
            _follows(index, scope, pods)
            gone = {r.id: r.path for r in index.gone()}
            assert gone[sidecar_id].endswith("/cri-containerd-sidecar.scope")
            assert gone[nested_id].endswith("/cri-containerd-sidecar.scope/inner")
            assert index.walk_status()["drift"] == 0


def test_events_lost_in_a_full_ring_buffer_make_the_index_walk() -> None:
    """Local mode reports every cgroup: 3000 made and removed between two refreshes overflow the
    256 KiB ring buffer; the index notices (the kernel's count of dropped records) and walks."""
    with _watched_index("all") as index, cgroup_tree() as tree:
        pod = tree.pod()
        index.refresh()
        before = index.walk_status()["walks"].get("events missed", 0)
        for n in range(1500):
            path = pod.container_dir / f"churn-{n}-{'x' * 100}"
            os.mkdir(path)
            os.rmdir(path)
        kept = tree.mkdir(str((pod.pod_dir / "cri-containerd-after.scope").relative_to(tree.root)))
        index.refresh()
        assert index.walk_status()["walks"].get("events missed", 0) == before + 1
        assert kept.stat().st_ino in index.live_ids()
        assert _view(index, [pod.pod_dir]) == _walked("all", [pod.pod_dir])


def test_containers_looked_into_through_the_receivers_kept_descriptors() -> None:
    """Receivers keep a descriptor of each container's directory (kpod.cgroup.dirs) and the
    index looks into containers through it (fstat, no path lookup).  A nested cgroup made in
    one is still seen, and a container removed and made again under the same name (the kept
    descriptor then names the removed directory) is the new cgroup, the old one gone."""
    with _watched_index("kubepods") as index, cgroup_tree() as tree:
        pod = tree.pod()
        pods = [pod.pod_dir]
        index.refresh()
        index.refresh()

        def read_container() -> None:
            index.reads.new_cycle()
            index.reads.read(str(pod.container_dir / "cgroup.procs"))  # as a receiver does
            assert index.reads.dirs.stat(str(pod.container_dir)) is not None

        read_container()
        _follows(index, "kubepods", pods)
        nested = tree.mkdir(str((pod.container_dir / "inner").relative_to(tree.root)))
        read_container()
        _follows(index, "kubepods", pods)
        assert nested.stat().st_ino in {r.id for r in index.workloads()}
        nested.rmdir()
        tree.created = [p for p in tree.created if p != nested]
        read_container()
        _follows(index, "kubepods", pods)
        assert pod.container_id in {r.id for r in index.workloads()}
        old_id = pod.container_id
        os.rmdir(pod.container_dir)
        os.mkdir(pod.container_dir)
        new_id = pod.container_id
        assert new_id != old_id
        assert index.reads.dirs.stat(str(pod.container_dir)).st_ino == old_id  # still the removed one
        _follows(index, "kubepods", pods)
        assert new_id in {r.id for r in index.workloads()} and old_id not in index.live_ids()
        assert {r.id: r.path for r in index.gone()}[old_id] == index.ref(new_id).path
        read_container()  # the kept descriptor is now the new directory's
        assert index.reads.dirs.stat(str(pod.container_dir)).st_ino == new_id
        _follows(index, "kubepods", pods)
        assert index.walk_status()["drift"] == 0
