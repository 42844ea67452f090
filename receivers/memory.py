"""Memory events per cgroup from bpf/mem.bpf.c: OOM kills and major page faults.

- kpod.mem.oom.kills: processes the OOM killer killed, once each, charged to the victim's
  cgroup.  A mark the kernel makes without a kill (a task already exiting, e.g. the other
  threads of a killed process) does not count: a mark counts only right after the kill's
  own SIGKILL to that thread (see bpf/mem.bpf.c for the reasoning and the fallback).  Every
  container the agent knows has the series from its start, at 0 (so that increase() and
  alerts see the first kill); a container's kills stay exported after its cgroup is removed,
  for kpod.cgroup.gone_retention.
- kpod.mem.major.page.faults: a perf software event (PERF_COUNT_SW_PAGE_FAULTS_MAJ, one per
  CPU, sample_period 1) runs a perf_event program on each major fault, in the faulting task;
  the same accounting point as the task's majflt.  `major_faults: false` leaves the events
  unopened (the minimal profile has OOM kills but not page faults).  The events are opened on
  the CPUs online at start; a CPU brought online later is not covered until a restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kpod.component import Factory
from kpod.kernel.cgroupwatch import CgroupBpfReceiver
from kpod.kernel.ebpf import PROGRAM_RUN_SECONDS, PROGRAM_RUNS, ProgramSpec
from kpod.kernel.libbpf import PERF_COUNT_SW_PAGE_FAULTS_MAJ, PERF_TYPE_SOFTWARE
from kpod.model import Batch, CgroupRef, Kind, MetricDef

OOM_KILLS = MetricDef(
    "kpod.mem.oom.kills", Kind.COUNTER, "1", "Processes of the cgroup the OOM killer killed (each once; 0 at first)"
)
MAJOR_FAULTS = MetricDef(
    "kpod.mem.major.page.faults", Kind.COUNTER, "1", "Major page faults (served with I/O) of the cgroup's tasks"
)


@dataclass
class MemoryConfig:
    oom_kills: bool = True
    major_faults: bool = True


class MemoryReceiver(CgroupBpfReceiver):
    metrics = (OOM_KILLS, MAJOR_FAULTS, PROGRAM_RUN_SECONDS, PROGRAM_RUNS)
    object_name = "mem"
    program_specs = (
        # A mark counts only after the kill's SIGKILL (oom_signal); mark_victim passes the
        # task since 6.8, a pid before.
        ProgramSpec("oom_mark_victim", feeds=(OOM_KILLS.name,), optional=True, tp_args=("struct task_struct *",)),
        ProgramSpec("oom_mark_victim_pid", feeds=(OOM_KILLS.name,), optional=True, tp_args=("int",)),
        ProgramSpec(
            "oom_signal",
            feeds=("kpod.mem.oom.kills (the kill's SIGKILL)",),
            optional=True,
            tp_args=("int", "struct kernel_siginfo *", "struct task_struct *"),
            with_programs=("oom_mark_victim", "oom_mark_victim_pid"),
        ),
        ProgramSpec("oom_victim_exit", feeds=(OOM_KILLS.name,), optional=True, tp_args=("struct task_struct *",)),
        ProgramSpec(
            "mem_major_fault",
            feeds=(MAJOR_FAULTS.name,),
            optional=True,
            perf_event=(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS_MAJ),
        ),
    )

    def __init__(self, context: Any, config: Any) -> None:
        super().__init__(context, config)
        self._targets: list[CgroupRef] = []
        self._targets_generation: int | None = None

    def enabled_programs(self) -> set[str]:
        enabled = set()
        if self.config.oom_kills:
            enabled |= {"oom_mark_victim", "oom_mark_victim_pid", "oom_signal", "oom_victim_exit"}
        if self.config.major_faults:
            enabled.add("mem_major_fault")
        return enabled

    def collect_maps(self, batch: Batch) -> None:
        if self.feeds_active(OOM_KILLS.name):
            counted: set[int] = set()
            for ref, count in self.read_cgroup_map("mem_oom_kills"):
                batch.add(self.point(OOM_KILLS, ref, float(count)))
                counted.add(ref.id)
            # Every container the agent knows has the series from the start, at 0: a counter
            # that first appears at 1 is an increase() of 0, and the first kill would never alert.
            for ref in self._charge_targets():
                if ref.id not in counted:
                    batch.add(self.point(OOM_KILLS, ref, 0.0))
        if self.feeds_active(MAJOR_FAULTS.name):
            for ref, count in self.read_cgroup_map("mem_maj_faults"):
                batch.add(self.point(MAJOR_FAULTS, ref, float(count)))

    def _charge_targets(self) -> list[CgroupRef]:
        """The index's charge targets, found again only when its cgroups changed (its
        `generation`): telling containers apart by path, for every cgroup each cycle, cost
        more than the rest of this receiver's Python at 110 pods."""
        cgroups = self.context.cgroups
        generation = getattr(cgroups, "generation", None)
        if generation is None or generation != self._targets_generation:
            self._targets = cgroups.charge_targets()
            self._targets_generation = generation
        return self._targets


factory = Factory(
    "memory",
    "receiver",
    MemoryConfig,
    MemoryReceiver,
    "eBPF: OOM kills (charged to the victim) and major page faults per cgroup",
    requires_bpf=True,
)
