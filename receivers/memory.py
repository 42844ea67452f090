"""Memory events per cgroup from bpf/mem.bpf.c: OOM kills and major page faults.

- kpod.mem.oom.kills: charged to the victim's cgroup (tp_btf/mark_victim gives the victim task
  since 6.8; older kernels count the victim process at its exit, see bpf/mem.bpf.c).
- kpod.mem.major.page.faults: a perf software event (PERF_COUNT_SW_PAGE_FAULTS_MAJ, one per
  CPU, sample_period 1) runs a perf_event program on each major fault, in the faulting task;
  the same accounting point as the task's majflt.  `major_faults: false` leaves the events
  unopened (the minimal profile has OOM kills but not page faults).  The events are opened on
  the CPUs online at start; a CPU brought online later is not covered until a restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from kpod.component import Factory
from kpod.kernel.ebpf import PROGRAM_RUN_SECONDS, PROGRAM_RUNS, BpfReceiver, ProgramSpec
from kpod.kernel.libbpf import PERF_COUNT_SW_PAGE_FAULTS_MAJ, PERF_TYPE_SOFTWARE
from kpod.model import Batch, Kind, MetricDef

OOM_KILLS = MetricDef("kpod.mem.oom.kills", Kind.COUNTER, "1", "Tasks of the cgroup killed by the OOM killer")
MAJOR_FAULTS = MetricDef(
    "kpod.mem.major.page.faults", Kind.COUNTER, "1", "Major page faults (served with I/O) of the cgroup's tasks"
)


@dataclass
class MemoryConfig:
    oom_kills: bool = True
    major_faults: bool = True


class MemoryReceiver(BpfReceiver):
    metrics = (OOM_KILLS, MAJOR_FAULTS, PROGRAM_RUN_SECONDS, PROGRAM_RUNS)
    object_name = "mem"
    program_specs = (
        ProgramSpec("oom_mark_victim", feeds=(OOM_KILLS.name,), optional=True, tp_args=("struct task_struct *",)),
        ProgramSpec("oom_victim_exit", feeds=(OOM_KILLS.name,), optional=True, tp_args=("struct task_struct *",)),
        ProgramSpec(
            "mem_major_fault",
            feeds=(MAJOR_FAULTS.name,),
            optional=True,
            perf_event=(PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS_MAJ),
        ),
    )

    def enabled_programs(self) -> set[str]:
        enabled = set()
        if self.config.oom_kills:
            enabled |= {"oom_mark_victim", "oom_victim_exit"}
        if self.config.major_faults:
            enabled.add("mem_major_fault")
        return enabled

    def collect_maps(self, batch: Batch) -> None:
        if self.feeds_active(OOM_KILLS.name):
            for ref, count in self.read_cgroup_map("mem_oom_kills"):
                batch.add(self.point(OOM_KILLS, ref, float(count)))
        if self.feeds_active(MAJOR_FAULTS.name):
            for ref, count in self.read_cgroup_map("mem_maj_faults"):
                batch.add(self.point(MAJOR_FAULTS, ref, float(count)))


factory = Factory(
    "memory",
    "receiver",
    MemoryConfig,
    MemoryReceiver,
    "eBPF: OOM kills (charged to the victim) and major page faults per cgroup",
    requires_bpf=True,
)
