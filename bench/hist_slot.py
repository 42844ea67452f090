"""What bucketing at native-histogram boundaries costs in the kernel, per event.

    .venv/bin/python -m bench.hist_slot [--events 1000000] [--rounds 7] [--write]

kpod.bpf.h's kpod_hist_slot() puts a nanosecond value into the slot of its Prometheus native
(schema 0) bucket, (2^(i-1), 2^i] seconds: a log2 plus one exact comparison against the one
native boundary inside that power of two of nanoseconds.  The slots it replaced were plain log2
over nanoseconds (bit length), which straddle the native boundaries.  Three programs on one
hook, side by side, each adding a pseudo-random value (the same distribution, spread over
2^9..2^40 ns) to its own histogram with the same three atomic adds:

    slot_none    no slot computation (always slot 0): the floor
    slot_log2    the previous log2 slot (bit length - 10, as kpod.bpf.h had it)
    slot_native  kpod_hist_slot() from bpf/kpod.bpf.h

The hook is tp_btf/task_rename, which only comm changes fire: this process renames itself
`--events` times (prctl PR_SET_NAME).  Per-event cost is bpf_stats run_time_ns / run_cnt
(kernel.bpf_stats_enabled=1 while measuring, restored after), per round; the programs are
attached in a rotated order each round, so none always runs first; medians over rounds.
Needs root, BTF and clang.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from bench import sections
from bench.sections import Measured, NotMeasured
from kpod.kernel import libbpf
from kpod.kernel.bpfinfo import program_stats

REPO = Path(__file__).resolve().parents[1]
STATS = "/proc/sys/kernel/bpf_stats_enabled"
SYSCTL_LOCK = "/tmp/kpod-test-sysctl.lock"  # the lock tests/kernel_util.sysctl and bench.bpf_cost take
PR_SET_NAME = 15
PROGRAMS = ("slot_none", "slot_log2", "slot_native")

SOURCE = r"""
#include "kpod.bpf.h"

/* The slots kpod.bpf.h had before: log2 over ns, slot k = values of bit length k + 10. */
static __always_inline __u64 log2_slot(__u64 v)
{
	__u64 bits = v ? kpod_log2(v) + 1 : 0;

	if (bits <= 10)
		return 0;
	bits -= 10;
	return bits < KPOD_HIST_SLOTS ? bits : KPOD_HIST_SLOTS - 1;
}

struct kpod_hist h_none, h_log2, h_native;

/* A value spread over 2^9..2^40 ns: every slot gets used, branches cannot be learnt. */
static __always_inline __u64 sample(void)
{
	__u64 r = bpf_get_prandom_u32();

	return (r << 8) >> (r & 31);
}

static __always_inline void add_at(struct kpod_hist *h, __u64 slot, __u64 v)
{
	barrier_var(slot);
	if (slot >= KPOD_HIST_SLOTS)
		return;
	__sync_fetch_and_add(&h->slots[slot], 1);
	__sync_fetch_and_add(&h->sum, v);
	__sync_fetch_and_add(&h->count, 1);
}

SEC("tp_btf/task_rename")
int slot_none(void *ctx)
{
	__u64 v = sample();

	add_at(&h_none, 0, v);
	return 0;
}

SEC("tp_btf/task_rename")
int slot_log2(void *ctx)
{
	__u64 v = sample();

	add_at(&h_log2, log2_slot(v), v);
	return 0;
}

SEC("tp_btf/task_rename")
int slot_native(void *ctx)
{
	__u64 v = sample();

	add_at(&h_native, kpod_hist_slot(v), v);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


def build(directory: Path) -> Path:
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    src, obj = directory / "hist_slot.bpf.c", directory / "hist_slot.bpf.o"
    src.write_text(SOURCE)
    subprocess.run(
        ["clang", "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-D__TARGET_ARCH_{arch}",
         "-I", str(REPO / "bpf"), "-c", str(src), "-o", str(obj)],
        check=True,
    )  # fmt: skip
    return obj


def rename_loop(events: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    names = [b"kpod-hist-a", b"kpod-hist-b"]
    for i in range(events):
        prctl(PR_SET_NAME, names[i & 1], 0, 0, 0)


def one_round(obj_path: Path, events: int, order: list[str]) -> dict[str, tuple[float, int]]:
    """(ns per event, runs) per program for one round, the programs attached in `order`."""
    with libbpf.BpfObject.open(str(obj_path)) as obj:
        obj.load()
        for name in order:
            obj.programs[name].attach()
        before = {name: program_stats(obj.programs[name]) for name in PROGRAMS}
        rename_loop(events)
        after = {name: program_stats(obj.programs[name]) for name in PROGRAMS}
    out = {}
    for name in PROGRAMS:
        runs = after[name].run_cnt - before[name].run_cnt
        ns = after[name].run_time_ns - before[name].run_time_ns
        out[name] = (ns / runs if runs else float("nan"), runs)
    return out


def measure(events: int = 1_000_000, rounds: int = 7) -> Measured:
    if os.geteuid() != 0 or not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise NotMeasured("bench.hist_slot needs root and /sys/kernel/btf/vmlinux")
    if shutil.which("clang") is None:
        raise NotMeasured("bench.hist_slot needs clang (make system-packages)")
    own_comm = Path("/proc/self/comm").read_bytes().strip()
    per_round: list[dict[str, tuple[float, int]]] = []
    with tempfile.TemporaryDirectory() as tmp, open(SYSCTL_LOCK, "a") as lock:
        obj_path = build(Path(tmp))
        fcntl.flock(lock, fcntl.LOCK_EX)
        with open(STATS) as f:
            previous = f.read().strip()
        with open(STATS, "w") as f:
            f.write("1")
        try:
            for r in range(rounds):
                order = list(PROGRAMS[r % 3 :] + PROGRAMS[: r % 3])
                per_round.append(one_round(obj_path, events, order))
        finally:
            with open(STATS, "w") as f:
                f.write(previous)
            ctypes.CDLL(None).prctl(PR_SET_NAME, own_comm[:15], 0, 0, 0)
    data = {
        "events": events,
        "rounds": rounds,
        "libbpf": libbpf.version(),
        "kernel": platform.release(),
        "load_end": os.getloadavg()[0],
        "per_round": {name: [round_[name] for round_ in per_round] for name in PROGRAMS},
    }
    return Measured(f".venv/bin/python -m bench.hist_slot --events {events} --rounds {rounds}", data)


def render(data: dict[str, Any]) -> str:
    per_round = data["per_round"]
    median = {name: statistics.median(ns for ns, _ in per_round[name]) for name in PROGRAMS}
    # The differences per round (the programs of one round ran on the same events), then their median.
    extra = {
        name: statistics.median(a[0] - b[0] for a, b in zip(per_round[name], per_round["slot_none"], strict=True))
        for name in ("slot_log2", "slot_native")
    }
    native_vs_log2 = statistics.median(
        a[0] - b[0] for a, b in zip(per_round["slot_native"], per_round["slot_log2"], strict=True)
    )
    runs = sum(r for _, r in per_round["slot_native"])
    lines = [
        "## Histogram slots at native-histogram boundaries: kernel cost per event (bench/hist_slot.py)",
        "",
        f"Kernel {data['kernel']}, libbpf {data['libbpf']}, load average at the end {data['load_end']:.1f}.  "
        f"Three programs on tp_btf/task_rename, {data['events']:,} renames per round, {data['rounds']} rounds "
        f"({runs:,} runs of each program); bpf_stats run_time_ns / run_cnt per round, medians over rounds.",
        "",
        "| program | slot computation | ns per event (median) | over no slot (median of per-round differences) |",
        "|---|---|---|---|",
        f"| slot_none | none (the floor: random value + 3 atomic adds) | {median['slot_none']:.1f} | - |",
        f"| slot_log2 | log2 of ns (the slots before) | {median['slot_log2']:.1f} | {extra['slot_log2']:+.1f} ns |",
        f"| slot_native | kpod_hist_slot: log2 + one exact comparison | {median['slot_native']:.1f} | "
        f"{extra['slot_native']:+.1f} ns |",
        "",
        f"Native-boundary slots cost {native_vs_log2:+.1f} ns per event over the log2 slots they replaced "
        "(median of per-round differences).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/hist.md")
    parser.add_argument("--json", metavar="FILE", help="write the command and raw figures to FILE")
    args = parser.parse_args()
    return sections.finish_main("hist", lambda: measure(args.events, args.rounds), render, args.write, args.json)


if __name__ == "__main__":
    raise SystemExit(main())
