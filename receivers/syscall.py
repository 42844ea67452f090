"""Syscalls per (cgroup, syscall) from bpf/syscall.bpf.c: count, errors, latency.

The tracked set is `kpod.syscall.tracked_syscalls` (names; empty = the architecture's default
set), resolved to this machine's numbers (x86_64 or arm64, kpod.kernel.syscalls) and written
into the kernel's filter map after load and before the programs are attached; every other
syscall returns after one array lookup.  A name only another architecture has (epoll_wait on
arm64) is skipped with a warning, so one config serves a mixed amd64/arm64 cluster.

- kpod.syscall.count{syscall}: calls that returned, whose entry was seen (a call already in
  progress when the agent attached is not counted; fork/clone count once, in the parent).
  A call interrupted by a signal and restarted by the kernel (SA_RESTART, a stop and
  continue) is one call, as its caller sees it; one the signal ends with EINTR is one call
  and one error.
- kpod.syscall.errors{syscall}: of those, calls that returned < 0 to their caller (the
  kernel's internal restart codes are not errors).
- kpod.syscall.latency{syscall}: first entry to the return the caller sees, bucketed in the
  kernel at powers of two seconds.
32-bit (compat) syscalls are not counted, on x86_64 (int 0x80, sysenter) nor on arm64
(AArch32 tasks): their numbers belong to another table.

Capacity: sys_stats holds one entry per (cgroup, tracked syscall) pair and is sized
kpod.bpf.map_max_entries like every per-cgroup map, so 10,240 entries cover ~1,000 cgroups at
the default ten syscalls.  An insert that does not fit is counted in the kernel
(kpod.bpf.map.update.errors.total{map="sys_stats"}); raise map_max_entries with the tracked set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kpod.component import ComponentUnavailable, Factory
from kpod.kernel import libbpf
from kpod.kernel.cgroupwatch import CgroupBpfReceiver
from kpod.kernel.ebpf import (
    PROGRAM_RUN_SECONDS,
    PROGRAM_RUNS,
    ProgramSpec,
    task_stamps_route,
    use_task_stamps,
)
from kpod.kernel.syscalls import (
    default_tracked,
    other_architectures_only,
    resolve_syscalls,
    skipped_note,
    syscall_table,
)
from kpod.model import Batch, Kind, MetricDef, Point, attributes

COUNT = MetricDef("kpod.syscall.count", Kind.COUNTER, "1", "Tracked syscalls made by the cgroup's tasks", ("syscall",))
ERRORS = MetricDef(
    "kpod.syscall.errors", Kind.COUNTER, "1", "Tracked syscalls of the cgroup that returned an error", ("syscall",)
)
LATENCY = MetricDef(
    "kpod.syscall.latency", Kind.HISTOGRAM, "s", "Time from entry to exit of tracked syscalls", ("syscall",)
)

FILTER_MAP = "sys_filter"
# sys_filter values (enum kpod_sys_filter in bpf/syscall.bpf.c).
TRACKED = (1).to_bytes(4, "little")
RESTART = (2).to_bytes(4, "little")
# Resumes a call interrupted with -ERESTART_RESTARTBLOCK (nanosleep, futex with a timeout, poll).
RESTART_SYSCALL = "restart_syscall"


@dataclass
class SyscallConfig:
    # Empty: kpod.syscall.tracked_syscalls.  Names, resolved for this machine's architecture.
    tracked_syscalls: list[str] = field(default_factory=list)


class SyscallReceiver(CgroupBpfReceiver):
    metrics = (COUNT, ERRORS, LATENCY, PROGRAM_RUN_SECONDS, PROGRAM_RUNS)
    object_name = "syscall"
    program_specs = (
        # Both needed: enter stamps the start, exit counts and times.
        ProgramSpec("sys_enter", feeds=("kpod.syscall.* (entry)",)),
        ProgramSpec("sys_exit", feeds=(COUNT.name, ERRORS.name, LATENCY.name)),
        # Only on the tid-hash route (kernels before 5.13): deletes the stamp of an exiting thread.
        ProgramSpec("sys_forget", feeds=("entry stamps of exited threads (tid hash)",), optional=True),
        # Without it a call a signal ends with EINTR after a restart code stays parked until
        # the thread calls that syscall again (then it counts as one longer call).
        ProgramSpec("sys_signal", feeds=("kpod.syscall.* (EINTR after a restart code)",), optional=True),
    )

    def _stamps(self) -> tuple[bool, str]:
        return task_stamps_route(self.force_routes, self._bpf_settings.program_dir)

    def enabled_programs(self) -> set[str]:
        enabled = super().enabled_programs()
        if self._stamps()[0]:
            enabled.discard("sys_forget")  # task storage is freed with the task
        return enabled

    def before_load(self, obj: libbpf.BpfObject) -> None:
        use_task_stamps(obj, "sys_start", self._stamps()[0])

    def choices(self) -> dict[str, str]:
        return {"entry stamps": self._stamps()[1]}

    def __init__(self, context: Any, config: SyscallConfig) -> None:
        super().__init__(context, config)
        self.tracked: dict[str, int] = {}
        self._names: dict[int, tuple[tuple[str, str], ...]] = {}

    def tracked_names(self) -> list[str]:
        """The configured names: this receiver's, else kpod.syscall's, else the architecture's defaults."""
        names = self.config.tracked_syscalls or self.context.settings.syscall.tracked_syscalls
        return list(names) if names else default_tracked()

    def start(self) -> None:
        names = self.tracked_names()
        try:
            self.tracked = resolve_syscalls(names)
        except ValueError as exc:  # an unknown name, or an architecture without a table
            raise ComponentUnavailable(str(exc)) from exc
        note = skipped_note(names)
        if not self.tracked:
            raise ComponentUnavailable(f"no syscalls to track here ({note or 'the tracked list is empty'})")
        if note:  # another architecture's names, in a config shared by a mixed cluster
            self.log.warning("%s", note)
        # Attribute tuples built once: one per tracked syscall, reused every cycle.
        self._names = {nr: attributes(syscall=name) for name, nr in self.tracked.items()}
        super().start()

    def before_attach(self, obj: libbpf.BpfObject) -> None:
        """Write the tracked set into the kernel's filter map before any program can run."""
        filter_map = obj.maps[FILTER_MAP]
        slots = filter_map.max_entries
        for name, nr in self.tracked.items():
            if not 0 <= nr < slots:
                raise libbpf.LibbpfError(22, f"syscall {name} ({nr}) is beyond the filter's {slots} slots")
            filter_map.update(nr.to_bytes(4, "little"), TRACKED)
        restart = syscall_table().get(RESTART_SYSCALL)
        if restart is not None and restart not in self.tracked.values() and 0 <= restart < slots:
            filter_map.update(restart.to_bytes(4, "little"), RESTART)

    def route(self) -> str:
        route = super().route()
        if route.startswith("unavailable"):
            return route
        names = self.tracked_names()
        skipped = other_architectures_only(names)
        tracked = ",".join(n for n in names if n not in skipped)
        note = skipped_note(names)
        return f"{route}; tracked: {tracked}" + (f"; {note}" if note else "")

    def collect_maps(self, batch: Batch) -> None:
        start = self.loaded.loaded_at_ns if self.loaded else 0
        for ref, v in self.read_cgroup_map("sys_stats"):
            attrs = self._names.get(int(v.nr))
            if attrs is None:
                continue  # cannot happen: only tracked numbers pass the filter
            latency = self.histogram(v.latency)
            # The kernel keeps no separate counter: each counted call is one latency sample.
            batch.add(Point(COUNT, ref, attrs, float(latency.count), None, start))
            batch.add(Point(ERRORS, ref, attrs, float(v.errors), None, start))
            batch.add(Point(LATENCY, ref, attrs, latency, None, start))

    def status(self) -> dict[str, object]:
        status = super().status()
        status["tracked_syscalls"] = dict(self.tracked)
        return status


factory = Factory(
    "syscall",
    "receiver",
    SyscallConfig,
    SyscallReceiver,
    "eBPF: count, errors and latency per (cgroup, syscall) for the tracked syscalls",
    requires_bpf=True,
)
