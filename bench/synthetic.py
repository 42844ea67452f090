"""A node-sized batch: 110 pods with the comprehensive profile's series, as receivers emit them.

Per pod (one container; the spec's figure is about 69 series per pod): CPU usage and throttling
(3), context switches (1), run-queue latency (histogram), TCP bytes/retransmits/connections (4),
RTT (histogram), OOM kills and major faults (2), memory usage and working set (2), pressure (5),
10 syscalls x (count, errors, latency histogram) (30), disk (4), interfaces (8), filesystems
(2 mountpoints x 3).  Histograms have the kernel maps' 27 buckets (26 bounds at powers of two
seconds, and +Inf).
"""

from __future__ import annotations

import random

from kpod.kernel.ebpf import hist_bounds
from kpod.model import Batch, CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource

HIST_BOUNDS = hist_bounds(20, 27)  # as kpod.bpf.h lays out struct kpod_hist
SYSCALLS = ("read", "write", "openat", "close", "connect", "accept4", "sendto", "recvfrom", "epoll_wait", "futex")


def _m(name: str, kind: Kind, unit: str = "1", keys: tuple[str, ...] = ()) -> MetricDef:
    return MetricDef(name, kind, unit, f"Synthetic {name}.", keys)


C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
CONTAINER_SCALARS = [
    _m("kpod.cpu.usage.seconds", C, "s"),
    _m("kpod.cpu.throttled.periods", C),
    _m("kpod.cpu.throttled.seconds", C, "s"),
    _m("kpod.cpu.context.switches", C),
    _m("kpod.net.tcp.bytes.sent", C, "By"),
    _m("kpod.net.tcp.bytes.received", C, "By"),
    _m("kpod.net.tcp.retransmits", C),
    _m("kpod.net.tcp.connections", C),
    _m("kpod.mem.oom.kills", C),
    _m("kpod.mem.major.page.faults", C),
    _m("kpod.mem.usage.bytes", G, "By"),
    _m("kpod.mem.working_set.bytes", G, "By"),
]
PRESSURE = [_m(f"kpod.pressure.{r}.waiting.seconds", C, "s", ("kind",)) for r in ("cpu", "memory", "io")]
RUNQUEUE = _m("kpod.cpu.runqueue.latency", H, "s")
RTT = _m("kpod.net.tcp.rtt", H, "s")
SYSCALL_COUNT = _m("kpod.syscall.count", C, "1", ("syscall",))
SYSCALL_ERRORS = _m("kpod.syscall.errors", C, "1", ("syscall",))
SYSCALL_LATENCY = _m("kpod.syscall.latency", H, "s", ("syscall",))
DISK = [_m(f"kpod.disk.{n}", C, u, ("device",)) for n, u in
        (("read.bytes", "By"), ("written.bytes", "By"), ("reads", "1"), ("writes", "1"))]
IFACE = [_m(f"kpod.net.iface.{d}.{n}", C, "1", ("interface",)) for d in ("rx", "tx")
         for n in ("bytes", "packets", "errors", "drops")]
FS = [_m(f"kpod.fs.{n}.bytes", G, "By", ("mountpoint",)) for n in ("capacity", "usage", "available")]


def _hist(rng: random.Random) -> HistogramValue:
    counts = tuple(rng.randrange(0, 1000) if 3 <= k <= 15 else 0 for k in range(len(HIST_BOUNDS) + 1))
    return HistogramValue(HIST_BOUNDS, counts, rng.random() * 10)


def node_batch(pods: int = 110, seed: int = 1) -> Batch:
    rng = random.Random(seed)
    batch = Batch()
    add = batch.points.append
    for i in range(pods):
        uid = f"0a1b2c3d-0000-4000-8000-{i:012d}"
        pod_slice = f"/kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice"
        cgroup = CgroupRef(10_000 + i, f"{pod_slice}/cri-containerd-{i:064x}.scope")
        resource = Resource(
            (("namespace", f"ns-{i % 7}"), ("pod", f"web-{i}-abcde"), ("container", "app"), ("node", "node-1"))
        )
        for metric in CONTAINER_SCALARS:
            add(Point(metric, cgroup, (), rng.randrange(1, 10**9), resource))
        for metric in PRESSURE:
            add(Point(metric, cgroup, (("kind", "some"),), rng.random() * 100, resource))
        for metric in PRESSURE[1:]:
            add(Point(metric, cgroup, (("kind", "full"),), rng.random() * 100, resource))
        add(Point(RUNQUEUE, cgroup, (), _hist(rng), resource))
        add(Point(RTT, cgroup, (), _hist(rng), resource))
        for name in SYSCALLS:
            attrs = (("syscall", name),)
            add(Point(SYSCALL_COUNT, cgroup, attrs, rng.randrange(10**6), resource))
            add(Point(SYSCALL_ERRORS, cgroup, attrs, rng.randrange(100), resource))
            add(Point(SYSCALL_LATENCY, cgroup, attrs, _hist(rng), resource))
        for metric in DISK:
            add(Point(metric, cgroup, (("device", "nvme0n1"),), rng.randrange(10**9), resource))
        for metric in IFACE:
            add(Point(metric, cgroup, (("interface", "eth0"),), rng.randrange(10**9), resource))
        for metric in FS:
            for mount in ("/", "/data"):
                add(Point(metric, cgroup, (("mountpoint", mount),), rng.randrange(10**10), resource))
    return batch
