"""CPU scheduling per cgroup from bpf/cpu_sched.bpf.c: run-queue latency and context switches.

- kpod.cpu.runqueue.latency: time from becoming runnable (wakeup, new task, or preempted and
  still runnable) to running, charged to the cgroup of the task that waited.  Bucketed in the
  kernel at powers of two seconds (kpod.bpf.h), exported as a histogram in seconds.
- kpod.cpu.context.switches: counted when a task of the cgroup is switched OUT, the same event
  the kernel counts in /proc/<pid>/status voluntary + nonvoluntary_ctxt_switches.
"""

from __future__ import annotations

from kpod.component import EmptyConfig, Factory
from kpod.kernel import libbpf
from kpod.kernel.cgroupwatch import CgroupBpfReceiver
from kpod.kernel.ebpf import (
    PROGRAM_RUN_SECONDS,
    PROGRAM_RUNS,
    ProgramSpec,
    task_stamps_route,
    use_task_stamps,
)
from kpod.model import Batch, Kind, MetricDef

RUNQ_LATENCY = MetricDef(
    "kpod.cpu.runqueue.latency",
    Kind.HISTOGRAM,
    "s",
    "Time tasks of the cgroup waited in a CPU run queue before running",
)
CONTEXT_SWITCHES = MetricDef(
    "kpod.cpu.context.switches",
    Kind.COUNTER,
    "1",
    "Context switches of the cgroup's tasks, counted when a task is switched out",
)


class CpuSchedReceiver(CgroupBpfReceiver):
    metrics = (RUNQ_LATENCY, CONTEXT_SWITCHES, PROGRAM_RUN_SECONDS, PROGRAM_RUNS)
    object_name = "cpu_sched"
    program_specs = (
        ProgramSpec("sched_switch", feeds=(RUNQ_LATENCY.name, CONTEXT_SWITCHES.name)),
        # Without wakeup hooks only preempted tasks are timed: worse, but still worth running.
        ProgramSpec("sched_wakeup", feeds=("kpod.cpu.runqueue.latency (wakeups)",), optional=True),
        ProgramSpec("sched_wakeup_new", feeds=("kpod.cpu.runqueue.latency (new tasks)",), optional=True),
        # Only on the tid-hash route (kernels before 5.13): deletes the stamp of an exiting task.
        ProgramSpec("sched_forget", feeds=("enqueue stamps of exited tasks (tid hash)",), optional=True),
    )

    def _stamps(self) -> tuple[bool, str]:
        return task_stamps_route(self.force_routes, self._bpf_settings.program_dir)

    def enabled_programs(self) -> set[str]:
        enabled = super().enabled_programs()
        if self._stamps()[0]:
            enabled.discard("sched_forget")  # task storage is freed with the task
        return enabled

    def before_load(self, obj: libbpf.BpfObject) -> None:
        use_task_stamps(obj, "sched_enqueued", self._stamps()[0])

    def choices(self) -> dict[str, str]:
        return {"enqueue stamps": self._stamps()[1]}

    def collect_maps(self, batch: Batch) -> None:
        for ref, stats in self.read_cgroup_map("sched_cgroups"):
            batch.add(self.point(CONTEXT_SWITCHES, ref, float(stats.switches)))
            if stats.runq.count:
                batch.add(self.point(RUNQ_LATENCY, ref, self.histogram(stats.runq)))


factory = Factory(
    "cpu_sched",
    "receiver",
    EmptyConfig,
    CpuSchedReceiver,
    "eBPF: run-queue latency histogram and context switches per cgroup",
    requires_bpf=True,
)
