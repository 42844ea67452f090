"""OOM kills on pure cgroup v2 (memory.max), as real nodes and the Debian 6.1 VM have them.

The hybrid-host variant (a v1 memory.limit_in_bytes) is in test_bpf_receivers.py; on a hybrid
host this one skips, inside `make test-vm` it runs.  Ground truth: the container's own
memory.events, which the kernel keeps next to the limit.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from kernel_util import (
    KUBELET_CONTROLLERS,
    THREADED_HOG_C,
    Workload,
    cgroup_tree,
    compile_c,
    context,
    kernel_test,
    points_for,
    pure_cgroup2_memory,
    workloads,
)
from kpod.receivers.memory import MemoryConfig, MemoryReceiver

pytestmark = kernel_test


def _events(cgroup: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (cgroup / "memory.events").read_text().splitlines())}


def test_oom_kill_through_memory_max_counted_once_for_the_victims_pod() -> None:
    if not pure_cgroup2_memory():
        pytest.skip("the memory controller is not on cgroup2 here (hybrid host: the v1 test covers it)")
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    receiver = MemoryReceiver(context("memory"), MemoryConfig(major_faults=False))
    with cgroup_tree(controllers=KUBELET_CONTROLLERS) as tree, workloads() as procs:
        pod, bystander = tree.pod(), tree.pod()
        (pod.container_dir / "memory.max").write_text(str(64 << 20))
        swap_max = pod.container_dir / "memory.swap.max"
        if swap_max.exists():  # with swap, the hog would page out instead of dying
            swap_max.write_text("0")
        receiver.start()
        try:
            w = Workload(hog)
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            other = Workload("sys.stdin.readline()\n")
            procs.append(other)
            tree.move(other.pid, bystander.container_dir)
            w.go()
            rc = w.wait(120)
            assert rc == -9, f"the hog should be OOM-killed (SIGKILL), exit status {rc}"
            assert _events(pod.container_dir)["oom_kill"] == 1
            batch = collect(receiver)
            points = points_for(batch, "kpod.mem.oom.kills", pod.container_id)
            assert [p.value for p in points] == [1.0]
            # The bystander has the series too, at 0: every known container starts there.
            assert [p.value for p in points_for(batch, "kpod.mem.oom.kills", bystander.container_id)] == [0.0]
            assert _events(bystander.container_dir)["oom_kill"] == 0
        finally:
            receiver.shutdown()


@pytest.mark.parametrize("oom_group", [False, True], ids=["single", "oom.group"])
def test_multithreaded_victim_counts_one_kill_each_time(tmp_path: Path, oom_group: bool) -> None:
    """32 allocating threads, killed through memory.max three times: 3 kills.  The other
    threads are marked OOM victims "already exiting" after each kill, which is no kill.  With
    memory.oom.group (what the kubelet sets for containers since 1.28) the kernel kills the
    cgroup's processes as a group and runs its kill routine for the victim twice, so
    memory.events' oom_kill can read 2 per round; one process died per round all the same."""
    if not pure_cgroup2_memory():
        pytest.skip("the memory controller is not on cgroup2 here (hybrid host: the v1 test covers it)")
    binary = compile_c(THREADED_HOG_C, tmp_path, "hog")
    receiver = MemoryReceiver(context("memory"), MemoryConfig(major_faults=False))
    with cgroup_tree(controllers=KUBELET_CONTROLLERS) as tree:
        pod = tree.pod()
        (pod.container_dir / "memory.max").write_text(str(64 << 20))
        swap_max = pod.container_dir / "memory.swap.max"
        if swap_max.exists():
            swap_max.write_text("0")
        group = pod.container_dir / "memory.oom.group"
        if oom_group:
            if not group.exists():
                pytest.skip("no memory.oom.group on this kernel")
            group.write_text("1")
        receiver.start()
        try:
            for _ in range(3):
                proc = subprocess.Popen([str(binary), "32"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                try:
                    assert proc.stdout.readline() == b"ready\n"
                    tree.move(proc.pid, pod.container_dir)
                    proc.stdin.write(b"g")
                    proc.stdin.flush()
                    assert proc.wait(300) == -9
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
                    proc.stdin.close()
                    proc.stdout.close()
            events = _events(pod.container_dir)
            batch = collect(receiver)
            assert events["oom_kill"] >= 3, events
            if not oom_group:
                assert events["oom_kill"] == 3, events
            assert [p.value for p in points_for(batch, "kpod.mem.oom.kills", pod.container_id)] == [3.0], events
        finally:
            receiver.shutdown()


def collect(receiver: MemoryReceiver):  # type: ignore[no-untyped-def]
    receiver.context.cgroups.refresh()
    return receiver.collect()
