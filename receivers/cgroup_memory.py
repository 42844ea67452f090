"""cgroup_memory: memory usage and working set per cgroup, as the kubelet computes them.

  * kpod.mem.usage.bytes: cgroup2 memory.current; on hybrid hosts (memory controller on v1)
    memory.usage_in_bytes of the same relative path under the v1 memory mount.
  * kpod.mem.working_set.bytes: usage minus inactive file pages, floored at 0.  inactive_file
    comes from memory.stat (v2 `inactive_file`, v1 `total_inactive_file`, which for a leaf
    equals `inactive_file`).  This is the kubelet's and cAdvisor's working set, the figure the
    kubelet evicts on, so graphs line up with `kubectl top`.

Both are gauges.  The route (v2 or v1) is chosen once at start from the cgroup2 root's
cgroup.controllers and the v1 mounts.
"""

from __future__ import annotations

from dataclasses import dataclass

from kpod.cgroup.files import ControllerFilesReceiver, v1_path
from kpod.cgroup.parsers import parse_flat_keyed_value, parse_single_int
from kpod.component import Context, EmptyConfig, Factory
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point

USAGE = MetricDef("kpod.mem.usage.bytes", Kind.GAUGE, "By", "Memory charged to the cgroup (memory.current)")
WORKING_SET = MetricDef(
    "kpod.mem.working_set.bytes",
    Kind.GAUGE,
    "By",
    "Memory usage minus inactive file pages (the kubelet's working set)",
)

ROUTE_V2 = "memory.current + memory.stat (cgroup2)"
ROUTE_V1 = "memory.usage_in_bytes + memory.stat (v1 fallback)"


@dataclass(frozen=True)
class _Source:
    usage_file: str
    inactive_key: str


_V2 = _Source("memory.current", "inactive_file")
_V1 = _Source("memory.usage_in_bytes", "total_inactive_file")


def working_set(usage: int, inactive_file: int | None) -> int:
    """usage - inactive_file, never below 0 (inactive_file can exceed usage transiently)."""
    if inactive_file is None:
        return usage
    return max(0, usage - inactive_file)


class CgroupMemoryReceiver(ControllerFilesReceiver):
    v2_controller = "memory"
    v1_controller = "memory"
    route_v2 = ROUTE_V2
    route_v1 = ROUTE_V1
    metrics = (USAGE, WORKING_SET)

    def __init__(self, context: Context, config: EmptyConfig) -> None:
        super().__init__(context, config)
        self._route: str | None = None

    def status(self) -> dict[str, object]:
        return {"route": self.route()}

    def collect(self) -> Batch:
        if self._route is None:
            self.start()
        batch = Batch()
        cgroups = self.context.cgroups
        v2 = self._route == ROUTE_V2
        source = _V2 if v2 else _V1
        for ref in cgroups.workloads():
            unified = cgroups.abspath(ref.path)
            directory = unified if v2 else v1_path(cgroups.mounts, "memory", ref.path)
            if directory is not None:
                self._collect_one(ref, directory, unified, source, batch)
        return batch

    def _collect_one(self, ref: CgroupRef, directory: str, unified: str, source: _Source, batch: Batch) -> None:
        # `unified` decides whether a missing file is an error: while the cgroup2 directory
        # exists, a missing file means "not provided here" (the root, or no v1 counterpart).
        text = self._read(f"{directory}/{source.usage_file}", unified, record=True)
        if text is None:
            return
        usage = parse_single_int(text)
        if usage is None:
            self._error()
            return
        batch.add(Point(USAGE, ref, (), float(usage)))
        stat = self._read(f"{directory}/memory.stat", unified, record=True)
        if stat is None:
            return  # usage without a working set beats no series at all
        inactive = parse_flat_keyed_value(stat, source.inactive_key)
        batch.add(Point(WORKING_SET, ref, (), float(working_set(usage, inactive))))


factory = Factory(
    type="cgroup_memory",
    kind="receiver",
    config_class=EmptyConfig,
    create=lambda context, config: CgroupMemoryReceiver(context, config),
    description="Memory usage and working set per cgroup (memory.current, or v1 memory on hybrid hosts)",
)
