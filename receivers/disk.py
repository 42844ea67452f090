"""disk: block I/O per cgroup and device, from cgroup2 io.stat or the v1 blkio fallback.

Routes, chosen once at start:
  * "io.stat (cgroup2)": the io controller is on the cgroup2 hierarchy (pure v2 nodes).
    rbytes/wbytes/rios/wios of each device line.
  * "blkio v1 fallback": hybrid hosts whose io controller is still v1.  The workload's cgroup2
    path is looked up under the blkio mount (runtimes create the same relative path in each
    hierarchy) and blkio.throttle.io_service_bytes / io_serviced give Read/Write per device.
    On recent kernels these counters only move on devices that have a throttle rule, so a
    file that is only "Total 0" is "no data" and the cgroup emits no disk series at all:
    reporting zeros would claim "no I/O", which is false (tests/fixtures/README.md, surprise 1).

Values are the kernel's cumulative counters, exported as read.  They are never added up per
cycle (the reference agent's doubling bug, reference-pitfalls.md item 7).

The `device` label is the block device name from /sys/dev/block/M:m/uevent (DEVNAME), cached
per major:minor; a device that cannot be resolved is labelled "M:m".
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from kpod.cgroup.files import ControllerFilesReceiver, ParseMemo, read_text, v1_path
from kpod.cgroup.parsers import DevNum, parse_blkio_throttle, parse_devname, parse_io_stat
from kpod.component import Context, Factory
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point
from kpod.units import Duration

READ_BYTES = MetricDef("kpod.disk.read.bytes", Kind.COUNTER, "By", "Bytes read from block devices", ("device",))
WRITTEN_BYTES = MetricDef("kpod.disk.written.bytes", Kind.COUNTER, "By", "Bytes written to block devices", ("device",))
READS = MetricDef("kpod.disk.reads", Kind.COUNTER, "{operation}", "Read operations on block devices", ("device",))
WRITES = MetricDef("kpod.disk.writes", Kind.COUNTER, "{operation}", "Write operations on block devices", ("device",))

ROUTE_V2 = "io.stat (cgroup2)"
ROUTE_V1 = "blkio v1 fallback"

# io.stat key, blkio op -> metric, for the two sources of the same four counters.
_V2_KEYS = (("rbytes", READ_BYTES), ("wbytes", WRITTEN_BYTES), ("rios", READS), ("wios", WRITES))
_V1_BYTES = (("Read", READ_BYTES), ("Write", WRITTEN_BYTES))
_V1_IOS = (("Read", READS), ("Write", WRITES))


@dataclass
class DiskConfig:
    # Where sysfs is mounted (device names come from <sysfs_root>/dev/block/M:m/uevent).
    sysfs_root: str = "/sys"
    # How long a resolved device name is trusted: dynamic majors (nvme, dm, loop) reuse numbers
    # when a device is removed and another one appears.
    device_name_ttl: Duration = field(default_factory=lambda: Duration.parse("5m"))


class DiskReceiver(ControllerFilesReceiver):
    v2_controller = "io"
    v1_controller = "blkio"
    route_v2 = ROUTE_V2
    route_v1 = ROUTE_V1
    metrics = (READ_BYTES, WRITTEN_BYTES, READS, WRITES)

    def __init__(self, context: Context, config: DiskConfig) -> None:
        super().__init__(context, config)
        self._route: str | None = None
        self._names: dict[DevNum, tuple[str, float]] = {}
        self._no_data = 0  # v1 cgroups whose files were only "Total 0" in the last cycle
        self._unresolved: set[DevNum] = set()  # devices without a uevent this cycle
        # Parses remembered by the files' bytes: most cgroups did no I/O since the last cycle.
        self._io_stat = ParseMemo(parse_io_stat)
        self._blkio = ParseMemo(parse_blkio_throttle)

    def status(self) -> dict[str, object]:
        return {
            "route": self.route(),
            "devices_named": len(self._names),
            "v1_cgroups_without_data": self._no_data,
        }

    # ------------------------------------------------------------------ devices

    def device_name(self, dev: DevNum) -> str:
        now = time.monotonic()
        cached = self._names.get(dev)
        if cached is not None and now - cached[1] < self.config.device_name_ttl.seconds:
            return cached[0]
        if dev in self._unresolved:
            return f"{dev[0]}:{dev[1]}"
        try:
            name = parse_devname(read_text(f"{self.config.sysfs_root}/dev/block/{dev[0]}:{dev[1]}/uevent"))
        except OSError:
            name = None  # a detached device
        if name is None:
            # Labelled by number; tried again next cycle, not once per cgroup that used it.
            self._unresolved.add(dev)
            return f"{dev[0]}:{dev[1]}"
        self._names[dev] = (name, now)
        return name

    # ------------------------------------------------------------------ collection

    def collect(self) -> Batch:
        if self._route is None:
            self.start()
        batch = Batch()
        self._unresolved.clear()
        self._io_stat.new_cycle()
        self._blkio.new_cycle()
        if self._route == ROUTE_V2:
            for ref in self.context.cgroups.workloads():
                self._collect_v2(ref, batch)
        else:
            self._no_data = 0
            for ref in self.context.cgroups.workloads():
                self._collect_v1(ref, batch)
        return batch

    def _collect_v2(self, ref: CgroupRef, batch: Batch) -> None:
        directory = self.context.cgroups.abspath(ref.path)
        data = self._read_bytes(directory + "/io.stat", directory)
        if not data:
            return  # empty io.stat: the cgroup did no block I/O yet
        for dev, stats in self._io_stat(data).items():
            attrs = (("device", self.device_name(dev)),)
            for key, metric in _V2_KEYS:
                value = stats.get(key)
                if value is not None:
                    batch.add(Point(metric, ref, attrs, float(value)))

    def _collect_v1(self, ref: CgroupRef, batch: Batch) -> None:
        directory = v1_path(self.context.cgroups.mounts, "blkio", ref.path)
        if directory is None:
            return
        # A missing v1 directory while the cgroup2 one still exists is a workload the blkio
        # hierarchy does not mirror (not an error); if both are gone the pod ended mid-cycle.
        unified = self.context.cgroups.abspath(ref.path)
        service = self._read_bytes(directory + "/blkio.throttle.io_service_bytes", unified)
        if service is None:
            return
        bytes_by_dev = self._blkio(service)
        if not bytes_by_dev:
            self._no_data += 1  # "Total 0" only: no data, not zero I/O
            return
        served = self._read_bytes(directory + "/blkio.throttle.io_serviced", unified)
        ios_by_dev = self._blkio(served) if served else {}
        for dev, ops in bytes_by_dev.items():
            attrs = (("device", self.device_name(dev)),)
            for op, metric in _V1_BYTES:
                if op in ops:
                    batch.add(Point(metric, ref, attrs, float(ops[op])))
            for op, metric in _V1_IOS:
                count = ios_by_dev.get(dev, {}).get(op)
                if count is not None:
                    batch.add(Point(metric, ref, attrs, float(count)))


factory = Factory(
    type="disk",
    kind="receiver",
    config_class=DiskConfig,
    create=lambda context, config: DiskReceiver(context, config),
    description="Block I/O bytes and operations per cgroup and device (io.stat, or v1 blkio on hybrid hosts)",
)
