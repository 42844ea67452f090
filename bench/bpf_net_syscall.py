"""Kernel cost of the TCP and syscall eBPF programs, side by side with bpftrace one-liners.

    .venv/bin/python -m bench.bpf_net_syscall [--rounds 5] [--write]

Needs root, BTF, perf, bpftool, bpftrace, taskset and a C compiler.  What it measures:
- per-event kernel cost from bpf_stats (run_time_ns / run_cnt, kernel.bpf_stats_enabled=1,
  restored afterwards) of sys_enter + sys_exit for a tracked syscall (read of /dev/zero) and an
  untracked one (getppid), and of each TCP program under a loopback TCP load (ping-pong,
  connect/accept/close, retransmissions provoked in a private network namespace);
- the same hooks as bpftrace one-liners (same hook, same per-cgroup key, same filters),
  measured the same way; bpftrace 0.17 has only classic tracepoints, so tracefs is mounted for
  it when it is not (and unmounted again);
- the design choices of syscall.bpf.c against their alternatives, built here from the same
  source: start stamps in a thread-id hash instead of task storage, raw_tp instead of tp_btf;
- throughput of `perf bench sched pipe` and of tight syscall loops, pinned to one CPU, with
  no agent, the standard profile's eBPF programs (cpu_sched, memory, net_tcp) and the
  comprehensive profile's (+ syscall, default tracked set), bpf_stats off, as ratios;
- load + attach time and memlock of net.bpf.o and syscall.bpf.o.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.memory import MemoryConfig, MemoryReceiver
from kpod.receivers.net_tcp import NetTcpConfig, NetTcpReceiver
from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

from bench import sections
from bench.sections import Measured, NotMeasured
from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.mounts import parse_mountinfo_cgroups
from kpod.component import Context, EmptyConfig
from kpod.kernel import libbpf
from kpod.kernel.bpfinfo import map_id, program_stats
from kpod.kernel.ebpf import BpfReceiver
from kpod.kernel.syscalls import default_tracked, resolve_syscalls
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings

REPO = Path(__file__).resolve().parents[1]
STATS = "/proc/sys/kernel/bpf_stats_enabled"
TRACEFS = "/sys/kernel/tracing"
TARGET_NS = 150.0
# The TCP load: ping-pongs, connect/accept/close cycles, connections losing every packet for LOSS_S.
PINGPONGS = 20000
CONNECTS = 2000
LOSSY_CONNECTIONS = 8
LOSS_S = 1.5

SYSLOOP_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* n calls of one syscall; prints ns per call.  clock_gettime is a vDSO call, no syscall. */
int main(int argc, char **argv)
{
	long n = atol(argv[2]), i;
	int fd = open("/dev/zero", O_RDONLY);
	struct timespec a, b;
	char c;

	clock_gettime(CLOCK_MONOTONIC, &a);
	if (!strcmp(argv[1], "read")) {
		for (i = 0; i < n; i++)
			if (read(fd, &c, 1) != 1)
				return 1;
	} else {
		for (i = 0; i < n; i++)
			getppid();
	}
	clock_gettime(CLOCK_MONOTONIC, &b);
	printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""

DROP_ALL_XDP = """
struct xdp_md;
__attribute__((section("xdp"), used)) int drop_all(struct xdp_md *ctx) { return 1; /* XDP_DROP */ }
char LICENSE[] __attribute__((section("license"), used)) = "GPL";
"""

# The floor: what bpf_stats reports for a program that does nothing on the same hooks (the
# clock reads around each run and the dispatch are in every figure below).
EMPTY_SYS_PROGRAMS = """
#define SEC(name) __attribute__((section(name), used))
SEC("tp_btf/sys_enter") int empty_enter(void *ctx) { return 0; }
SEC("tp_btf/sys_exit") int empty_exit(void *ctx) { return 0; }
char LICENSE[] SEC("license") = "GPL";
"""

SOCK_CGROUP = "((struct sock *)args->{ptr})->sk_cgrp_data.cgroup->kn->id"


def bpftrace_tcp_script() -> str:
    """What net.bpf.c does, as bpftrace one-liners: same hooks, same filters, socket's cgroup."""
    sk, skaddr = SOCK_CGROUP.format(ptr="sk"), SOCK_CGROUP.format(ptr="skaddr")
    return " ".join(
        [
            "tracepoint:sock:sock_send_length /args->protocol == 6 && args->ret > 0/ "
            f"{{ @sent[{sk}] = sum(args->ret); }}",
            "tracepoint:sock:sock_recv_length /args->protocol == 6 && args->ret > 0 && !(args->flags & 2)/ "
            f"{{ @recv[{sk}] = sum(args->ret); }}",
            f"tracepoint:tcp:tcp_retransmit_skb /args->err == 0/ {{ @retrans[{skaddr}] = count(); }}",
            "tracepoint:sock:inet_sock_set_state /args->protocol == 6 && args->newstate == 1 && "
            f"(args->oldstate == 2 || args->oldstate == 3)/ {{ @conn[{skaddr}, args->oldstate] = count(); }}",
            f"tracepoint:tcp:tcp_probe /args->srtt/ {{ @rtt[{skaddr}] = hist(args->srtt * 1000); }}",
        ]
    )


def bpftrace_syscall_script(numbers: list[int]) -> str:
    """What syscall.bpf.c does: the same id filter on both hooks, per (cgroup, id) count,
    errors and log2 latency histogram, start stamp per thread."""
    pred = " || ".join(f"args->id == {n}" for n in sorted(numbers))
    return (
        f"tracepoint:raw_syscalls:sys_enter /{pred}/ {{ @start[tid] = nsecs; }} "
        f"tracepoint:raw_syscalls:sys_exit /({pred}) && @start[tid]/ {{ $d = nsecs - @start[tid]; "
        "delete(@start[tid]); @count[cgroup, args->id] = count(); "
        "if (args->ret < 0) { @errors[cgroup, args->id] = count(); } @lat[cgroup, args->id] = hist($d); }"
    )


# --- helpers -----------------------------------------------------------------------------------


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def prog_table() -> dict[int, dict[str, Any]]:
    return {p["id"]: p for p in json.loads(sh("bpftool", "-j", "prog", "show") or "[]")}


def cost(before: dict[int, dict], after: dict[int, dict], prog_id: int) -> tuple[float, int]:
    """(ns per run, runs) of one program between two snapshots."""
    b, a = before.get(prog_id, {}), after.get(prog_id, {})
    runs = a.get("run_cnt", 0) - b.get("run_cnt", 0)
    ns = a.get("run_time_ns", 0) - b.get("run_time_ns", 0)
    return (ns / runs if runs else float("nan"), runs)


@contextlib.contextmanager
def sysctl(path: str, value: str) -> Iterator[None]:
    with open(path) as f:
        previous = f.read().strip()
    with open(path, "w") as f:
        f.write(value)
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(previous)


@contextlib.contextmanager
def tracefs_mounted() -> Iterator[None]:
    mounted_here = False
    if not os.path.isdir(os.path.join(TRACEFS, "events")):
        subprocess.run(["mount", "-t", "tracefs", "none", TRACEFS], check=True)
        mounted_here = True
    try:
        yield
    finally:
        if mounted_here:
            subprocess.run(["umount", TRACEFS], check=False)


def context(component_id: str, **bpf: Any) -> Context:
    settings = KpodSettings()
    for key, value in bpf.items():
        setattr(settings.bpf, key, value)
    with open("/proc/self/mountinfo") as f:
        root = parse_mountinfo_cgroups(f.read()).unified or "/sys/fs/cgroup"
    return Context(component_id, settings, CgroupIndex(root), SelfMetrics())


@contextlib.contextmanager
def receivers(*made: BpfReceiver) -> Iterator[list[BpfReceiver]]:
    started: list[BpfReceiver] = []
    try:
        for r in made:
            r.start()
            started.append(r)
        yield started
    finally:
        for r in started:
            r.shutdown()


def standard() -> list[BpfReceiver]:
    return [
        CpuSchedReceiver(context("cpu_sched"), EmptyConfig()),
        MemoryReceiver(context("memory"), MemoryConfig()),
        NetTcpReceiver(context("net_tcp"), NetTcpConfig()),
    ]


def comprehensive() -> list[BpfReceiver]:
    return [*standard(), SyscallReceiver(context("syscall"), SyscallConfig())]


def prog_ids(started: list[BpfReceiver]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in started:
        assert r.loaded is not None
        for name, stats in r.loaded.program_stats().items():
            out[name] = stats.id
    return out


class Bpftrace:
    """A bpftrace script running in the background; its programs found via `bpftool perf`."""

    def __init__(self, script: str, expected: int) -> None:
        self.proc = subprocess.Popen(
            ["bpftrace", "-e", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.ids: dict[str, int] = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bpftrace exited: {self.proc.stderr.read() if self.proc.stderr else ''}")
            perf = json.loads(sh("bpftool", "-j", "perf", "show") or "[]")
            mine = {p["tracepoint"]: p["prog_id"] for p in perf if p.get("pid") == self.proc.pid and "tracepoint" in p}
            if len(mine) >= expected:
                self.ids = mine
                time.sleep(0.3)
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("bpftrace did not attach in 60 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --- workloads -----------------------------------------------------------------------------------


def build(tmp: Path) -> dict[str, Path]:
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler")
    (tmp / "sysloop.c").write_text(SYSLOOP_C)
    subprocess.run([cc, "-O2", "-o", str(tmp / "sysloop"), str(tmp / "sysloop.c")], check=True)
    (tmp / "drop.bpf.c").write_text(DROP_ALL_XDP)
    (tmp / "empty.bpf.c").write_text(EMPTY_SYS_PROGRAMS)
    for name in ("drop", "empty"):
        subprocess.run(
            ["clang", "-O2", "-g", "-target", "bpf", "-c", str(tmp / f"{name}.bpf.c"), "-o", str(tmp / f"{name}.o")],
            check=True,
        )
    # syscall.bpf.c's raw_tp alternative in its own directory as syscall.bpf.o (the tid-hash
    # stamps are a load-time route of the shipped object: kpod.bpf.force_routes: tid_hash).
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    out = {"sysloop": tmp / "sysloop", "drop": tmp / "drop.o", "empty": tmp / "empty.o"}
    for variant, macro in (("rawtp", "KPOD_SYS_RAW_TP"),):
        directory = tmp / variant
        directory.mkdir()
        subprocess.run(
            ["clang", "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", f"-D{macro}", "-I", str(REPO / "bpf"),
             "-c", str(REPO / "bpf" / "syscall.bpf.c"), "-o", str(directory / "syscall.bpf.o")],
            check=True,
        )  # fmt: skip
        out[variant] = directory
    return out


def sysloop(binary: Path, mode: str, n: int, cpu: int) -> float:
    """ns per call of `mode` (read of /dev/zero, or getppid), pinned to `cpu`."""
    return float(sh("taskset", "-c", str(cpu), str(binary), mode, str(n)).strip())


def pipe_bench(loops: int, cpu: int) -> float:
    out = sh("taskset", "-c", str(cpu), "perf", "bench", "sched", "pipe", "-l", str(loops))
    match = re.search(r"([\d.]+) ops/sec", out)
    if not match:
        raise RuntimeError(f"perf bench output not understood: {out!r}")
    return float(match.group(1))


def in_child(fn: Callable[[], None]) -> None:
    """Run fn in a forked child (its own sockets, maybe its own netns); wait for it."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except BaseException:
            code = 1
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("TCP workload failed")


def tcp_pingpong(n: int) -> None:
    """n one-byte request/response round trips over loopback: sends, receives, tcp_probe."""

    def run() -> None:
        ls = socket.socket()
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)
        client = socket.create_connection(ls.getsockname())
        server, _ = ls.accept()
        for _ in range(n):
            client.send(b"p")
            server.recv(1)
            server.send(b"q")
            client.recv(1)
        for s in (client, server, ls):
            s.close()

    in_child(run)


def tcp_connects(n: int) -> None:
    """n connect/accept/close cycles: two transitions to ESTABLISHED each."""

    def run() -> None:
        ls = socket.socket()
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("127.0.0.1", 0))
        ls.listen(64)
        for _ in range(n):
            c = socket.create_connection(ls.getsockname())
            a, _ = ls.accept()
            a.close()
            c.close()
        ls.close()

    in_child(run)


@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    name = f"kpod-bench-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def tcp_retransmissions(drop: Path, connections: int) -> None:
    """Loss on the loopback of a private netns (generic XDP drop) for LOSS_S: retransmissions."""
    with private_netns() as ns:

        def run() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                raise OSError(ctypes.get_errno(), "setns")
            ls = socket.socket()
            ls.bind(("127.0.0.1", 0))
            ls.listen(connections)
            pairs = []
            for _ in range(connections):
                c = socket.create_connection(ls.getsockname())
                a, _ = ls.accept()
                pairs.append((c, a))
            ip = ["ip", "-n", ns, "link", "set", "dev", "lo", "xdpgeneric"]
            subprocess.run([*ip, "obj", str(drop), "sec", "xdp"], check=True)
            try:
                for c, _ in pairs:
                    c.send(b"x" * 100)
                time.sleep(LOSS_S)
            finally:
                subprocess.run([*ip, "off"], check=True)
            for _, a in pairs:
                a.settimeout(30)
                a.recv(100)

        in_child(run)


def tcp_load(drop: Path) -> None:
    tcp_pingpong(PINGPONGS)
    tcp_connects(CONNECTS)
    tcp_retransmissions(drop, LOSSY_CONNECTIONS)


# --- measurements -------------------------------------------------------------------------------


@contextlib.contextmanager
def empty_programs(path: Path) -> Iterator[dict[str, int]]:
    with libbpf.BpfObject.open(str(path)) as empty:
        empty.load()
        for program in empty.programs.values():
            program.attach()
        yield {
            "sys_enter": program_stats(empty.programs["empty_enter"]).id,
            "sys_exit": program_stats(empty.programs["empty_exit"]).id,
        }


@contextlib.contextmanager
def receiver_programs(*made: BpfReceiver) -> Iterator[dict[str, int]]:
    with receivers(*made) as started:
        yield prog_ids(started)


@contextlib.contextmanager
def bpftrace_programs(script: str, expected: int) -> Iterator[dict[str, int]]:
    bt = Bpftrace(script, expected)
    try:
        yield bt.ids
    finally:
        bt.stop()


Costs = dict[str, tuple[float, int]]  # program or hook -> (ns per run, runs)


def per_event(built: dict[str, Path], cpu: int, n: int, reps: int) -> dict[str, Any]:
    """Each implementation measured `reps` times, interleaved; the least disturbed rep is kept
    (other load on the machine only ever adds: interrupts land inside a program's run time)."""
    loop = built["sysloop"]
    numbers = list(resolve_syscalls(default_tracked()).values())
    syscall_impls: dict[str, Callable[[], contextlib.AbstractContextManager[dict[str, int]]]] = {
        "sys_empty": lambda: empty_programs(built["empty"]),
        "sys_kpod": lambda: receiver_programs(SyscallReceiver(context("syscall"), SyscallConfig())),
        "sys_kpod_hash": lambda: receiver_programs(
            SyscallReceiver(context("syscall", force_routes=["tid_hash"]), SyscallConfig())
        ),
        "sys_kpod_rawtp": lambda: receiver_programs(
            SyscallReceiver(context("syscall", program_dir=str(built["rawtp"])), SyscallConfig())
        ),
        "sys_bpftrace": lambda: bpftrace_programs(bpftrace_syscall_script(numbers), 2),
    }
    tcp_impls: dict[str, Callable[[], contextlib.AbstractContextManager[dict[str, int]]]] = {
        "tcp_kpod": lambda: receiver_programs(NetTcpReceiver(context("net_tcp"), NetTcpConfig())),
        "tcp_bpftrace": lambda: bpftrace_programs(bpftrace_tcp_script(), 5),
    }
    sys_samples: dict[str, dict[str, list[Costs]]] = {k: {"read": [], "getppid": []} for k in syscall_impls}
    tcp_samples: dict[str, list[Costs]] = {k: [] for k in tcp_impls}
    with tracefs_mounted():
        for _ in range(reps):
            for label, make in syscall_impls.items():
                with make() as ids:
                    for mode in ("read", "getppid"):
                        before = prog_table()
                        sysloop(loop, mode, n, cpu)
                        after = prog_table()
                        sys_samples[label][mode].append({name: cost(before, after, pid) for name, pid in ids.items()})
            for label, make in tcp_impls.items():
                with make() as ids:
                    before = prog_table()
                    tcp_load(built["drop"])
                    after = prog_table()
                    tcp_samples[label].append({name: cost(before, after, pid) for name, pid in ids.items()})
    res: dict[str, Any] = {"reps": reps}
    for label, modes in sys_samples.items():
        res[label] = {
            mode: min(samples, key=lambda c: c["sys_enter"][0] + c["sys_exit"][0]) for mode, samples in modes.items()
        }
    for label, samples in tcp_samples.items():
        res[label] = {name: min((c[name] for c in samples), key=lambda v: v[0]) for name in samples[0]}
    return res


@contextlib.contextmanager
def bpftrace_syscalls() -> Iterator[None]:
    numbers = list(resolve_syscalls(default_tracked()).values())
    bt = Bpftrace(bpftrace_syscall_script(numbers), 2)
    try:
        yield
    finally:
        bt.stop()


def throughput(built: dict[str, Path], cpu: int, rounds: int, loops: int, n: int) -> dict[str, dict[str, list[float]]]:
    """Samples over interleaved rounds (so drift and other load hit every configuration alike):
    pipe ops/s, ns per read / getppid call."""
    configs: dict[str, Callable[[], contextlib.AbstractContextManager[Any]]] = {
        "no agent": contextlib.nullcontext,
        "standard (cpu_sched, memory, net_tcp)": lambda: receivers(*standard()),
        "comprehensive (+ syscall)": lambda: receivers(*comprehensive()),
        # bpftrace's syscall one-liner on the same loops (classic tracepoints: its whole cost).
        "bpftrace syscall one-liner": bpftrace_syscalls,
    }
    samples: dict[str, dict[str, list[float]]] = {c: {"pipe": [], "read": [], "getppid": []} for c in configs}
    with tracefs_mounted():
        for _ in range(rounds):
            for config, make in configs.items():
                with make():
                    samples[config]["pipe"].append(pipe_bench(loops, cpu))
                    samples[config]["read"].append(sysloop(built["sysloop"], "read", n, cpu))
                    samples[config]["getppid"].append(sysloop(built["sysloop"], "getppid", n, cpu))
    return samples


def load_and_memlock(runs: int) -> tuple[dict[str, list[float]], dict[str, int]]:
    times: dict[str, list[float]] = {"net": [], "syscall": []}
    mem: dict[str, int] = {}
    for _ in range(runs):
        for name, make in (
            ("net", lambda: NetTcpReceiver(context("net_tcp"), NetTcpConfig())),
            ("syscall", lambda: SyscallReceiver(context("syscall"), SyscallConfig())),
        ):
            r = make()
            t0 = time.perf_counter()
            r.start()
            times[name].append(time.perf_counter() - t0)
            try:
                if not mem.get(f"{name}:done"):
                    assert r.loaded is not None
                    ids = {map_id(m): map_name for map_name, m in r.loaded.obj.maps.items()}
                    table = {m["id"]: m for m in json.loads(sh("bpftool", "-j", "map", "show"))}
                    for map_id, map_name in ids.items():
                        mem[map_name] = int(table[map_id].get("bytes_memlock", 0))
                    mem[f"{name}:done"] = 1
            finally:
                r.shutdown()
    return times, {k: v for k, v in mem.items() if not k.endswith(":done")}


# --- report ---------------------------------------------------------------------------------------


def _verdict(ns: float, target: float = TARGET_NS) -> str:
    return "meets" if ns <= target else "**MISSED**"


def render(data: dict[str, Any]) -> str:
    per, thr, loads, mem = data["per_event"], data["throughput"], data["load_s"], data["memlock"]
    cpu, calls, reps, rounds, loops = data["cpu"], data["calls"], data["reps"], data["rounds"], data["loops"]

    def pair(table: dict[str, dict[str, list[float]]], mode: str) -> tuple[float, float, float, int]:
        enter, exit_ = table[mode]["sys_enter"], table[mode]["sys_exit"]
        return enter[0], exit_[0], enter[0] + exit_[0], int(min(enter[1], exit_[1]))

    lines = [
        "## eBPF TCP and syscall programs: kernel cost per event (bench/bpf_net_syscall.py)",
        "",
        f"Tools: libbpf {data['libbpf']}, {data['bpftrace']}.  ",
        f"Loads pinned to CPU {cpu} with taskset.  Per-event cost = bpf_stats run_time_ns / run_cnt "
        "(kernel.bpf_stats_enabled=1 during those runs only, restored afterwards).",
        "",
        "### Syscalls: sys_enter + sys_exit per syscall",
        "",
        f"Tracked: `read` of /dev/zero (1 byte, in the default tracked set); untracked: `getppid`; "
        f"{calls:,} calls each; least disturbed of {reps} interleaved repetitions.  "
        f"Target: <= {TARGET_NS:.0f} ns for a tracked syscall, far less untracked.",
        "",
        "| implementation | syscall | sys_enter ns | sys_exit ns | together ns | runs | target |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = (
        ("sys_empty", "floor: empty tp_btf programs"),
        ("sys_kpod", "kpod (tp_btf, task-storage stamps) as shipped"),
        ("sys_kpod_hash", "variant: stamps in a tid hash"),
        ("sys_kpod_rawtp", "variant: raw_tp"),
        ("sys_bpftrace", "bpftrace one-liner (tracepoint:raw_syscalls)"),
    )
    for key, label in labels:
        for mode, what in (("read", "tracked read"), ("getppid", "untracked getppid")):
            e, x, both, runs = pair(per[key], mode)
            target = _verdict(both) if key == "sys_kpod" and mode == "read" else ""
            lines.append(f"| {label} | {what} | {e:.1f} | {x:.1f} | **{both:.1f}** | {runs:,} | {target} |")
    ours_t, bt_t = pair(per["sys_kpod"], "read")[2], pair(per["sys_bpftrace"], "read")[2]
    ours_u, bt_u = pair(per["sys_kpod"], "getppid")[2], pair(per["sys_bpftrace"], "getppid")[2]
    floor_u = pair(per["sys_empty"], "getppid")[2]
    lines += [
        "",
        f"Ratio kpod / bpftrace, tracked: **{ours_t / bt_t:.2f}**; untracked: **{ours_u / bt_u:.2f}** (target < 1).  "
        f"Untracked / tracked for kpod: {ours_u / ours_t:.2f}.  Above the floor of empty programs on the same "
        f"hooks ({floor_u:.1f} ns for the pair): kpod tracked {ours_t - floor_u:.1f} ns, untracked "
        f"{ours_u - floor_u:.1f} ns; bpftrace tracked {bt_t - floor_u:.1f} ns, untracked {bt_u - floor_u:.1f} ns.",
        "",
        "### TCP programs",
        "",
        f"Load: {PINGPONGS:,} one-byte ping-pongs over loopback, {CONNECTS:,} connect/accept/close, and "
        f"{LOSSY_CONNECTIONS} connections losing every packet for {LOSS_S:g} s in a private network namespace "
        f"(generic-XDP drop on its loopback); least disturbed of {reps} interleaved repetitions per hook.",
        "",
        "| hook | kpod program | kpod ns (runs) | bpftrace ns (runs) | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    tcp_hooks = (
        ("sock_send_length", "tcp_send_length"),
        ("sock_recv_length", "tcp_recv_length"),
        ("tcp_probe", "tcp_probe"),
        ("inet_sock_set_state", "tcp_set_state"),
        ("tcp_retransmit_skb", "tcp_retransmit"),
    )
    for tp, prog in tcp_hooks:
        ours = per["tcp_kpod"].get(prog, (float("nan"), 0))
        theirs = per["tcp_bpftrace"].get(tp, (float("nan"), 0))
        ratio = ours[0] / theirs[0] if theirs[1] and ours[1] else float("nan")
        lines.append(
            f"| {tp} | {prog} | {ours[0]:.1f} ({ours[1]:,}) | {theirs[0]:.1f} ({theirs[1]:,}) | {ratio:.2f} | "
            f"{_verdict(ours[0]) if ours[1] else 'no events'} |"
        )
    lines += [
        "",
        "### Throughput with the profiles' eBPF programs loaded (bpf_stats off)",
        "",
        f"`taskset -c {cpu} perf bench sched pipe -l {loops}` (ops/s) and a C loop of {calls:,} calls "
        f"(ns per call), {rounds} interleaved rounds: best (fastest round) and median.  standard = cpu_sched "
        "+ memory + net_tcp; comprehensive = standard + syscall (default tracked set, which includes read "
        "and write, so every pipe op is two tracked syscalls).",
        "",
        "| configuration | pipe ops/s best (median) | ratio best (median) | read ns/call best (median) "
        "| ratio | getppid ns/call best (median) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    best = {c: {"pipe": max(v["pipe"]), "read": min(v["read"]), "getppid": min(v["getppid"])} for c, v in thr.items()}
    med = {c: {k: statistics.median(x) for k, x in v.items()} for c, v in thr.items()}
    b0, m0 = best["no agent"], med["no agent"]
    for config in thr:
        b, m = best[config], med[config]
        lines.append(
            f"| {config} | {b['pipe']:,.0f} ({m['pipe']:,.0f}) | {b['pipe'] / b0['pipe']:.3f} "
            f"({m['pipe'] / m0['pipe']:.3f}) | {b['read']:.0f} ({m['read']:.0f}) | {b0['read'] / b['read']:.3f} "
            f"({m0['read'] / m['read']:.3f}) | {b['getppid']:.0f} ({m['getppid']:.0f}) | "
            f"{b0['getppid'] / b['getppid']:.3f} ({m0['getppid'] / m['getppid']:.3f}) |"
        )
    bare_read, bare_getppid = b0["read"], b0["getppid"]
    lines += [
        "",
        "Ratios are throughput relative to no agent (1.000 = no cost; ns ratios inverted so lower = slower).",
        "",
        f"bpf_stats time per call against the bare call (best no-agent round): a tracked `read` spends "
        f"{ours_t:.0f} ns in kpod's two programs, {ours_t / bare_read:.0%} of a bare call ({bare_read:.0f} ns); "
        f"an untracked `getppid` {ours_u:.0f} ns, {ours_u / bare_getppid:.0%} of a bare call "
        f"({bare_getppid:.0f} ns), of which {floor_u:.0f} ns is the empty programs' floor.",
        "",
        "### Load time and map memory",
        "",
        f"Start (open, BTF layouts, load, attach) of net_tcp: median {statistics.median(loads['net']) * 1000:.1f} ms; "
        f"syscall (incl. writing the filter): median {statistics.median(loads['syscall']) * 1000:.1f} ms "
        f"({len(loads['net'])} runs each).",
        "",
        f"| map | memlock bytes ({data['max_entries']:,} entries per cgroup map) |",
        "|---|---|",
    ]
    lines += [f"| {name} | {b:,} |" for name, b in sorted(mem.items())]
    lines += [f"| **total** | **{sum(mem.values()):,}** ({sum(mem.values()) / 2**20:.2f} MiB) |", ""]
    return "\n".join(lines)


def measure(rounds: int = 5, reps: int = 3, loops: int = 100000, calls: int = 1000000) -> Measured:
    if os.geteuid() != 0 or not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise NotMeasured("needs root and /sys/kernel/btf/vmlinux")
    for tool in ("perf", "bpftool", "bpftrace", "taskset", "clang", "ip"):
        if shutil.which(tool) is None:
            raise NotMeasured(f"{tool} is not installed (make system-packages)")
    cpu = max(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="kpod-bench-") as tmp:
        built = build(Path(tmp))
        with sysctl(STATS, "1"):
            per = per_event(built, cpu, calls, reps)
        with sysctl(STATS, "0"):
            thr = throughput(built, cpu, rounds, loops, calls)
        loads, mem = load_and_memlock(5)
    data = {
        "rounds": rounds,
        "reps": reps,
        "loops": loops,
        "calls": calls,
        "cpu": cpu,
        "libbpf": libbpf.version(),
        "bpftrace": sh("bpftrace", "--version").strip(),
        "max_entries": KpodSettings().bpf.map_max_entries,
        "per_event": per,
        "throughput": thr,
        "load_s": loads,
        "memlock": mem,
    }
    command = ".venv/bin/python -m bench.bpf_net_syscall" + "".join(
        f" --{name} {value}"
        for name, value, default in (("rounds", rounds, 5), ("reps", reps, 3), ("loops", loops, 100000),
                                     ("calls", calls, 1000000))
        if value != default
    )  # fmt: skip
    return Measured(command, data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="throughput rounds")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each per-event measurement")
    parser.add_argument("--loops", type=int, default=100000, help="perf bench sched pipe -l")
    parser.add_argument("--calls", type=int, default=1000000, help="syscalls per loop")
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/bpf_net_syscall.md")
    args = parser.parse_args(argv)
    try:
        measured = measure(args.rounds, args.reps, args.loops, args.calls)
    except NotMeasured as reason:
        raise SystemExit(f"bench.bpf_net_syscall: {reason}") from None
    if args.write:
        print(sections.write("bpf_net_syscall", measured).read_text())
    else:
        print(render(measured.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
