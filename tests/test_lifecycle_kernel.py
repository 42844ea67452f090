"""Cgroups that come and go, against the real kernel: bpf/cgroups.bpf.c's events and its
in-kernel map of the cgroups that count (kpod_watched), through the receivers.

- The kernel classifies new cgroups at mkdir (kubepods root, QoS, pod, container) before any
  task runs in them; nested cgroups get no entry.
- Kubernetes modes (index scope "kubepods"): tasks outside pods are not counted at all, and a
  pod's nested cgroups (cgroup delegation) are charged to their container: 1200 of them take
  one map entry, and a workload started afterwards still gets its series.
- A cgroup created, used and removed between two walks is known from its events: its counts
  are reported under its path, flagged gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from kernel_util import (
    M_FAIL,
    N_OK,
    SYSCALL_WORKLOAD_C,
    Z_EOF,
    Workload,
    cgroup2_root,
    cgroup_tree,
    compile_c,
    context,
    finish_syscall_workload,
    kernel_test,
    mounts,
    points_for,
    started_syscall_workload,
    workloads,
)
from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

from kpod.component import Context, EmptyConfig
from kpod.kernel import cgroupwatch
from kpod.selfmetrics import SelfMetrics

pytestmark = kernel_test


def _watched(watch: cgroupwatch.CgroupWatch) -> dict[int, tuple[int, int]]:
    """kpod_watched as the kernel holds it: id -> (charge, kind)."""
    assert watch.loaded is not None and watch.layouts is not None
    layouts = watch.layouts
    out = {}
    for raw_key, raw_value in watch.loaded.obj.maps[cgroupwatch.WATCHED_MAP].lookup_batch():
        value = layouts.watched.value(raw_value)
        out[layouts.key_id(raw_key)] = (int(value.charge), int(value.kind))
    return out


def _by_syscall(batch, metric: str, cgroup_id: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {dict(p.attributes)["syscall"]: p.value for p in points_for(batch, metric, cgroup_id)}


def _collect(receiver):  # type: ignore[no-untyped-def]
    receiver.context.cgroups.refresh()
    return receiver.collect()


def test_the_kernel_classifies_new_cgroups_before_their_first_task() -> None:
    ctx = context("syscall", scope="kubepods")
    watch = cgroupwatch.acquire(ctx.cgroups, ctx.settings.bpf)
    assert watch is not None and watch.filtering
    try:
        added_before = watch.stats.added
        with cgroup_tree() as tree:
            pod = tree.pod()
            nested = tree.mkdir(str((pod.container_dir / "init" / "deeper").relative_to(cgroup2_root())))
            guaranteed = tree.pod(qos="guaranteed")  # no QoS level: kubepods.slice/kubepods-pod<uid>.slice
            kinds = watch.layouts.kind_values  # type: ignore[union-attr]
            # No walk since: every entry below was made by the mkdir handler in the kernel.
            watched = _watched(watch)
            assert watched[pod.pod_id] == (pod.pod_id, kinds["pod"])
            assert watched[pod.container_id] == (pod.container_id, kinds["container"])
            assert watched[pod.pod_dir.parent.stat().st_ino][1] == kinds["qos"]
            assert watched[guaranteed.pod_id] == (guaranteed.pod_id, kinds["pod"])
            assert watched[guaranteed.container_id] == (guaranteed.container_id, kinds["container"])
            assert nested.stat().st_ino not in watched
            assert nested.parent.stat().st_ino not in watched
            assert watch.stats.added == added_before
            v1_memory = mounts().v1.get("memory")
            free = [n for n in ("kubepods.slice", "kubepods") if v1_memory and not (Path(v1_memory) / n).exists()]
            if free:  # a v1 hierarchy's kubepods is none of ours (its root has hierarchy id > 0)
                with cgroup_tree(v1_memory) as v1:
                    v1_id = v1.mkdir(free[0]).stat().st_ino
                    assert v1_id not in _watched(watch)
            # Events: mkdirs of what is watched, nothing for nested cgroups.
            ctx.cgroups.refresh()
            ids = {pod.pod_id, pod.container_id, guaranteed.pod_id, guaranteed.container_id}
            assert ids <= ctx.cgroups.live_ids()
            container_id = pod.container_id
        ctx.cgroups.refresh()
        gone = {ref.id: ref for ref in ctx.cgroups.gone()}
        assert gone[container_id].path.endswith(pod.container_dir.name)
    finally:
        cgroupwatch.release(watch)


def test_kubernetes_modes_count_pods_only(tmp_path: Path) -> None:
    """The syscall workload once in a pod and once in a cgroup of no pod: only the pod's is
    counted.  It enters its first read (waiting for "go") before it is moved, outside any
    pod: in Kubernetes modes that call is not counted (no stamp at entry)."""
    binary = compile_c(SYSCALL_WORKLOAD_C, tmp_path, "workload")
    ctx = context("syscall", scope="kubepods")
    receiver = SyscallReceiver(ctx, SyscallConfig(tracked_syscalls=["read", "getppid"]))
    with cgroup_tree() as tree:
        receiver.start()
        try:
            assert receiver.watch is not None and receiver.watch.filtering
            pod = tree.pod()  # made after the start: classified by the kernel
            service = tree.mkdir(f"kpod-test-service-{os.getpid()}.service")
            for cgroup in (pod.container_dir, service):
                with started_syscall_workload(binary) as proc:
                    tree.move(proc.pid, cgroup)
                    finish_syscall_workload(proc)
            batch = _collect(receiver)
            assert _by_syscall(batch, "kpod.syscall.count", pod.container_id) == {
                "getppid": N_OK,
                "read": M_FAIL + Z_EOF,
            }
            assert _by_syscall(batch, "kpod.syscall.errors", pod.container_id)["read"] == M_FAIL
            # Nothing for the service, the root cgroup, or anything else outside pods.
            layout = receiver.loaded.layouts["sys_stats"]
            keys = {int(layout.key(k).cgroup_id) for k, _ in receiver.loaded.obj.maps["sys_stats"].lookup_batch()}
            assert service.stat().st_ino not in keys and 1 not in keys
            kinds = ctx.cgroups.kinds()
            assert all(kinds.get(k) in ("pod", "container") for k in keys), keys
        finally:
            receiver.shutdown()


NESTED = 1200
WANDER = """
import os, sys
paths = sys.stdin.readline().split()
for path in paths:
    with open(path + "/cgroup.procs", "w") as f:
        f.write(str(os.getpid()))
    os.getppid()
print("done", flush=True)
sys.stdin.readline()
"""


def test_nested_cgroups_take_no_entries_and_leave_room_for_others() -> None:
    """1200 cgroups below one container (cgroup delegation), a process making a getppid() in
    each, maps of 1024 entries: the container takes one sys_stats entry and its switches one
    sched_cgroups entry, counted to the container; a pod started afterwards gets its series.
    Counted per cgroup instead, these 1200 (cgroup, getppid) keys would not fit."""
    ctx = context("syscall", scope="kubepods", map_max_entries=1024)
    syscalls = SyscallReceiver(ctx, SyscallConfig(tracked_syscalls=["getppid"]))
    sched = CpuSchedReceiver(Context("cpu_sched", ctx.settings, ctx.cgroups, SelfMetrics()), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        syscalls.start()
        sched.start()
        try:
            pod = tree.pod()
            root = cgroup2_root()
            base = pod.container_dir.relative_to(root)
            wide = [tree.mkdir(f"{base}/delegated/n{i}") for i in range(NESTED - 25)]
            deep = [tree.mkdir(f"{base}/delegated/" + "/".join(f"d{j}" for j in range(i + 1))) for i in range(25)]
            wanderer = Workload(WANDER)
            procs.append(wanderer)
            tree.move(wanderer.pid, pod.container_dir)
            wanderer.go()
            wanderer.send(" ".join(str(p) for p in [*wide, *deep]))
            assert wanderer.readline(120) == "done"
            later = tree.pod()
            other = Workload("os.getppid()\nos.getppid()\nprint('x', flush=True)\nsys.stdin.readline()\n")
            procs.append(other)
            tree.move(other.pid, later.container_dir)
            other.go()
            assert other.readline() == "x"
            batch = _collect(syscalls)
            assert _by_syscall(batch, "kpod.syscall.count", pod.container_id) == {"getppid": NESTED}
            assert _by_syscall(batch, "kpod.syscall.count", later.container_id) == {"getppid": 2}
            stats = syscalls.loaded.obj.maps["sys_stats"]
            layout = syscalls.loaded.layouts["sys_stats"]
            owners = [int(layout.key(k).cgroup_id) for k, _ in stats.lookup_batch()]
            assert sorted(owners) == sorted([pod.container_id, later.container_id]), owners
            assert syscalls.loaded.error_counts()["sys_stats"] == 0
            switches = _collect(sched)
            assert points_for(switches, "kpod.cpu.context.switches", pod.container_id)
            nested_ids = {p.stat().st_ino for p in [*wide, *deep]}
            sched_keys = {int.from_bytes(k[:8], "little") for k in sched.loaded.obj.maps["sched_cgroups"].keys()}  # noqa: SIM118
            assert not sched_keys & nested_ids
            assert sched.loaded.error_counts()["sched_cgroups"] == 0
        finally:
            sched.shutdown()
            syscalls.shutdown()


SHORT_LIVED = """
import os
for _ in range(7):
    os.getppid()
"""


def test_a_cgroup_created_used_and_removed_between_walks_is_reported() -> None:
    """Both modes: the container lives and dies between two walks; its counts are reported
    at the next one, under its path, flagged gone."""
    for scope in ("all", "kubepods"):
        ctx = context("syscall", scope=scope)
        receiver = SyscallReceiver(ctx, SyscallConfig(tracked_syscalls=["getppid"]))
        with cgroup_tree() as tree:
            receiver.start()
            try:
                pod = tree.pod()
                cid, path = pod.container_id, "/" + str(pod.container_dir.relative_to(cgroup2_root()))
                proc = subprocess.Popen(
                    [
                        "/bin/sh",
                        "-c",
                        f"echo $$ > {pod.container_dir}/cgroup.procs && exec {sys.executable} -c '{SHORT_LIVED}'",
                    ]
                )
                assert proc.wait(30) == 0
                deadline = time.monotonic() + 10
                while True:  # the exited task leaves the cgroup asynchronously
                    try:
                        pod.container_dir.rmdir()
                        break
                    except OSError:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                tree.created.remove(pod.container_dir)
                assert cid not in ctx.cgroups.known_ids()  # never walked while it lived
                batch = _collect(receiver)
                (point,) = points_for(batch, "kpod.syscall.count", cid)
                assert point.value == 7, scope
                assert point.cgroup.gone and point.cgroup.path == path
            finally:
                receiver.shutdown()
