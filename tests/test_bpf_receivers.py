"""eBPF receivers against the real kernel, compared with ground truth from /proc.

Each test builds kubepods-shaped cgroup2 directories, runs Python workloads in them and
compares what the receivers report for those cgroups with what the kernel says about the
workload itself.  Needs root and BTF; skipped otherwise, with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from helpers import bpftool_ids, require_tools
from kernel_util import (
    THREADED_HOG_C,
    Workload,
    cgroup_tree,
    compile_c,
    context,
    kernel_test,
    mounts,
    points_for,
    proc_status_switches,
    stat_majflt,
    sysctl,
    uncached_file,
    workloads,
)
from kpod.receivers.bpf_maps import BpfMapsReceiver
from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.memory import MemoryConfig, MemoryReceiver
from kpod.receivers.net_tcp import NetTcpConfig, NetTcpReceiver
from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

from kpod.component import ComponentUnavailable, EmptyConfig, Receiver
from kpod.kernel import btflayout, libbpf
from kpod.kernel.bpfinfo import map_id
from kpod.kernel.ebpf import REGISTRY
from kpod.model import Batch

pytestmark = kernel_test


def collect(receiver: Receiver) -> Batch:
    """One cycle as the pipeline runs it: walk the cgroup tree, then collect."""
    receiver.context.cgroups.refresh()
    return receiver.collect()


def test_context_switches_at_least_proc_status() -> None:
    code = (
        "before = open('/proc/self/status').read()\n"
        "for _ in range(3000):\n"
        "    time.sleep(0.0002)\n"
        "after = open('/proc/self/status').read()\n"
        "print(json.dumps([before, after]), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        pod = tree.pod()
        receiver.start()
        try:
            w = Workload(code)
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            w.go()
            before, after = json.loads(w.readline())
            truth = proc_status_switches(after) - proc_status_switches(before)
            batch = collect(receiver)
            points = points_for(batch, "kpod.cpu.context.switches", pod.container_id)
            assert len(points) == 1, f"one series for the container cgroup, got {points}"
            assert points[0].cgroup.path.endswith(pod.container_dir.name)
            assert truth >= 1000  # most sleeps switched out (a short sleep can expire before it blocks)
            assert points[0].value >= truth, (points[0].value, truth)
            # A cgroup's switches are its own: not several times the truth either.
            assert points[0].value <= truth * 1.5 + 50
        finally:
            receiver.shutdown()


def test_runqueue_latency_charged_to_the_waiting_pod() -> None:
    """Two CPU hogs pinned to one CPU in pod B: B waits; an idle pod A gets no series."""
    duration = 1.0
    hog = f"end = time.monotonic() + {duration}\nwhile time.monotonic() < end:\n    pass\nprint('done', flush=True)\n"
    idle = "sys.stdin.readline()\n"
    cpu = min(os.sched_getaffinity(0))
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            sleeper = Workload(idle)
            procs.append(sleeper)
            tree.move(sleeper.pid, pod_a.container_dir)
            # A blocked reader is not woken by being moved: A never becomes runnable here.
            hogs = [Workload(hog, cpu=cpu) for _ in range(2)]
            procs.extend(hogs)
            for h in hogs:
                tree.move(h.pid, pod_b.container_dir)
            for h in hogs:
                h.go()
            for h in hogs:
                assert h.readline() == "done"
            batch = collect(receiver)
            b_points = points_for(batch, "kpod.cpu.runqueue.latency", pod_b.container_id)
            assert len(b_points) == 1
            hist = b_points[0].value
            assert b_points[0].metric.unit == "s"
            assert hist.count > 0
            # Both hogs are runnable for ~duration on one CPU: together they wait about
            # `duration` (each half of the time).  Generous limits: other tasks share the CPU.
            assert 0.25 * duration <= hist.sum <= 3 * duration, hist
            # Bucket bounds are exact: the sum lies between the lower and upper bounds' totals.
            lows = (0.0, *hist.bounds)
            highs = (*hist.bounds, float("inf"))
            assert sum(c * lo for c, lo in zip(hist.counts, lows, strict=True)) <= hist.sum
            assert hist.sum <= sum(c * hi for c, hi in zip(hist.counts, highs, strict=True) if c)
            assert len(hist.counts) == len(hist.bounds) + 1
            assert not points_for(batch, "kpod.cpu.runqueue.latency", pod_a.container_id)
            assert not points_for(batch, "kpod.cpu.context.switches", pod_a.container_id)
        finally:
            receiver.shutdown()


def test_runqueue_wait_goes_to_next_not_to_the_task_switched_out(tmp_path: Path) -> None:
    """A real-time task in pod A wakes pod B's task, then keeps the CPU for 50 ms.

    Both are pinned to one CPU.  A (SCHED_FIFO) writes to a FIFO, which wakes B, then spins
    50 ms and blocks reading B's answer: B waited those 50 ms and runs at the switch
    prev=A -> next=B.  B's answer wakes A, which preempts B at once (A waits microseconds,
    at the switch prev=B -> next=A).  So B's run-queue wait is ~10 x 50 ms and A's is tiny.
    Charging the wait to the task switched out (current, as the reference agent did) swaps
    the two, which this test catches.
    """
    rounds, spin = 10, 0.05
    a_to_b, b_to_a = tmp_path / "a_to_b", tmp_path / "b_to_a"
    os.mkfifo(a_to_b)
    os.mkfifo(b_to_a)
    cpu = max(os.sched_getaffinity(0))
    code_a = (
        "os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))\n"
        f"out = open({str(a_to_b)!r}, 'wb', buffering=0)\n"
        f"inp = open({str(b_to_a)!r}, 'rb', buffering=0)\n"
        f"for _ in range({rounds}):\n"
        "    out.write(b'x')\n"
        f"    end = time.monotonic() + {spin}\n"
        "    while time.monotonic() < end:\n"
        "        pass\n"
        "    inp.read(1)\n"
        "print('done', flush=True)\n"
    )
    code_b = (
        f"inp = open({str(a_to_b)!r}, 'rb', buffering=0)\n"
        f"out = open({str(b_to_a)!r}, 'wb', buffering=0)\n"
        f"for _ in range({rounds}):\n"
        "    inp.read(1)\n"
        "    out.write(b'y')\n"
        "print('done', flush=True)\n"
    )
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            a = Workload(code_a, cpu=cpu)
            b = Workload(code_b, cpu=cpu)
            procs.extend([a, b])
            tree.move(a.pid, pod_a.container_dir)
            tree.move(b.pid, pod_b.container_dir)
            b.go()
            a.go()
            assert a.readline(timeout=60) == "done"
            assert b.readline(timeout=60) == "done"
            batch = collect(receiver)
            (b_hist,) = [p.value for p in points_for(batch, "kpod.cpu.runqueue.latency", pod_b.container_id)]
            a_sum = sum(p.value.sum for p in points_for(batch, "kpod.cpu.runqueue.latency", pod_a.container_id))
            assert b_hist.sum >= 0.8 * rounds * spin, (b_hist, a_sum)
            # Not zero: another real-time task on that CPU (a second test run) can delay A.
            assert a_sum < 0.5 * b_hist.sum, (b_hist, a_sum)
        finally:
            receiver.shutdown()


def test_major_faults_equal_majflt() -> None:
    code_of = (
        "f = open({path!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "stat = lambda: open('/proc/self/stat').read()\n"
        "before = stat()\n"
        "total = 0\n"
        "for off in range(0, len(m), 4096):\n"
        "    total += m[off]\n"
        "after = stat()\n"
        "print(json.dumps([before, after]), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    receiver = MemoryReceiver(context("memory"), MemoryConfig())
    with uncached_file(16 << 20) as data, cgroup_tree() as tree, workloads() as procs:
        pod = tree.pod()
        receiver.start()
        try:
            w = Workload(code_of.format(path=str(data)))
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            w.go()
            before, after = json.loads(w.readline())
            truth = stat_majflt(after) - stat_majflt(before)
            assert truth > 0, "the file was not dropped from the page cache"
            batch = collect(receiver)
            points = points_for(batch, "kpod.mem.major.page.faults", pod.container_id)
            assert len(points) == 1
            assert points[0].value == truth
        finally:
            receiver.shutdown()


def test_major_faults_can_be_turned_off() -> None:
    receiver = MemoryReceiver(context("memory"), MemoryConfig(major_faults=False))
    receiver.start()
    try:
        assert "perf_event" in receiver.route() and "off (disabled by config)" in receiver.route()
        perf_fds = [fd for fd in os.listdir("/proc/self/fd") if "perf_event" in _readlink(f"/proc/self/fd/{fd}")]
        assert not perf_fds
    finally:
        receiver.shutdown()


def _readlink(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


class OomRouteReceiver(MemoryReceiver):
    """The memory receiver restricted to one OOM route: "mark" (mark_victim after the kill's
    SIGKILL, whichever mark_victim this kernel has) or "exit" (the fallback without it)."""

    route_name = "mark"

    def enabled_programs(self) -> set[str]:
        if self.route_name == "exit":
            return super().enabled_programs() - {"oom_mark_victim", "oom_mark_victim_pid", "oom_signal"}
        return super().enabled_programs()


def oom_receiver(route: str) -> MemoryReceiver:
    receiver = OomRouteReceiver(context("memory"), MemoryConfig(major_faults=False))
    receiver.route_name = route
    return receiver


def check_oom_route(receiver: MemoryReceiver, route: str) -> None:
    active = {r.program for r in receiver.routes() if r.active}
    if route == "exit":
        assert "oom_victim_exit" in active and "oom_signal" not in active, active
    else:
        assert "oom_signal" in active and active & {"oom_mark_victim", "oom_mark_victim_pid"}, active


def v1_oom_control(memcg: Path) -> dict[str, int]:
    return {k: int(v) for k, v in (line.split() for line in (memcg / "memory.oom_control").read_text().splitlines())}


@pytest.mark.parametrize("route", ["mark", "exit"])
def test_oom_kill_counted_once_for_the_victims_pod(route: str) -> None:
    memory_root = mounts().v1.get("memory")
    if memory_root is None:
        pytest.skip("no v1 memory controller on this host (pure cgroup2 needs memory.max instead)")
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
    receiver = oom_receiver(route)
    with cgroup_tree() as tree, cgroup_tree(memory_root) as v1, workloads() as procs:
        pod, bystander = tree.pod(), tree.pod()
        memcg = v1.mkdir(f"kpod-test-oom-{uuid.uuid4().hex[:12]}")
        (memcg / "memory.limit_in_bytes").write_text(str(64 << 20))
        receiver.start()
        check_oom_route(receiver, route)
        try:
            w = Workload(hog)
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            v1.move(w.pid, memcg)
            other = Workload("sys.stdin.readline()\n")
            procs.append(other)
            tree.move(other.pid, bystander.container_dir)
            w.go()
            rc = w.wait(60)
            assert rc == -9, f"the hog should be OOM-killed (SIGKILL), exit status {rc}"
            batch = collect(receiver)
            points = points_for(batch, "kpod.mem.oom.kills", pod.container_id)
            assert [p.value for p in points] == [1.0]
            # The bystander has the series too, at 0: every known container starts there.
            assert [p.value for p in points_for(batch, "kpod.mem.oom.kills", bystander.container_id)] == [0.0]
        finally:
            receiver.shutdown()


def test_map_fill_is_reported_for_hash_maps_only() -> None:
    """A fill level means "how close to losing data": an array's slots all exist from the
    start (entries = capacity, yet nothing can be lost), so arrays get no entries/capacity series
    (which would read as 100 % full and fire KpodBpfMapNearlyFull forever) and no fill in
    /debug/status, only the reason."""
    from kpod.agentmetrics import bpf_map_fill

    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    maps = BpfMapsReceiver(context("bpf_maps"), EmptyConfig())
    receiver.start()
    try:
        assert receiver.loaded is not None
        # Its own maps: the cgroup watch's shared ones are reported under their owner.
        types = {name: m.type for name, m in receiver.loaded.own_maps().items()}
        hashes = {name for name, t in types.items() if t in libbpf.HASH_TYPES}
        arrays = {name for name, t in types.items() if t == libbpf.BPF_MAP_TYPE_ARRAY}
        assert "sched_cgroups" in hashes and receiver.loaded.error_map in arrays, types
        batch = maps.collect()
        mine = set(receiver.loaded.own_maps())
        reported = {
            (p.metric.name, dict(p.attributes)["map"]) for p in batch if dict(p.attributes)["map"] in mine
        }
        for name in hashes:
            assert ("kpod.bpf.map.entries", name) in reported and ("kpod.bpf.map.capacity", name) in reported
        assert not {name for metric, name in reported if metric != "kpod.bpf.map.update.errors.total"} - hashes
        # The errors array still reports what it counts: failed inserts into the hash map.
        assert ("kpod.bpf.map.update.errors.total", "sched_cgroups") in reported
        status = {m["map"]: m for m in bpf_map_fill() if m["object"] == receiver.loaded.name}
        for name in arrays:
            assert status[name]["fill"] is None and "preallocated" in status[name]["no_fill_reason"]
        assert 0 <= status["sched_cgroups"]["fill"] < 1
    finally:
        receiver.shutdown()


@pytest.mark.parametrize("route", ["mark", "exit"])
def test_multithreaded_oom_victim_counts_one_kill_each_time(route: str, tmp_path: Path) -> None:
    """32 threads allocate at once: after each kill the other threads are marked OOM victims
    "already exiting" (no kill).  Three kills: 3, as the memcg's own oom_kill counter says
    (a mark_victim counter said 2 for the first kill of 16 threads)."""
    memory_root = mounts().v1.get("memory")
    if memory_root is None:
        pytest.skip("no v1 memory controller on this host (test_bpf_memory_v2.py covers memory.max)")
    binary = compile_c(THREADED_HOG_C, tmp_path, "hog")
    receiver = oom_receiver(route)
    with cgroup_tree() as tree, cgroup_tree(memory_root) as v1:
        pod = tree.pod()
        memcg = v1.mkdir(f"kpod-test-oom-{uuid.uuid4().hex[:12]}")
        (memcg / "memory.limit_in_bytes").write_text(str(64 << 20))
        receiver.start()
        check_oom_route(receiver, route)
        try:
            for _ in range(3):
                proc = subprocess.Popen([str(binary), "32"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                try:
                    assert proc.stdout.readline() == b"ready\n"
                    tree.move(proc.pid, pod.container_dir)
                    v1.move(proc.pid, memcg)
                    proc.stdin.write(b"g")
                    proc.stdin.flush()
                    assert proc.wait(120) == -9
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait(10)
                    proc.stdin.close()
                    proc.stdout.close()
            truth = v1_oom_control(memcg)["oom_kill"]
            batch = collect(receiver)
            assert truth == 3
            assert [p.value for p in points_for(batch, "kpod.mem.oom.kills", pod.container_id)] == [3.0]
        finally:
            receiver.shutdown()


def test_full_map_counts_update_errors() -> None:
    """With room for 2 cgroups, switches in more cgroups must fail to insert and be counted."""
    ctx = context("cpu_sched", map_max_entries=2)
    receiver = CpuSchedReceiver(ctx, EmptyConfig())
    maps = BpfMapsReceiver(context("bpf_maps"), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        receiver.start()
        try:
            for _ in range(4):
                pod = tree.pod()
                w = Workload("for _ in range(20):\n    time.sleep(0.001)\nprint('x', flush=True)\n")
                procs.append(w)
                tree.move(w.pid, pod.container_dir)
                w.go()
                w.readline()
            batch = collect(maps)
            by_map = {
                (p.metric.name, dict(p.attributes)["map"]): p.value
                for p in batch
                if dict(p.attributes).get("map") == "sched_cgroups"
            }
            assert by_map[("kpod.bpf.map.capacity", "sched_cgroups")] == 2
            assert by_map[("kpod.bpf.map.entries", "sched_cgroups")] == 2
            assert by_map[("kpod.bpf.map.update.errors.total", "sched_cgroups")] > 0
        finally:
            receiver.shutdown()


def test_entries_of_gone_cgroups_are_deleted() -> None:
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        receiver.start()
        try:
            pod = tree.pod()
            gone_id = pod.container_id
            w = Workload("for _ in range(50):\n    time.sleep(0.001)\nprint('x', flush=True)\n")
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            w.go()
            w.readline()
            w.stop()
            final = points_for(collect(receiver), "kpod.cpu.context.switches", gone_id)
            assert final
            index = receiver.context.cgroups
            index.gone_retention_s = 1.0
            tree.cleanup()  # the pod goes away
            switches = receiver.loaded.obj.maps["sched_cgroups"]

            def keys() -> set[int]:
                return {int.from_bytes(k[:8], "little") for k in switches.keys()}  # noqa: SIM118 - a BPF map

            # Gone but retained: its final count is still reported, under its path.
            (point,) = points_for(collect(receiver), "kpod.cpu.context.switches", gone_id)
            assert point.cgroup.gone and point.cgroup.path == final[0].cgroup.path
            assert point.value >= final[0].value
            assert gone_id in keys()
            time.sleep(1.1)  # past the retention: let go
            index._walked_at = 0.0  # (a miss walks again at most once a second)
            assert not points_for(collect(receiver), "kpod.cpu.context.switches", gone_id)
            assert gone_id in keys()  # first miss: kept one cycle (the index may just be behind)
            collect(receiver)  # second miss: deleted
            assert gone_id not in keys()
        finally:
            receiver.shutdown()


def test_program_cost_self_metrics_when_bpf_stats_enabled() -> None:
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    with sysctl("/proc/sys/kernel/bpf_stats_enabled", "1"):
        receiver.start()
        try:
            time.sleep(0.2)
            batch = collect(receiver)
            runs = {dict(p.attributes)["program"]: p.value for p in batch if p.metric.name == "kpod.bpf.program.runs"}
            secs = {
                dict(p.attributes)["program"]: p.value for p in batch if p.metric.name == "kpod.bpf.program.run.seconds"
            }
            assert runs["sched_switch"] > 0
            assert 0 < secs["sched_switch"] < 1.0
            assert all(p.cgroup is None for p in batch if p.metric.name.startswith("kpod.bpf.program"))
        finally:
            receiver.shutdown()


def test_shutdown_leaves_no_program_link_map_or_perf_event() -> None:
    def perf_fds() -> int:
        return sum("perf_event" in _readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd"))

    perf_before = perf_fds()
    receivers = [
        CpuSchedReceiver(context("cpu_sched"), EmptyConfig()),
        MemoryReceiver(context("memory"), MemoryConfig()),
    ]
    prog_ids: set[int] = set()
    map_ids: set[int] = set()
    link_count_before = len(bpftool_ids("link"))
    try:
        for r in receivers:
            r.start()
            loaded = r.loaded
            assert loaded is not None
            prog_ids |= {s.id for s in loaded.program_stats().values()}
            map_ids |= {map_id(m) for m in loaded.obj.maps.values()}
        assert prog_ids <= bpftool_ids("prog") and map_ids <= bpftool_ids("map")
        assert perf_fds() > perf_before
        assert len(bpftool_ids("link")) > link_count_before
    finally:
        for r in receivers:
            r.shutdown()
            r.shutdown()  # idempotent
    # The kernel frees programs and maps once the last reference goes, partly from deferred
    # work after an RCU grace period: give it a moment.
    deadline = time.monotonic() + 10
    while (prog_ids & bpftool_ids("prog") or map_ids & bpftool_ids("map")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not prog_ids & bpftool_ids("prog")
    assert not map_ids & bpftool_ids("map")
    assert perf_fds() == perf_before
    assert not [o for o in REGISTRY.objects() if o.name in ("cpu_sched", "mem")]


def test_without_bpf_capabilities_start_says_why() -> None:
    """A process without CAP_BPF/CAP_PERFMON/CAP_SYS_ADMIN gets a one-line reason, not a crash."""
    require_tools("setpriv")
    code = (
        "from kpod.component import ComponentUnavailable, EmptyConfig\n"
        "from kpod.receivers.cpu_sched import CpuSchedReceiver\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "from kernel_util import context\n"
        "r = CpuSchedReceiver(context('cpu_sched'), EmptyConfig())\n"
        "print(r.preflight())\n"
        "try:\n"
        "    r.start()\n"
        "except ComponentUnavailable as exc:\n"
        "    print('unavailable:', exc)\n"
        "r.shutdown()\n"
    )
    out = subprocess.run(
        ["setpriv", "--bounding-set", "-bpf,-perfmon,-sys_admin", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        check=True,
    ).stdout.splitlines()
    assert out == [
        "needs root or CAP_BPF+CAP_PERFMON to load tracing BPF programs",
        "unavailable: needs root or CAP_BPF+CAP_PERFMON to load tracing BPF programs",
    ]


def test_shutdown_during_collection_is_safe() -> None:
    """A collection abandoned by a cycle timeout can still be running when shutdown comes."""
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    maps = BpfMapsReceiver(context("bpf_maps"), EmptyConfig())
    receiver.start()
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop() -> None:
        try:
            while not stop.is_set():
                receiver.collect()
                maps.collect()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=loop) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    receiver.shutdown()
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(10)
    assert not errors
    assert len(receiver.collect()) == 0


def test_unavailable_reason_is_one_line(tmp_path: Path) -> None:
    receiver = CpuSchedReceiver(context("cpu_sched", program_dir=str(tmp_path)), EmptyConfig())
    reason = receiver.preflight()
    assert reason and "\n" not in reason and "make bpf" in reason
    with pytest.raises(ComponentUnavailable, match="make bpf"):
        receiver.start()
    receiver.shutdown()  # safe after a failed start


def test_tracepoint_signature_guard() -> None:
    """A program reading a task pointer is not loaded where the tracepoint passes something else."""
    from kpod.kernel.ebpf import tp_args_mismatch

    assert tp_args_mismatch("tp_btf/sched_switch", ("bool", "struct task_struct *")) is None
    reason = tp_args_mismatch("tp_btf/sched_switch", ("int",))
    assert reason and "passes (bool, struct task_struct *" in reason
    assert "no tp_btf/no_such_tp" in (tp_args_mismatch("tp_btf/no_such_tp", ("int",)) or "")


def test_route_names_the_hooks() -> None:
    receiver = CpuSchedReceiver(context("cpu_sched"), EmptyConfig())
    assert "tp_btf/sched_switch" in receiver.route()
    memory = MemoryReceiver(context("memory"), MemoryConfig())
    route = memory.route()
    assert "tp_btf/mark_victim" in route and "perf_event" in route
    assert libbpf.version().startswith("1.")


def _status_after_first_collection(receiver: Receiver) -> dict[str, object]:
    """The receiver's /debug/status section after its first collection, which drops the
    kernel's parsed BTF; fails if the status parses it again."""
    collect(receiver)
    assert btflayout._vmlinux is None, "the first collection keeps the kernel's parsed BTF"
    status = receiver.status()
    assert btflayout._vmlinux is None, "status() parsed the kernel's BTF again (about 6 MiB kept for good)"
    return status


@pytest.mark.parametrize("name", ["cpu_sched", "syscall", "net_tcp"])
def test_status_does_not_parse_the_kernel_btf_again(name: str) -> None:
    """/debug/status asks each eBPF receiver for its choices (stamps, socket cgroup layout),
    which some make from the kernel's BTF: asked after the first collection, that parsed it
    again and kept it for the agent's life (RSS +6 MiB after one status request)."""
    receiver: Receiver = {
        "cpu_sched": lambda: CpuSchedReceiver(context("cpu_sched"), EmptyConfig()),
        "syscall": lambda: SyscallReceiver(context("syscall"), SyscallConfig()),
        "net_tcp": lambda: NetTcpReceiver(context("net_tcp"), NetTcpConfig()),
    }[name]()
    receiver.start()
    try:
        status = _status_after_first_collection(receiver)
        assert status["loaded"] is True and status["choices"], status
        # Started again (as after a failure): loading parses the BTF; the next collection drops it.
        receiver.shutdown()
        receiver.start()
        assert _status_after_first_collection(receiver)["choices"] == status["choices"]
    finally:
        receiver.shutdown()
