"""CPU usage and CFS throttling per cgroup, from the files of wherever the cpu controller lives.

Routes, chosen once at start (the same choice as cgroup_memory's and disk's):

  cgroup2  the cpu controller is on cgroup2: `cpu.stat` has usage_usec and, where the controller
           is enabled, nr_periods, nr_throttled and throttled_usec.
  v1       the cpu controller is on a v1 hierarchy (hybrid and v1 nodes): usage from the cpuacct
           hierarchy's `cpuacct.usage` (nanoseconds), throttling from the cpu hierarchy's
           `cpu.stat` (nr_periods, nr_throttled, throttled_time in nanoseconds), each at the
           cgroup's relative path under that controller's mount.  A cgroup of a hybrid host's
           cgroup2 tree with no v1 counterpart (made in cgroup2 alone) gets its usage from
           cgroup2's cpu.stat, as on the route below.
  cgroup2 usage only  neither: a controller-less cgroup2 tree still has usage_usec in every
           `cpu.stat` (rstat), but no throttling.

All are cumulative since the cgroup was created, so they are exported as they are.  nr_periods
counts the enforcement periods in which the cgroup had a quota and runnable tasks, nr_throttled
those that ended with it throttled: their ratio is the share of periods throttled.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from kpod.cgroup.files import ControllerFilesReceiver, ParseMemo, v1_path
from kpod.cgroup.parsers import parse_cpu_stat, parse_single_int
from kpod.cgroup.paths import exists, is_dir
from kpod.component import Context, Factory
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point

USAGE = MetricDef("kpod.cpu.usage.seconds", Kind.COUNTER, "s", "CPU time consumed by the cgroup's tasks.")
PERIODS = MetricDef(
    "kpod.cpu.periods", Kind.COUNTER, "1", "CFS enforcement periods in which the cgroup had a quota and runnable tasks."
)
THROTTLED_PERIODS = MetricDef(
    "kpod.cpu.throttled.periods", Kind.COUNTER, "1", "CFS periods in which the cgroup was throttled."
)
THROTTLED_SECONDS = MetricDef(
    "kpod.cpu.throttled.seconds", Kind.COUNTER, "s", "Time the cgroup's tasks spent throttled by their CFS quota."
)

ROUTE_V2 = "cpu.stat (cgroup2 cpu controller)"
ROUTE_V1 = "cpuacct.usage + cpu.stat (v1 cpuacct and cpu controllers)"
ROUTE_V2_USAGE = "cpu.stat usage_usec (cgroup2 without the cpu controller: no throttling)"


# What the receiver makes of a cpu.stat: (metric, value) of each point, remembered by the file's
# bytes (ParseMemo: a cpu.stat without a quota prints the same zeros cycle after cycle, and an idle
# cgroup's usage does not move).  cpuacct.usage is one number that moves whenever the cgroup ran:
# parsed every cycle.
Values = tuple[tuple[MetricDef, float], ...]


def throttling_values(stat: dict[str, int], time_key: str, per_second: float) -> Values:
    """The CFS throttling points of a parsed cpu.stat (the cpu controller's keys; absent is not 0)."""
    values: list[tuple[MetricDef, float]] = []
    if "nr_periods" in stat:
        values.append((PERIODS, stat["nr_periods"]))
    if "nr_throttled" in stat:
        values.append((THROTTLED_PERIODS, stat["nr_throttled"]))
    if time_key in stat:
        values.append((THROTTLED_SECONDS, stat[time_key] / per_second))
    return tuple(values)


def v2_values(text: str) -> Values:
    """cgroup2 cpu.stat: usage, and throttling where the cpu controller is enabled."""
    stat = parse_cpu_stat(text)
    usage: Values = ((USAGE, stat["usage_usec"] / 1e6),) if "usage_usec" in stat else ()
    return usage + throttling_values(stat, "throttled_usec", 1e6)


def v1_throttling_values(text: str) -> Values:
    """v1 cpu.stat: throttling (throttled_time in nanoseconds)."""
    return throttling_values(parse_cpu_stat(text), "throttled_time", 1e9)


@dataclass
class CgroupCpuConfig:
    pass


class CgroupCpuReceiver(ControllerFilesReceiver):
    v2_controller = "cpu"
    v1_controller = "cpu"
    route_v2 = ROUTE_V2
    route_v1 = ROUTE_V1
    metrics = (USAGE, PERIODS, THROTTLED_PERIODS, THROTTLED_SECONDS)

    def _choose_route(self) -> tuple[str | None, str]:
        route, reason = super()._choose_route()
        if route is None and "cpuacct" in self.context.cgroups.mounts.v1:
            return ROUTE_V1, ""  # cpuacct alone: usage without throttling
        if route is None and os.path.exists(self.context.cgroups.abspath("/") + "/cpu.stat"):
            return ROUTE_V2_USAGE, ""
        return route, reason

    def __init__(self, context: Context, config: CgroupCpuConfig) -> None:
        super().__init__(context, config)
        # v1 route: the cgroups whose cpuacct.usage was read last cycle.  Their v1 directory
        # is not looked for again (a stat per cgroup and cycle); the others' is, every cycle.
        self._v1_read: set[int] = set()
        self._v2_values = ParseMemo(v2_values)
        self._v1_throttling = ParseMemo(v1_throttling_values)

    def collect(self) -> Batch:
        if self._route is None:
            self.start()
        batch = Batch()
        index = self.context.cgroups
        self._v2_values.new_cycle()
        self._v1_throttling.new_cycle()
        if self._route == ROUTE_V1:
            read: set[int] = set()
            for ref in index.workloads():
                self._collect_v1(ref, index.abspath(ref.path), batch, read)
            self._v1_read = read
            return batch
        for ref in index.workloads():
            self._collect_v2(ref, index.abspath(ref.path), batch)
        return batch

    def _collect_v2(self, ref: CgroupRef, directory: str, batch: Batch) -> None:
        # A cgroup gone between the walk and the read is skipped and counted by _read_bytes.
        data = self._read_bytes(directory + "/cpu.stat", directory)
        if data is not None:
            _add(batch, ref, self._v2_values(data))

    def _collect_v1(self, ref: CgroupRef, directory: str, batch: Batch, read: set[int]) -> None:
        # `directory` (the walked tree's) decides whether a missing file is an error: while it
        # exists, a cgroup without a v1 counterpart simply has no such file.
        mounts = self.context.cgroups.mounts
        cpuacct = v1_path(mounts, "cpuacct", ref.path)
        if (
            cpuacct is not None
            and ref.id not in self._v1_read
            and not is_dir(cpuacct)
            and exists(directory + "/cpu.stat")
        ):
            # A cgroup only in the cgroup2 tree of a hybrid host (made there alone): its usage
            # is in cgroup2's cpu.stat, and no quota of a v1 cpu controller applies to it.
            self._collect_v2(ref, directory, batch)
            return
        if cpuacct is not None:
            text = self._read(cpuacct + "/cpuacct.usage", directory, record=True)
            usage = parse_single_int(text) if text is not None else None
            if usage is not None:
                batch.add(Point(USAGE, ref, (), usage / 1e9))
                read.add(ref.id)
        cpu = v1_path(mounts, "cpu", ref.path)
        if cpu is not None:
            data = self._read_bytes(cpu + "/cpu.stat", directory)
            if data is not None:
                _add(batch, ref, self._v1_throttling(data))


def _add(batch: Batch, ref: CgroupRef, values: Values) -> None:
    for metric, value in values:
        batch.add(Point(metric, ref, (), value))


factory = Factory(
    type="cgroup_cpu",
    kind="receiver",
    config_class=CgroupCpuConfig,
    create=CgroupCpuReceiver,
    description="CPU usage and throttling per cgroup (cgroup2 cpu.stat, or v1 cpuacct.usage and cpu.stat).",
)
