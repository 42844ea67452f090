"""Kernel cost of kpod's BPF programs, side by side with equivalent bpftrace one-liners.

    .venv/bin/python -m bench.bpf_cost [--loops 200000] [--runs 5] [--write]

Needs root and BTF.  What it measures:
- per-event kernel cost of each program from bpf_stats (run_time_ns / run_cnt, sysctl
  kernel.bpf_stats_enabled=1, restored afterwards) while `perf bench sched pipe` pinned to one
  CPU generates context switches;
- the same for bpftrace one-liners on the same events with the same per-cgroup key (bpftrace
  0.17 has no raw/BTF tracepoints, so it uses tracepoint:sched:*; tracefs is mounted for it if
  it is not, and unmounted again);
- throughput of `perf bench sched pipe` with no agent, with kpod's programs, with bpftrace;
- load + attach time of all of kpod's objects (median of runs, kernel BTF parse included);
- memlock of kpod's maps at the default 10,240 entries (bpftool's bytes_memlock).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.memory import MemoryReceiver

from bench import sections
from bench.sections import Measured, NotMeasured
from kpod.kernel import btflayout, libbpf
from kpod.kernel.bpfinfo import map_id
from kpod.kernel.ebpf import load_object

REPO = Path(__file__).resolve().parents[1]
STATS = "/proc/sys/kernel/bpf_stats_enabled"
SYSCTL_LOCK = "/tmp/kpod-test-sysctl.lock"
TRACEFS = "/sys/kernel/tracing"
MAX_ENTRIES = 10240
# Targets of issue 3.
SWITCH_TARGET_NS = 150.0
LOAD_TARGET_MS = 100.0
MEMLOCK_TARGET_MIB = 8.0

# Same hook, same kind of key (a cgroup id; bpftrace can only name current's, the task switched out).
BPFTRACE_COUNT = "tracepoint:sched:sched_switch { @switches[cgroup] = count(); }"
# What cpu_sched.bpf.c does, as far as bpftrace's tracepoint args allow: enqueue stamps on
# wakeup/wakeup_new/preempted prev, a log2 histogram at switch-in.  The tracepoint gives no
# pointer to `next`, so the histogram key is the current (prev) cgroup: the same key cost.
BPFTRACE_RUNQLAT = (
    "tracepoint:sched:sched_wakeup,tracepoint:sched:sched_wakeup_new { @q[args->pid] = nsecs; } "
    "tracepoint:sched:sched_switch { @switches[cgroup] = count(); "
    "if (args->prev_state == 0) { @q[args->prev_pid] = nsecs; } "
    "$t = @q[args->next_pid]; if ($t) { @lat[cgroup] = hist(nsecs - $t); delete(@q[args->next_pid]); } }"
)


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def prog_table() -> dict[int, dict]:
    return {p["id"]: p for p in json.loads(sh("bpftool", "-j", "prog", "show") or "[]")}


def pipe_bench(loops: int, cpu: int) -> float:
    """ops/s of perf bench sched pipe with both tasks on one CPU (every op = 2 switches)."""
    out = sh("taskset", "-c", str(cpu), "perf", "bench", "sched", "pipe", "-l", str(loops))
    return float(re.search(r"([\d.]+) ops/sec", out).group(1))


class BpftraceRun:
    def __init__(self, script: str) -> None:
        self.script = script
        self.before = set(prog_table())
        self.proc = subprocess.Popen(
            ["bpftrace", "-e", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        deadline = time.monotonic() + 30
        self.ids: list[int] = []
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bpftrace exited: {self.proc.stdout.read() if self.proc.stdout else ''}")
            new = {i: p for i, p in prog_table().items() if i not in self.before and p.get("type") == "tracepoint"}
            if len(new) >= self.script.count("tracepoint:"):
                self.ids = sorted(new)
                time.sleep(0.5)
                return
            time.sleep(0.1)
        raise RuntimeError("bpftrace did not attach")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class KpodRun:
    """cpu_sched as the agent runs it (the mem object's programs do not fire on this load)."""

    def __init__(self) -> None:
        from kpod.cgroup.index import CgroupIndex
        from kpod.component import Context, EmptyConfig
        from kpod.selfmetrics import SelfMetrics
        from kpod.settings import KpodSettings

        ctx = Context("cpu_sched", KpodSettings(), CgroupIndex("/"), SelfMetrics())
        self.receiver = CpuSchedReceiver(ctx, EmptyConfig())
        self.receiver.start()
        assert self.receiver.loaded is not None
        self.names = {s.id: name for name, s in self.receiver.loaded.program_stats().items()}
        self.ids = sorted(self.names)

    def stop(self) -> None:
        self.receiver.shutdown()


def measure_costs(loops: int, runs: int, cpu: int) -> dict[str, Any]:
    """Rounds of: no agent, kpod, bpftrace count-only, bpftrace runqlat-equivalent.

    Interleaving the configurations in every round spreads the drift of a shared VM over all
    of them instead of penalising whichever ran last.  Per-event costs add up the bpf_stats
    deltas of all rounds.
    """
    configs = {
        "kpod": KpodRun,
        "bpftrace_count": lambda: BpftraceRun(BPFTRACE_COUNT),
        "bpftrace_runqlat": lambda: BpftraceRun(BPFTRACE_RUNQLAT),
    }
    ops: dict[str, list[float]] = {"baseline": [], **{k: [] for k in configs}}
    costs: dict[str, dict[str, list[float]]] = {k: {} for k in configs}  # name -> [ns, runs]
    mounted_here = False
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "none", TRACEFS], check=True)
        mounted_here = True
    try:
        for _ in range(runs):
            ops["baseline"].append(pipe_bench(loops, cpu))
            for label, make in configs.items():
                run = make()
                try:
                    before = prog_table()
                    ops[label].append(pipe_bench(loops, cpu))
                    after = prog_table()
                    names = getattr(run, "names", None) or {i: after[i].get("name", str(i)) for i in run.ids}
                    for pid in run.ids:
                        b, a = before.get(pid, {}), after.get(pid, {})
                        acc = costs[label].setdefault(names[pid], [0.0, 0])
                        acc[0] += a.get("run_time_ns", 0) - b.get("run_time_ns", 0)
                        acc[1] += a.get("run_cnt", 0) - b.get("run_cnt", 0)
                finally:
                    run.stop()
    finally:
        if mounted_here:
            subprocess.run(["umount", TRACEFS], check=False)
    results: dict = {"baseline_ops": statistics.median(ops["baseline"])}
    for label in configs:
        results[f"{label}_ops"] = statistics.median(ops[label])
        results[label] = {n: (ns / cnt if cnt else float("nan"), int(cnt)) for n, (ns, cnt) in costs[label].items()}
    return results


def _load_objects() -> list[Any]:
    """cpu_sched.bpf.o and mem.bpf.o loaded and attached as their receivers load them."""
    return [
        load_object(name, receiver.program_specs, {s.program for s in receiver.program_specs}, MAX_ENTRIES)
        for name, receiver in (("cpu_sched", CpuSchedReceiver), ("mem", MemoryReceiver))
    ]


def load_times(runs: int) -> tuple[list[float], list[float]]:
    """Wall time and CPU time (user + system: the verifier runs in our syscalls) per load.

    CPU time hardly depends on what else the machine runs; wall time does.
    """
    times, cpu_times = [], []
    for _ in range(runs):
        btflayout.release_vmlinux()  # include the kernel BTF parse, as a fresh agent pays it
        c0 = time.process_time()
        t0 = time.perf_counter()
        objs = _load_objects()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        for o in objs:
            o.close()
    btflayout.release_vmlinux()
    return times, cpu_times


def memlock() -> dict[str, int]:
    objs = _load_objects()
    try:
        ids = {map_id(m): name for o in objs for name, m in o.obj.maps.items()}
        table = {m["id"]: m for m in json.loads(sh("bpftool", "-j", "map", "show"))}
        return {ids[i]: int(table[i].get("bytes_memlock", 0)) for i in ids}
    finally:
        for o in objs:
            o.close()


def render(data: dict[str, Any]) -> str:
    def ns(table: dict[str, list[float]], name: str) -> str:
        v = table.get(name)
        return f"{v[0]:.0f} ns ({v[1]:,} runs)" if v else "-"

    res = data["results"]
    loops, runs, cpu = data["loops"], data["runs"], data["cpu"]
    kpod = res["kpod"]
    bt_count = res["bpftrace_count"]
    bt_rq = res["bpftrace_runqlat"]
    bt_rq_switch = next((v for k, v in bt_rq.items() if "switch" in k), None)
    bt_count_switch = next(iter(bt_count.values()), None)
    ours = kpod["sched_switch"][0]
    wall, cpu_times = data["load_s"], data["load_cpu_s"]
    lines = [
        "## eBPF programs: kernel cost per event (bench/bpf_cost.py)",
        "",
        f"Tools: libbpf {data['libbpf']}, {data['bpftrace']}; load average at the end {data['load_end']:.1f}.  ",
        f"Load: `perf bench sched pipe -l {loops}` pinned to CPU {cpu}; {runs} rounds, each running "
        "no agent, kpod, and both bpftrace scripts in turn (medians of ops/s); per-event cost is "
        "bpf_stats run_time_ns / run_cnt summed over all rounds.",
        "",
        "| handler | hook | ns per event |",
        "|---|---|---|",
        f"| kpod sched_switch (switch count + enqueue + run-queue histogram) | tp_btf/sched_switch | "
        f"{ns(kpod, 'sched_switch')} |",
        f"| kpod sched_wakeup | tp_btf/sched_wakeup | {ns(kpod, 'sched_wakeup')} |",
        f"| bpftrace `@switches[cgroup] = count()` | tracepoint:sched:sched_switch | "
        f"{bt_count_switch[0]:.0f} ns ({bt_count_switch[1]:,} runs) |"
        if bt_count_switch
        else "| bpftrace count | - | - |",
        f"| bpftrace runqlat-equivalent sched_switch | tracepoint:sched:sched_switch | "
        f"{bt_rq_switch[0]:.0f} ns ({bt_rq_switch[1]:,} runs) |"
        if bt_rq_switch
        else "| bpftrace runqlat | - | - |",
        "",
        f"Ratio kpod sched_switch / bpftrace runqlat-equivalent sched_switch: **{ours / bt_rq_switch[0]:.2f}**"
        if bt_rq_switch
        else "",
        f"Ratio kpod sched_switch / bpftrace count-only sched_switch: **{ours / bt_count_switch[0]:.2f}**"
        if bt_count_switch
        else "",
        "",
        "Throughput of the same pipe benchmark (ops/s, median; ratio to no agent).  BPF ns per op: "
        "bpf_stats run time of all programs of the configuration over all rounds / ops; the last column "
        "is that time as a fraction of the no-agent op time.",
        "",
        "| configuration | ops/s | ratio | BPF ns per op | BPF time / op time |",
        "|---|---|---|---|---|",
    ]
    base = res["baseline_ops"]
    total_ops = loops * runs
    for label, key, table in (
        ("no agent", "baseline_ops", None),
        ("kpod cpu_sched", "kpod_ops", kpod),
        ("bpftrace count-only", "bpftrace_count_ops", bt_count),
        ("bpftrace runqlat-equivalent", "bpftrace_runqlat_ops", bt_rq),
    ):
        if table is None:
            lines.append(f"| {label} | {res[key]:,.0f} | 1.000 | - | - |")
            continue
        per_op = sum(ns * cnt for ns, cnt in table.values() if cnt) / total_ops
        lines.append(
            f"| {label} | {res[key]:,.0f} | {res[key] / base:.3f} | {per_op:.0f} | {per_op * base / 1e9:.1%} |"
        )
    mem = data["memlock"]
    total = sum(mem.values())
    load_ms = statistics.median(wall) * 1000
    lines += [
        "",
        f"Load + attach of cpu_sched.bpf.o and mem.bpf.o (open, BTF layouts, load, attach incl. one perf "
        f"event per CPU, kernel BTF parse included), {len(wall)} runs: wall time median "
        f"{load_ms:.0f} ms (min {min(wall) * 1000:.0f}, max "
        f"{max(wall) * 1000:.0f}); CPU time (user + system, verifier included) median "
        f"{statistics.median(cpu_times) * 1000:.0f} ms (min {min(cpu_times) * 1000:.0f}).",
        "",
        f"Memlock of kpod's maps at {MAX_ENTRIES:,} entries (bpftool bytes_memlock):",
        "",
        "| map | bytes |",
        "|---|---|",
    ]
    lines += [f"| {name} | {b:,} |" for name, b in sorted(mem.items())]
    lines += [f"| **total** | **{total:,}** ({total / 2**20:.2f} MiB) |", ""]
    lines += [
        "Targets (issue 3):",
        "",
        f"- sched_switch <= {SWITCH_TARGET_NS:g} ns per event: {ours:.0f} ns, {_met(ours <= SWITCH_TARGET_NS)}",
        f"- kpod / bpftrace runqlat-equivalent < 1: {ours / bt_rq_switch[0]:.2f}, {_met(ours < bt_rq_switch[0])}"
        if bt_rq_switch
        else "- kpod / bpftrace < 1: bpftrace did not run",
        f"- load + attach <= {LOAD_TARGET_MS:g} ms: median {load_ms:.0f} ms, {_met(load_ms <= LOAD_TARGET_MS)}",
        f"- memlock of the standard profile's maps <= {MEMLOCK_TARGET_MIB:g} MiB: cpu_sched and mem here "
        f"{total / 2**20:.2f} MiB; net_tcp's maps are in the bpf_net_syscall section",
        "",
    ]
    return "\n".join(lines)


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def measure(loops: int = 200000, runs: int = 5) -> Measured:
    if os.geteuid() != 0 or not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise NotMeasured("bench.bpf_cost needs root and /sys/kernel/btf/vmlinux")
    for tool in ("perf", "bpftool", "bpftrace", "taskset"):
        if shutil.which(tool) is None:
            raise NotMeasured(f"bench.bpf_cost needs {tool} (make system-packages)")
    cpu = max(os.sched_getaffinity(0))
    # The same host-wide lock as tests/kernel_util.sysctl: runs that save and restore this
    # sysctl under each other would leave it changed.
    with open(SYSCTL_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(STATS) as f:
            previous = f.read().strip()
        with open(STATS, "w") as f:
            f.write("1")
        try:
            res = measure_costs(loops, runs, cpu)
            wall, cpu_times = load_times(max(runs, 5))
            mem = memlock()
        finally:
            with open(STATS, "w") as f:
                f.write(previous)
    data = {
        "loops": loops,
        "runs": runs,
        "cpu": cpu,
        "libbpf": libbpf.version(),
        "bpftrace": sh("bpftrace", "--version").strip(),
        "load_end": os.getloadavg()[0],
        "results": res,
        "load_s": wall,
        "load_cpu_s": cpu_times,
        "memlock": mem,
    }
    return Measured(f".venv/bin/python -m bench.bpf_cost --loops {loops} --runs {runs}", data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loops", type=int, default=200000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/bpf.md")
    parser.add_argument("--json", metavar="FILE", help="write the command and raw figures to FILE")
    args = parser.parse_args()
    return sections.finish_main("bpf", lambda: measure(args.loops, args.runs), render, args.write, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
