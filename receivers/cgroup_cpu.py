"""CPU usage and CFS throttling per cgroup, from cgroup2 `cpu.stat`.

cpu.stat exists in every cgroup2 directory, with or without the cpu controller: usage_usec is
always there (rstat), nr_periods / nr_throttled / throttled_usec only where the cpu controller
is enabled.  All are cumulative since the cgroup was created, so they are exported as they are.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kpod.cgroup.files import CgroupFileReceiver
from kpod.cgroup.parsers import parse_cpu_stat
from kpod.component import Factory
from kpod.model import Batch, Kind, MetricDef, Point

USAGE = MetricDef("kpod.cpu.usage.seconds", Kind.COUNTER, "s", "CPU time consumed by the cgroup's tasks.")
THROTTLED_PERIODS = MetricDef(
    "kpod.cpu.throttled.periods", Kind.COUNTER, "1", "CFS periods in which the cgroup was throttled."
)
THROTTLED_SECONDS = MetricDef(
    "kpod.cpu.throttled.seconds", Kind.COUNTER, "s", "Time the cgroup's tasks spent throttled by cpu.max."
)



@dataclass
class CgroupCpuConfig:
    pass


class CgroupCpuReceiver(CgroupFileReceiver):
    metrics = (USAGE, THROTTLED_PERIODS, THROTTLED_SECONDS)

    def preflight(self) -> str | None:
        root = self.context.cgroups.root
        if not os.path.exists(os.path.join(root, "cgroup.procs")):
            return f"{root} is not a cgroup2 mount"
        return None

    def route(self) -> str:
        return f"cpu.stat under {self.context.cgroups.root}"

    def collect(self) -> Batch:
        batch = Batch()
        index = self.context.cgroups
        for ref in index.workloads():
            directory = index.abspath(ref.path)
            # A cgroup gone between the walk and the read is skipped and counted by _read.
            text = self._read(directory + "/cpu.stat", directory)
            if text is None:
                continue
            stat = parse_cpu_stat(text)
            if "usage_usec" in stat:
                batch.add(Point(USAGE, ref, (), stat["usage_usec"] / 1e6))
            # Only where the cpu controller is enabled; absent is not zero.
            if "nr_throttled" in stat:
                batch.add(Point(THROTTLED_PERIODS, ref, (), stat["nr_throttled"]))
            if "throttled_usec" in stat:
                batch.add(Point(THROTTLED_SECONDS, ref, (), stat["throttled_usec"] / 1e6))
        return batch


factory = Factory(
    type="cgroup_cpu",
    kind="receiver",
    config_class=CgroupCpuConfig,
    create=CgroupCpuReceiver,
    description="CPU usage and throttling per cgroup from cpu.stat.",
)
