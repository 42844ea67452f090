"""What the older kernels' routes cost: each fallback against the route it stands in for,
side by side on the same kernel, in one run.

    .venv/bin/python -m bench.bpf_routes [--reps 3] [--kernels host,vm,vm-arm64]
    .venv/bin/python -m bench.bpf_routes --here --json out.json     (what runs inside a VM)

Needs root, BTF and clang.  Per kernel (this host's, and Debian 12's 6.1 in `make test-vm`'s
x86 VM and `make test-vm-arm64`'s arm64 VM when those are prepared), each pair is loaded one
after the other, `reps` times interleaved, the least disturbed repetition kept:

- cpu_sched and syscall: per-task stamps in task storage (5.13+) vs a tid hash
  (kpod.bpf.force_routes: tid_hash, what the loader takes before 5.13);
- net_tcp bytes: the kernel's first byte route (tp_btf/sock_*_length on 6.3+, fexit on 6.1
  x86) vs the kprobe at entry + kretprobe at return (force_routes: kprobe; arm64 before 6.4);
- net_tcp socket cgroup: sk_cgrp_data.cgroup (5.15+) vs the pre-5.15 union (sock_cgroup_val);
- net_tcp RTT: tcp_probe through bpf_rdonly_cast (6.2+) vs one probe read.

Two figures per route: the programs' own time per event from bpf_stats (run_time_ns / run_cnt,
kernel.bpf_stats_enabled=1 during the run, restored afterwards), summed over the programs one
event runs (a kretprobe route: its entry kprobe and its kretprobe); and the workload's wall time
per operation with the route loaded, which also holds what bpf_stats does not see (the kprobe
and kretprobe trampolines).  Workloads, pinned to one CPU: pipe ping-pongs between two
processes (context switches, wakeups), 1-byte reads of /dev/zero (tracked syscalls), 1-byte TCP
ping-pongs over loopback (sends, receives, tcp_probe).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.net_tcp import NetTcpConfig, NetTcpReceiver
from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

from bench import sections
from bench.sections import Measured, NotMeasured
from kpod.component import EmptyConfig
from kpod.kernel.bpfinfo import program_stats
from kpod.kernel.ebpf import BpfReceiver

REPO = Path(__file__).resolve().parents[1]
STATS = "/proc/sys/kernel/bpf_stats_enabled"

WORKLOAD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* "switch" n: n pipe round trips between this process and a child (each: two wakeups, two
 * context switches at least); "read" n: n 1-byte reads of /dev/zero.  Prints ns per operation. */
int main(int argc, char **argv)
{
	long n = atol(argv[2]), i;
	struct timespec a, b;
	char c = 'x';

	if (!strcmp(argv[1], "switch")) {
		int up[2], down[2];
		pid_t child;

		if (pipe(up) || pipe(down))
			return 1;
		child = fork();
		if (child == 0) {
			for (i = 0; i < n; i++)
				if (read(down[0], &c, 1) != 1 || write(up[1], &c, 1) != 1)
					_exit(1);
			_exit(0);
		}
		clock_gettime(CLOCK_MONOTONIC, &a);
		for (i = 0; i < n; i++)
			if (write(down[1], &c, 1) != 1 || read(up[0], &c, 1) != 1)
				return 1;
		clock_gettime(CLOCK_MONOTONIC, &b);
		waitpid(child, NULL, 0);
	} else {
		int fd = open("/dev/zero", O_RDONLY);

		clock_gettime(CLOCK_MONOTONIC, &a);
		for (i = 0; i < n; i++)
			if (read(fd, &c, 1) != 1)
				return 1;
		clock_gettime(CLOCK_MONOTONIC, &b);
	}
	printf("%.2f\n", ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / n);
	return 0;
}
"""


class ProbeReadReceiver(NetTcpReceiver):
    """As on kernels without the bpf_rdonly_cast kfunc (< 6.2): the probe-read RTT program."""

    def enabled_programs(self) -> set[str]:
        return super().enabled_programs() - {"tcp_probe"}


def context(component_id: str, force_routes: list[str]) -> Any:
    from bench.bpf_net_syscall import context as bench_context

    return bench_context(component_id, force_routes=force_routes)


# (pair, workload, programs one event runs, primary, fallback); a variant is (label, receiver
# factory, what its route must contain to be the route named: "" when any load of it is).
Variant = tuple[str, Callable[[], BpfReceiver], str]
PAIRS: list[tuple[str, str, tuple[str, ...], Variant, Variant]] = [
    (
        "cpu_sched: enqueue stamps",
        "switch",
        ("sched_wakeup", "sched_switch"),
        ("task storage", lambda: CpuSchedReceiver(context("cpu_sched", []), EmptyConfig()), ""),
        ("tid hash", lambda: CpuSchedReceiver(context("cpu_sched", ["tid_hash"]), EmptyConfig()), ""),
    ),
    (
        "syscall: entry stamps",
        "read",
        ("sys_enter", "sys_exit"),
        ("task storage", lambda: SyscallReceiver(context("syscall", []), SyscallConfig()), ""),
        ("tid hash", lambda: SyscallReceiver(context("syscall", ["tid_hash"]), SyscallConfig()), ""),
    ),
    (
        "net_tcp: bytes",
        "tcp",
        ("tcp_send_length", "tcp_recv_length", "tcp_sendmsg_exit", "tcp_recvmsg_exit",
         "tcp_sendmsg_entry", "tcp_sendmsg_ret", "tcp_recvmsg_entry", "tcp_recvmsg_ret"),
        ("first route", lambda: NetTcpReceiver(context("net_tcp", []), NetTcpConfig(rtt=False)), ""),
        ("kprobe + kretprobe", lambda: NetTcpReceiver(context("net_tcp", ["kprobe"]), NetTcpConfig(rtt=False)),
         "kretprobe/"),
    ),
    (
        "net_tcp: socket cgroup",
        "tcp",
        ("tcp_send_length", "tcp_recv_length", "tcp_sendmsg_exit", "tcp_recvmsg_exit",
         "tcp_sendmsg_entry", "tcp_sendmsg_ret", "tcp_recvmsg_entry", "tcp_recvmsg_ret", "tcp_probe", "tcp_probe_read"),
        ("sk_cgrp_data.cgroup", lambda: NetTcpReceiver(context("net_tcp", []), NetTcpConfig()), ""),
        ("pre-5.15 union", lambda: NetTcpReceiver(context("net_tcp", ["sock_cgroup_val"]), NetTcpConfig()), ""),
    ),
    (
        "net_tcp: RTT",
        "tcp",
        ("tcp_probe", "tcp_probe_read"),
        ("bpf_rdonly_cast", lambda: NetTcpReceiver(context("net_tcp", []), NetTcpConfig()), "tcp_probe ("),
        ("probe read", lambda: ProbeReadReceiver(context("net_tcp", []), NetTcpConfig()), ""),
    ),
]  # fmt: skip


def build(tmp: Path) -> Path:
    if shutil.which("clang") is None:
        raise NotMeasured("clang is not installed (make system-packages)")
    (tmp / "workload.c").write_text(WORKLOAD_C)
    subprocess.run(["clang", "-O2", "-o", str(tmp / "workload"), str(tmp / "workload.c")], check=True)
    return tmp / "workload"


def tcp_pingpong(n: int) -> float:
    """n 1-byte request/response round trips over loopback; ns per round trip."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    client = socket.create_connection(ls.getsockname())
    server, _ = ls.accept()
    try:
        began = time.perf_counter_ns()
        for _ in range(n):
            client.send(b"p")
            server.recv(1)
            server.send(b"q")
            client.recv(1)
        return (time.perf_counter_ns() - began) / n
    finally:
        for s in (client, server, ls):
            s.close()


def run_workload(kind: str, binary: Path, n: int, cpu: int) -> float:
    if kind == "tcp":
        previous = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cpu})
        try:
            return tcp_pingpong(n // 10)
        finally:
            os.sched_setaffinity(0, previous)
    out = subprocess.run(["taskset", "-c", str(cpu), str(binary), kind, str(n)], check=True, capture_output=True)
    return float(out.stdout.decode().strip())


def loaded_programs(receiver: BpfReceiver) -> dict[str, Any]:
    """Active programs (a kretprobe's entry kprobe is a route of its own) -> libbpf Program."""
    assert receiver.loaded is not None
    return {r.program: receiver.loaded.obj.programs[r.program] for r in receiver.loaded.routes if r.active}


@contextlib.contextmanager
def started(make: Callable[[], BpfReceiver]) -> Iterator[BpfReceiver]:
    receiver = make()
    receiver.start()
    try:
        yield receiver
    finally:
        receiver.shutdown()


def refusals(receiver: BpfReceiver, wanted: tuple[str, ...]) -> list[str]:
    """Why this pair's programs that did not load are off (choices left out)."""
    assert receiver.loaded is not None
    choices = ("an earlier alternative is used", "disabled by config")
    return [f"{r.program}: {r.reason}" for r in receiver.loaded.routes
            if r.program in wanted and not r.active and r.reason not in choices]  # fmt: skip


def route_words(receiver: BpfReceiver, wanted: tuple[str, ...]) -> str:
    assert receiver.loaded is not None
    hooks = {r.program: r.hook for r in receiver.loaded.routes if r.active}
    progs = loaded_programs(receiver)
    return ", ".join(f"{p} ({hooks.get(p) or progs[p].section})" for p in wanted if p in progs)


def measure_here(reps: int = 3, n: int = 200000) -> dict[str, Any]:
    """Every pair on the running kernel: {pair: {label: figures}} plus the kernel's name."""
    if os.geteuid() != 0 or not os.path.exists("/sys/kernel/btf/vmlinux"):
        raise NotMeasured("needs root and /sys/kernel/btf/vmlinux")
    if shutil.which("taskset") is None:
        raise NotMeasured("taskset is not installed")
    cpu = max(os.sched_getaffinity(0))
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="kpod-bench-routes-") as tmp:
        binary = build(Path(tmp))
        with open(STATS) as f:
            previous = f.read().strip()
        with open(STATS, "w") as f:
            f.write("1")
        try:
            for pair, kind, wanted, *variants in PAIRS:
                samples: dict[str, list[dict[str, Any]]] = {"no programs": []}
                samples.update({label: [] for label, _, _ in variants})
                for _ in range(reps):
                    samples["no programs"].append({"wall_ns": run_workload(kind, binary, n, cpu)})
                    for label, make, needs in variants:
                        try:
                            with started(make) as receiver:
                                programs = {p: prog for p, prog in loaded_programs(receiver).items() if p in wanted}
                                before = {p: program_stats(prog) for p, prog in programs.items()}
                                wall = run_workload(kind, binary, n, cpu)
                                after = {p: program_stats(prog) for p, prog in programs.items()}
                                per_run = {
                                    p: (after[p].run_time_ns - before[p].run_time_ns)
                                    / max(1, after[p].run_cnt - before[p].run_cnt)
                                    for p in programs
                                }
                                runs = {p: after[p].run_cnt - before[p].run_cnt for p in programs}
                                route = route_words(receiver, wanted)
                                if needs not in route:
                                    why = "; ".join(refusals(receiver, wanted)) or f"loaded {route}"
                                    samples[label].append({"error": why})
                                    continue
                                samples[label].append({
                                    "wall_ns": wall, "programs": per_run, "runs": runs,
                                    "event_ns": sum(per_run.values()), "route": route,
                                })  # fmt: skip
                        except Exception as error:  # a route this kernel cannot run: say so, go on
                            samples[label].append({"error": f"{type(error).__name__}: {error}"})
                results[pair] = {
                    label: (min((s for s in got if "error" not in s), key=lambda s: s.get("event_ns", s["wall_ns"]))
                            if any("error" not in s for s in got) else got[0])
                    for label, got in samples.items()
                }  # fmt: skip
                results[pair]["no programs"] = min(samples["no programs"], key=lambda s: s["wall_ns"])
        finally:
            with open(STATS, "w") as f:
                f.write(previous)
    return {
        "kernel": f"{platform.release()} {platform.machine()}",
        "cpus": os.cpu_count(),
        "ops": n,
        "reps": reps,
        "pairs": results,
    }


# --- the VMs ------------------------------------------------------------------------------------


def _vm_module() -> Any:
    spec = importlib.util.spec_from_file_location("kpod_vm", REPO / "tests" / "vm" / "vm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["kpod_vm"] = module
    spec.loader.exec_module(module)
    return module


def measure_in_vm(arch: str, reps: int, n: int) -> dict[str, Any]:
    """The same measurement inside `make test-vm`'s (amd64) or `make test-vm-arm64`'s guest."""
    vm = _vm_module()
    target = vm.Target(arch)
    if vm.kernel_release(target) is None or not target.initramfs.exists():
        make = "make vm-setup" if arch == "amd64" else "make vm-setup-arm64 bpf-arm64"
        return {"did_not_run": f"the {arch} VM is not prepared ({make})"}
    result = vm.run(
        [".venv/bin/python", "-m", "bench.bpf_routes", "--here", "--reps", str(reps), "--ops", str(n),
         "--json", "/run/kpod-vm/routes.json"],
        timeout=2400, cwd=REPO, target=target, stream=False,
    )  # fmt: skip
    out = result.run_dir / "routes.json"
    if result.exit_code != 0 or not out.exists():
        return {"did_not_run": f"the {arch} VM run failed (exit {result.exit_code}); console log {result.console}"}
    data = json.loads(out.read_text())
    data["vm_seconds"] = round(result.seconds)
    return data


KERNELS = {"host": "this host", "vm": "6.1 x86 VM (qemu TCG)", "vm-arm64": "6.1 arm64 VM (qemu TCG)"}


def measure(reps: int = 3, kernels: str = "host,vm,vm-arm64", n: int = 200000) -> Measured:
    wanted = [k.strip() for k in kernels.split(",") if k.strip()]
    data: dict[str, Any] = {}
    for kernel in wanted:
        if kernel == "host":
            data[kernel] = measure_here(reps, n)
        else:
            # Fewer operations under TCG (each costs ~10-20x): the same pairs, the same reps.
            data[kernel] = measure_in_vm("amd64" if kernel == "vm" else "arm64", reps, n // 10)
    command = ".venv/bin/python -m bench.bpf_routes" + "".join(
        f" --{name} {value}"
        for name, value, default in (("reps", reps, 3), ("kernels", kernels, "host,vm,vm-arm64"), ("ops", n, 200000))
        if value != default
    )
    return Measured(command, {"kernels": data})


# --- report ---------------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def render(data: dict[str, Any]) -> str:
    lines = [
        "## Older kernels' routes against the ones they stand in for (bench/bpf_routes.py)",
        "",
        "Per kernel, each pair loaded one after the other on the same workload, repetitions interleaved, "
        "least disturbed kept.  **event ns**: bpf_stats time of the programs one event runs, summed "
        "(per run of each).  **wall ns/op**: the workload's time per operation with that route loaded "
        "(includes what bpf_stats does not see: kprobe trampolines, the tracepoint's own dispatch); "
        "'no programs' is the bare workload.  Workloads: switch = pipe round trip between two processes; "
        "read = 1-byte read of /dev/zero (a tracked syscall); tcp = 1-byte TCP round trip over loopback.",
    ]
    for kernel, figures in data["kernels"].items():
        lines += ["", f"### {KERNELS.get(kernel, kernel)}", ""]
        if "did_not_run" in figures:
            lines.append(f"Did not run: {figures['did_not_run']}")
            continue
        extra = f", VM run {figures['vm_seconds']} s" if "vm_seconds" in figures else ""
        lines += [
            f"Kernel {figures['kernel']}, {figures['cpus']} CPUs, {figures['ops']:,} operations per workload "
            f"(tcp: {figures['ops'] // 10:,}), {figures['reps']} repetitions{extra}.",
            "",
            "| pair | route | programs (hook) | event ns | x primary | wall ns/op | x primary | no programs ns/op |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for pair, routes in figures["pairs"].items():
            labels = [label for label in routes if label != "no programs"]
            primary = routes[labels[0]]
            bare = routes["no programs"]["wall_ns"]
            for label in labels:
                got = routes[label]
                if "error" in got:
                    lines.append(f"| {pair} | {label} | cannot run here: {got['error']} | | | | | {bare:.0f} |")
                    continue
                if not got["programs"]:
                    lines.append(f"| {pair} | {label} | no program of this pair loaded here | | | "
                                 f"{got['wall_ns']:.0f} | | {bare:.0f} |")  # fmt: skip
                    continue
                ok = "error" not in primary and primary.get("programs")
                lines.append(
                    f"| {pair} | {label} | {got['route']} | {got['event_ns']:.1f} | "
                    f"{_ratio(got['event_ns'], primary['event_ns']) if ok else '-'} | {got['wall_ns']:.0f} | "
                    f"{_ratio(got['wall_ns'], primary['wall_ns']) if ok else '-'} | {bare:.0f} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--ops", type=int, default=200000, help="operations per workload on the host")
    parser.add_argument("--kernels", default="host,vm,vm-arm64", help="host, vm (6.1 x86), vm-arm64 (6.1 arm64)")
    parser.add_argument("--here", action="store_true", help="only the running kernel (what a VM runs)")
    parser.add_argument("--json", help="write the figures here instead of printing the section")
    parser.add_argument("--write", action="store_true", help="keep the figures, write docs/perf/bpf_routes.md")
    args = parser.parse_args(argv)
    try:
        if args.here:
            data: dict[str, Any] = measure_here(args.reps, args.ops)
            if args.json:
                Path(args.json).write_text(json.dumps(data, indent=1) + "\n")
            else:
                print(render({"kernels": {"here": data}}))
            return 0
        measured = measure(args.reps, args.kernels, args.ops)
    except NotMeasured as reason:
        raise SystemExit(f"bench.bpf_routes: {reason}") from None
    if args.write:
        print(sections.write("bpf_routes", measured).read_text())
    elif args.json:
        Path(args.json).write_text(json.dumps({"command": measured.command, "data": measured.data}, indent=1) + "\n")
    else:
        print(render(measured.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
