"""net_iface: interface counters once per pod network namespace.

All containers of a pod share one network namespace, so reading net/dev per container would
repeat the pod's interfaces N times (reference-pitfalls.md item 10).  Per cycle:

  1. The workloads (leaf cgroups) are grouped by pod: the pod cgroup is a container's parent
     when that parent is named like a kubelet pod cgroup; any other leaf is its own group
     (local mode, non-Kubernetes cgroups).
  2. For each group, one live process is taken from the cgroup.procs of its containers (the
     first container that has one).  No /proc scan.
  3. The process's network namespace is identified by the inode of <proc_root>/<pid>/ns/net.
     A namespace already reported this cycle is skipped (two groups in one netns), and so is
     the host's (that of <proc_root>/1): host-network pods would report the node's interfaces.
  4. <proc_root>/<pid>/net/dev is parsed and emitted, minus excluded interfaces (`lo` by default),
     at most `max_series_per_pod` series per pod (a pod creates as many interfaces as it likes).
     The file is kept open per namespace and read again from its start (kpod.cgroup.netdevfiles):
     what opening it again would read, without the open.

Points carry the pod's cgroup (the group's cgroup), not a container's: the enrichment processor
then labels them with namespace and pod and no container.  Counters are cumulative as the
kernel keeps them (a veth's counters restart when the pod's namespace is recreated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from operator import attrgetter

from kpod.cgroup.files import NET_DEV_MAX_RECORD, CgroupFileReceiver, pod_cgroup_path
from kpod.cgroup.netdevfiles import NetDevFiles, netns_inode
from kpod.cgroup.parsers import NetDevCounters, parse_net_dev
from kpod.component import ComponentUnavailable, Context, Factory
from kpod.kernel.preflight import capability_gaps
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point

_IFACE = ("interface",)


def _def(name: str, unit: str, description: str) -> MetricDef:
    return MetricDef(f"kpod.net.iface.{name}", Kind.COUNTER, unit, description, _IFACE)


RX_BYTES = _def("rx.bytes", "By", "Bytes received on the pod's interfaces")
TX_BYTES = _def("tx.bytes", "By", "Bytes transmitted on the pod's interfaces")
RX_PACKETS = _def("rx.packets", "{packet}", "Packets received on the pod's interfaces")
TX_PACKETS = _def("tx.packets", "{packet}", "Packets transmitted on the pod's interfaces")
RX_ERRORS = _def("rx.errors", "{error}", "Receive errors on the pod's interfaces")
TX_ERRORS = _def("tx.errors", "{error}", "Transmit errors on the pod's interfaces")
RX_DROPS = _def("rx.drops", "{packet}", "Received packets dropped on the pod's interfaces")
TX_DROPS = _def("tx.drops", "{packet}", "Packets dropped on transmit on the pod's interfaces")

# metric, NetDevCounters field
_FIELDS: tuple[tuple[MetricDef, str], ...] = (
    (RX_BYTES, "rx_bytes"),
    (TX_BYTES, "tx_bytes"),
    (RX_PACKETS, "rx_packets"),
    (TX_PACKETS, "tx_packets"),
    (RX_ERRORS, "rx_errors"),
    (TX_ERRORS, "tx_errors"),
    (RX_DROPS, "rx_drops"),
    (TX_DROPS, "tx_drops"),
)
_METRICS = tuple(metric for metric, _ in _FIELDS)
_VALUES = attrgetter(*(attr for _, attr in _FIELDS))  # one call for an interface's eight values


NO_PTRACE_LOSS = (
    "the network namespace of a pod process holding capabilities the agent lacks (most pods) cannot be "
    "opened, so those pods get no interface series"
)


@dataclass
class NetIfaceConfig:
    # Interfaces never reported.  `lo` carries only the pod's traffic to itself.
    exclude_interfaces: list[str] = field(default_factory=lambda: ["lo"])
    # The host's network namespace, whose pods (hostNetwork) are skipped.  Empty: <proc_root>/1/ns/net,
    # or /proc/self/ns/net when pid 1 cannot be read (the agent then must run with hostNetwork).
    host_netns_path: str = ""
    # Series per pod at most (8 per interface: whole interfaces, in the kernel's order, which
    # lists a namespace's first interfaces first); the rest is counted in kpod_series_dropped_total.
    max_series_per_pod: int = 128

    def validate(self) -> None:
        if self.max_series_per_pod < len(_FIELDS):
            raise ValueError(f"max_series_per_pod: must be at least {len(_FIELDS)} (one interface)")


class NetIfaceReceiver(CgroupFileReceiver):
    metrics = _METRICS

    def __init__(self, context: Context, config: NetIfaceConfig) -> None:
        super().__init__(context, config)
        self.proc_root = context.settings.cgroup.proc_root.rstrip("/") or "/"
        self._host_netns: int | None = None
        self._host_netns_path = ""
        self._pod_refs: dict[str, CgroupRef] = {}
        # The last grouping and the index generation it was made at (see _groups).
        self._grouped: tuple[int, dict[str, list[CgroupRef]]] | None = None
        self._excluded = frozenset(config.exclude_interfaces)
        self._last = {"namespaces": 0, "host_network_skipped": 0, "shared_skipped": 0}
        self._files = NetDevFiles(self.proc_root, NET_DEV_MAX_RECORD)
        self._dropped("pod_limit", 0)

    def _host_ns(self) -> tuple[int, str]:
        """(inode, path) of the host's network namespace.

        The init process's netns is the node's and fixed for the life of the host.  Reading
        it needs ptrace-read access to pid 1, which some sandboxes deny even to root; the
        agent's own netns is then the reference, which is the host's when the agent runs with
        hostNetwork (as the DaemonSet does).
        """
        candidates = [self.config.host_netns_path] if self.config.host_netns_path else [
            f"{self.proc_root}/1/ns/net",
            "/proc/self/ns/net",
        ]  # fmt: skip
        error: OSError | None = None
        for path in candidates:
            try:
                return os.stat(path).st_ino, path
            except OSError as err:
                error = err
        assert error is not None
        raise error

    def preflight(self) -> str | None:
        try:
            self._host_ns()
        except OSError as err:
            return f"cannot identify the host network namespace: {err}"
        return None

    def route(self) -> str:
        return (
            f"{self.proc_root}/<pid>/net/dev, one process per pod netns (from cgroup.procs); "
            f"host netns from {self._host_netns_path or self._host_ns()[1]}"
        )

    def start(self) -> None:
        try:
            self._host_netns, self._host_netns_path = self._host_ns()
        except OSError as err:
            raise ComponentUnavailable(f"cannot identify the host network namespace: {err}") from err
        # Runs without it, but loses most pods, and the loss is otherwise silent (docs/CAPABILITIES.md).
        for line in capability_gaps({"CAP_SYS_PTRACE": NO_PTRACE_LOSS}):
            self.log.warning(line)

    def shutdown(self) -> None:
        self._files.close()

    def status(self) -> dict[str, object]:
        return {"route": self.route(), **self._last, "net_dev_kept": self._files.kept,
                "net_dev_opened": self._files.opened}  # fmt: skip

    def _groups(self) -> dict[str, list[CgroupRef]]:
        """Leaves grouped by pod cgroup path (a non-pod leaf is its own group), in a stable order.

        Made again only when the index's cgroups changed (its generation moves with every change
        of the live set), not every cycle: the caller does not change it."""
        index = self.context.cgroups
        if self._grouped is not None and self._grouped[0] == index.generation:
            return self._grouped[1]
        generation = index.generation  # before reading: a change meanwhile makes it stale at once
        groups = group_by_pod(index.workloads())
        self._grouped = (generation, groups)
        return groups

    def _pod_ref(self, group_path: str, members: list[CgroupRef]) -> CgroupRef | None:
        if len(members) == 1 and members[0].path == group_path:
            return members[0]
        # The pod cgroup is not a workload, so the index has no ref for it at hand: its id is
        # its directory's inode, remembered while the pod lasts (a new pod has a new path).
        ref = self._pod_refs.get(group_path)
        if ref is None:
            try:
                ref = CgroupRef(os.stat(self.context.cgroups.abspath(group_path)).st_ino, group_path)
            except OSError:
                return None  # the pod went away
            self._pod_refs[group_path] = ref
        return ref

    def _one_pid_netns(self, members: list[CgroupRef]) -> tuple[int, int] | None:
        """(pid, netns inode) of one live process of the group, or None."""
        for ref in members:
            for pid in self._pids(ref) or ():
                try:
                    return pid, netns_inode(f"{self.proc_root}/{pid}/ns/net")
                except OSError:
                    continue  # exited since cgroup.procs was read: try the next one
        return None

    def collect(self) -> Batch:
        if self._host_netns is None:
            self.start()
        batch = Batch()
        seen: set[int] = set()
        stats = {"namespaces": 0, "host_network_skipped": 0, "shared_skipped": 0}
        groups = self._groups()
        self._files.begin()
        try:  # end() also after a failure: the files of gone pods' namespaces are closed
            for group_path, members in groups.items():
                found = self._one_pid_netns(members)
                if found is None:
                    continue  # no live process: nothing to attribute, and no namespace to read
                pid, netns = found
                if netns == self._host_netns:
                    stats["host_network_skipped"] += 1
                    continue
                if netns in seen:
                    stats["shared_skipped"] += 1
                    continue
                try:
                    text = self._files.read(netns, pid)
                except OSError as err:
                    self._failed(err, f"{self.proc_root}/{pid}/net/dev")
                    continue
                ref = self._pod_ref(group_path, members)
                if ref is None:
                    continue
                seen.add(netns)
                stats["namespaces"] += 1
                self._emit(ref, parse_net_dev(text), batch)
        finally:
            self._files.end()
        self._last = stats
        for path in self._pod_refs.keys() - groups.keys():
            del self._pod_refs[path]  # pods that are gone
        return batch

    def _emit(self, ref: CgroupRef, interfaces: dict[str, NetDevCounters], batch: Batch) -> None:
        room = self.config.max_series_per_pod // len(_FIELDS)
        dropped = 0
        points = batch.points
        for name, counters in interfaces.items():
            if name in self._excluded:
                continue
            if room <= 0:
                dropped += 1  # a pod's many interfaces: it loses its own series, and only those
                continue
            room -= 1
            attrs = (("interface", name),)
            for metric, value in zip(_METRICS, _VALUES(counters), strict=True):
                points.append(Point(metric, ref, attrs, float(value)))
        if dropped:
            self._dropped("pod_limit", dropped * len(_FIELDS))


def group_by_pod(workloads: list[CgroupRef]) -> dict[str, list[CgroupRef]]:
    """Leaves by pod cgroup path (a non-pod leaf is its own group), groups and members by path."""
    groups: dict[str, list[CgroupRef]] = {}
    for ref in sorted(workloads, key=lambda r: r.path):
        groups.setdefault(pod_cgroup_path(ref.path) or ref.path, []).append(ref)
    return groups


factory = Factory(
    type="net_iface",
    kind="receiver",
    config_class=NetIfaceConfig,
    create=lambda context, config: NetIfaceReceiver(context, config),
    description="Interface rx/tx bytes, packets, errors and drops once per pod network namespace",
)
