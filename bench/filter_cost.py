"""What the in-kernel pod filter saves: per-event cost of a context switch and of a tracked
syscall of a task outside pods, local mode (every cgroup counted) against Kubernetes modes
(only pods and containers count, kpod_charge() in bpf/kpod.bpf.h), side by side in one run.

    .venv/bin/python -m bench.filter_cost [--rounds 5] [--loops 200000] [--calls 2000000] [--write]

Each round runs, in turn, with the cpu_sched and syscall receivers loaded (syscall tracking
getppid only):

    local         index scope "all": what every handler did before the filter (and still does
                  in local mode), the workload in a cgroup of no pod (a system service's place)
    k8s_non_pod   index scope "kubepods": the same workload in the same cgroup, now filtered
    k8s_pod       index scope "kubepods": the workload in a pod's container (counted)
    none          no programs: the workload's own floor

The workload, pinned to one CPU: `perf bench sched pipe -l LOOPS` (two tasks switching) and
`perf bench syscall basic -l CALLS` (getppid in a loop), then CHURN cgroups made and removed
at once (mkdir + rmdir, in batches of 250): in `local` and `k8s_non_pod` in the service's
cgroup (local mode reports every cgroup2 mkdir and rmdir; Kubernetes modes none of these), in
`k8s_pod` as containers of the pod (an entry in kpod_watched and two ring-buffer records each),
in `none` in the pod.  The events are drained after each batch as a cycle drains them
(CgroupWatch.drain: ring buffer to decoded events); its time per event is userspace's cost.  Per-event cost is bpf_stats
run_time_ns / run_cnt of each program over the workload's run (kernel.bpf_stats_enabled=1,
restored after; the runs count every event on the machine meanwhile, the workload's are nearly
all of them); the workload's own time per operation is compared with `none`.  Medians over
rounds.  Needs root, BTF and perf.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench import sections
from bench.sections import Measured, NotMeasured

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

STATS = "/proc/sys/kernel/bpf_stats_enabled"
SYSCTL_LOCK = "/tmp/kpod-test-sysctl.lock"  # the lock tests/kernel_util.sysctl and the other benches take
MODES = ("local", "k8s_non_pod", "k8s_pod", "none")
PROGRAMS = ("sched_switch", "sched_wakeup", "sys_enter", "sys_exit", "cgroup_mkdir", "cgroup_rmdir")
SWITCH_PROGRAMS = PROGRAMS[:4]
CGROUP_PROGRAMS = PROGRAMS[4:]
# Made and removed per batch, drained after each: 500 records of ~200 bytes fit the 256 KiB
# ring buffer with room for the rest of the machine's cgroups meanwhile.
CHURN_BATCH = 250


def _perf(cgroup: Path, cpu: int, *args: str) -> str:
    """Run perf bench inside `cgroup` (the shell enters it first), pinned to `cpu`."""
    command = " ".join(["exec", "taskset", "-c", str(cpu), "perf", "bench", *args])
    return subprocess.run(
        ["/bin/sh", "-c", f"echo $$ > {cgroup}/cgroup.procs && {command}"], check=True, capture_output=True, text=True
    ).stdout


def workload(cgroup: Path, cpu: int, loops: int, calls: int) -> tuple[float, float]:
    """(microseconds per pipe op, nanoseconds per getppid) of one run in `cgroup`."""
    pipe = _perf(cgroup, cpu, "sched", "pipe", "-l", str(loops))
    usecs = float(re.search(r"([\d.]+) usecs/op", pipe).group(1))  # type: ignore[union-attr]
    basic = _perf(cgroup, cpu, "syscall", "basic", "-l", str(calls))
    per_call = float(re.search(r"([\d.]+) usecs/op", basic).group(1)) * 1000  # type: ignore[union-attr]
    return usecs, per_call


def churn(parent: Path, count: int, drain: Any = None) -> tuple[float, float, int]:
    """mkdir + rmdir of `count` cgroups below `parent`, in batches, `drain` (the watch's) after
    each: (ns per mkdir + rmdir pair, ns spent draining, events drained)."""
    spent = drained_ns = events = 0
    for start in range(0, count, CHURN_BATCH):
        names = [parent / f"kpod-bench-{i}" for i in range(start, min(count, start + CHURN_BATCH))]
        began = time.perf_counter_ns()
        for path in names:
            os.mkdir(path)
            os.rmdir(path)
        spent += time.perf_counter_ns() - began
        if drain is not None:
            began = time.perf_counter_ns()
            events += len(drain())
            drained_ns += time.perf_counter_ns() - began
    return spent / count, drained_ns, events


@contextlib.contextmanager
def receivers(scope: str) -> Iterator[tuple[dict[str, Any], Any]]:
    """cpu_sched and syscall (getppid) over one index of `scope`, with their shared cgroup
    watch; yields (program -> Program, the CgroupWatch)."""
    from kernel_util import context
    from kpod.receivers.cpu_sched import CpuSchedReceiver
    from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

    from kpod.component import Context, EmptyConfig
    from kpod.selfmetrics import SelfMetrics

    ctx = context("syscall", scope=scope)
    syscalls = SyscallReceiver(ctx, SyscallConfig(tracked_syscalls=["getppid"]))
    sched = CpuSchedReceiver(Context("cpu_sched", ctx.settings, ctx.cgroups, SelfMetrics()), EmptyConfig())
    syscalls.start()
    try:
        sched.start()
        try:
            assert syscalls.loaded is not None and sched.loaded is not None
            watch = syscalls.watch
            assert watch is not None and watch.loaded is not None, "the cgroup watch did not load"
            programs = {**sched.loaded.obj.programs, **syscalls.loaded.obj.programs, **watch.loaded.obj.programs}
            yield {name: programs[name] for name in PROGRAMS}, watch
        finally:
            sched.shutdown()
    finally:
        syscalls.shutdown()


def one_run(mode: str, cgroups: dict[str, Path], cpu: int, loops: int, calls: int, cgroups_made: int) -> dict[str, Any]:
    from kpod.kernel.bpfinfo import program_stats

    where = cgroups["pod" if mode in ("k8s_pod", "none") else "service"]
    if mode == "none":
        usecs, per_call = workload(where, cpu, loops, calls)
        pair_ns, _, _ = churn(cgroups["pod_dir"], cgroups_made)
        return {"pipe_usecs_per_op": usecs, "getppid_ns": per_call, "mkdir_rmdir_ns": pair_ns, "programs": {}}
    with receivers("all" if mode == "local" else "kubepods") as (programs, watch):
        watch.drain()  # what the start left
        before = {name: program_stats(p) for name, p in programs.items()}
        usecs, per_call = workload(where, cpu, loops, calls)
        switched = {name: program_stats(p) for name, p in programs.items()}
        # A container's place for k8s_pod: a child of the pod (a child of the container would be
        # a nested cgroup, which gets neither an entry nor an event).
        pair_ns, drained_ns, events = churn(
            cgroups["pod_dir"] if mode == "k8s_pod" else where, cgroups_made, watch.drain
        )
        after = {name: program_stats(p) for name, p in programs.items()}
    # Each program over its own part of the run: switches and syscalls over the perf
    # workloads, the cgroup hooks over the churn.
    stats = {
        name: [end[name].run_time_ns - start[name].run_time_ns, end[name].run_cnt - start[name].run_cnt]
        for name in programs
        for start, end in [(before, switched) if name in SWITCH_PROGRAMS else (switched, after)]
    }
    return {
        "pipe_usecs_per_op": usecs,
        "getppid_ns": per_call,
        "mkdir_rmdir_ns": pair_ns,
        "drain_ns": drained_ns,
        "events": events,
        "programs": stats,
    }


def measure(rounds: int = 5, loops: int = 200_000, calls: int = 2_000_000, cgroups_made: int = 1000) -> Measured:
    if os.geteuid() != 0 or not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise NotMeasured("bench.filter_cost needs root and /sys/kernel/btf/vmlinux")
    if shutil.which("perf") is None:
        raise NotMeasured("bench.filter_cost needs perf (make system-packages)")
    from kernel_util import cgroup_tree

    cpu = max(os.sched_getaffinity(0))
    per_round: list[dict[str, dict[str, Any]]] = []
    with cgroup_tree() as tree, open(SYSCTL_LOCK, "a") as lock:
        pod = tree.pod()
        service = tree.mkdir(f"kpod-bench-{uuid.uuid4().hex[:8]}.service")
        cgroups = {"pod": pod.container_dir, "pod_dir": pod.pod_dir, "service": service}
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(STATS) as f:
            previous = f.read().strip()
        with open(STATS, "w") as f:
            f.write("1")
        try:
            for r in range(rounds):
                order = MODES[r % len(MODES) :] + MODES[: r % len(MODES)]  # nobody always first
                per_round.append({mode: one_run(mode, cgroups, cpu, loops, calls, cgroups_made) for mode in order})
        finally:
            with open(STATS, "w") as f:
                f.write(previous)
    data = {
        "rounds": rounds,
        "loops": loops,
        "calls": calls,
        "cgroups_made": cgroups_made,
        "cpu": cpu,
        "kernel": platform.release(),
        "load_end": os.getloadavg()[0],
        "per_round": per_round,
    }
    return Measured(
        f".venv/bin/python -m bench.filter_cost --rounds {rounds} --loops {loops} --calls {calls}"
        f" --cgroups {cgroups_made}",
        data,
    )


def _per_event(round_: dict[str, Any], mode: str, program: str) -> float:
    ns, runs = round_[mode]["programs"][program]
    return ns / runs if runs else float("nan")


def render(data: dict[str, Any]) -> str:
    rounds = data["per_round"]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    rows = []
    for program in PROGRAMS:
        cells = [f"{med([_per_event(r, mode, program) for r in rounds]):.0f}" for mode in MODES[:3]]
        saved = med([_per_event(r, "local", program) - _per_event(r, "k8s_non_pod", program) for r in rounds])
        rows.append(f"| {program} | {' | '.join(cells)} | {saved:.0f} |")
    pipe = {mode: med([r[mode]["pipe_usecs_per_op"] for r in rounds]) for mode in MODES}
    call = {mode: med([r[mode]["getppid_ns"] for r in rounds]) for mode in MODES}
    pair = {mode: med([r[mode]["mkdir_rmdir_ns"] for r in rounds]) for mode in MODES}
    over = {mode: (pipe[mode] - pipe["none"]) * 1000 for mode in MODES[:3]}
    call_over = {mode: call[mode] - call["none"] for mode in MODES[:3]}
    pair_over = {mode: pair[mode] - pair["none"] for mode in MODES[:3]}
    events = {mode: med([r[mode]["events"] for r in rounds]) for mode in MODES[:3]}
    # Per event only where the churn made events (Kubernetes, not a pod: none are expected; the
    # few there are come from other cgroups on the machine).
    churned = data["cgroups_made"]  # half of the mkdir + rmdir records the churn makes
    drain = {
        mode: f"{sum(r[mode]['drain_ns'] for r in rounds) / sum(r[mode]['events'] for r in rounds):.0f}"
        if events[mode] >= churned
        else "- (no churn events)"
        for mode in MODES[:3]
    }
    lines = [
        "## The pod filter and cgroup events: kernel cost per event (bench/filter_cost.py)",
        "",
        f"Kernel {data['kernel']}, {data['rounds']} rounds, `perf bench sched pipe -l {data['loops']}` and "
        f"`perf bench syscall basic -l {data['calls']}` (getppid, the only tracked syscall) pinned to CPU "
        f"{data['cpu']}, then {data['cgroups_made']} cgroups made and removed at once; load average at the end "
        f"{data['load_end']:.1f}.  bpf_stats run_time_ns / run_cnt of each program over its part of each run "
        "(all events on the machine meanwhile), medians over rounds.",
        "",
        "| program | local: not a pod, counted (ns/event) | Kubernetes: not a pod (ns/event) | "
        "Kubernetes: in a pod (ns/event) | saved per non-pod event (ns, median of per-round differences) |",
        "|---|---|---|---|---|",
        *rows,
        "",
        "| workload | no programs | local: not a pod | Kubernetes: not a pod | Kubernetes: in a pod |",
        "|---|---|---|---|---|",
        "| pipe round trip (2 switches), us/op | "
        + " | ".join([f"{pipe['none']:.2f}", *(f"{pipe[m]:.2f} ({over[m]:+.0f} ns)" for m in MODES[:3])])
        + " |",
        "| getppid, ns/call | "
        + " | ".join([f"{call['none']:.0f}", *(f"{call[m]:.0f} ({call_over[m]:+.0f})" for m in MODES[:3])])
        + " |",
        "| mkdir + rmdir of a cgroup (pod: a container), ns/pair | "
        + " | ".join([f"{pair['none']:.0f}", *(f"{pair[m]:.0f} ({pair_over[m]:+.0f})" for m in MODES[:3])])
        + " |",
        "| cgroup events drained per run (ring buffer records) | - | "
        + " | ".join(f"{events[m]:.0f}" for m in MODES[:3])
        + " |",
        "| userspace drain (CgroupWatch.drain), ns per event, all rounds | - | "
        + " | ".join(drain[m] for m in MODES[:3])
        + " |",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--loops", type=int, default=200_000)
    parser.add_argument("--calls", type=int, default=2_000_000)
    parser.add_argument("--cgroups", type=int, default=1000, help="cgroups made and removed per mode and round")
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/filter.md")
    parser.add_argument("--json", metavar="FILE", help="write the command and raw figures to FILE")
    args = parser.parse_args()
    def run() -> sections.Measured:
        return measure(args.rounds, args.loops, args.calls, args.cgroups)

    return sections.finish_main("filter", run, render, args.write, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
