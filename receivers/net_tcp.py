"""TCP per cgroup from bpf/net.bpf.c: bytes, retransmits, connections, smoothed RTT.

Every metric is charged to the cgroup that owns the SOCKET (sk->sk_cgrp_data, set at
socket(2); an accepted socket inherits its listener's), not to `current`: retransmits, state
changes and RTT samples fire mostly in softirq, on whatever task the CPU interrupted.

- kpod.net.tcp.bytes.sent / .received: bytes send/recv calls RETURNED (really moved), not the
  lengths requested.  Route per direction, first available: tp_btf/sock_{send,recv}_length
  (6.x), fexit/tcp_{send,recv}msg (kernels without those tracepoints, e.g. 6.1), kretprobes
  paired with kprobes at entry that keep the socket and MSG_PEEK per thread (arm64 before 6.4;
  returns beyond the kernel's kretprobe `maxactive` calls in flight are missed: docs/KERNELS.md).
  Before 6.5, sendfile and splice to a socket are counted at tcp_sendpage, beside.
- The socket's cgroup: sk_cgrp_data.cgroup (5.15+), else the pre-5.15 tagged union
  (bpf/core_fixes.bpf.h); kpod.bpf.force_routes: sock_cgroup_val takes the old route anywhere.
- kpod.net.tcp.retransmits: retransmitted segments, as the kernel counts them in TcpRetransSegs
  and TCP_INFO's tcpi_total_retrans: tcp_skb_pcount() of each skb tcp:tcp_retransmit_skb
  reports (one GSO/TSO skb carries several segments); on 6.11+ only those whose retransmission
  succeeded, as before 6.11, where the tracepoint fires for nothing else.  Plus one per SYN-ACK
  a listener retransmits (tcp:tcp_retransmit_synack; TcpExtTCPSynRetrans counts them too),
  charged to the listener's cgroup: a server pod whose SYN-ACKs are lost shows them (an
  accepted socket's tcpi_total_retrans starts at its handshake's).
- kpod.net.tcp.bytes.retransmitted: the payload bytes of the retransmitted skbs (skb->len), as
  TCP_INFO's tcpi_bytes_retrans counts them (a SYN-ACK has none): beside bytes.sent, the
  retransmit ratio in one unit (the recording rules' namespace_pod:kpod_net_tcp_retransmit_ratio:rate5m).
- kpod.net.tcp.connections{direction}: transitions to ESTABLISHED, `direction="active"` from
  SYN_SENT (connect) and `direction="passive"` from SYN_RECV (the accepting side).
- kpod.net.tcp.rtt: the socket's smoothed RTT at each tcp_probe (each incoming segment on an
  established socket), as the tracepoint reports it (srtt_us >> 3, microseconds; NOT scaled
  by 8 again), exported in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass

from kpod.component import Factory
from kpod.kernel import btflayout, libbpf
from kpod.kernel.cgroupwatch import CgroupBpfReceiver
from kpod.kernel.ebpf import (
    FORCE_KPROBE,
    FORCE_SOCK_CGROUP_VAL,
    PROGRAM_RUN_SECONDS,
    PROGRAM_RUNS,
    ProgramSpec,
    Route,
    hook_unavailable,
    set_rodata,
)
from kpod.model import Batch, Kind, MetricDef, Point, attributes

BYTES_SENT = MetricDef(
    "kpod.net.tcp.bytes.sent", Kind.COUNTER, "By", "Bytes sent on the cgroup's TCP sockets (as returned by send)"
)
BYTES_RECEIVED = MetricDef(
    "kpod.net.tcp.bytes.received",
    Kind.COUNTER,
    "By",
    "Bytes received on the cgroup's TCP sockets (as returned by recv; peeks not counted)",
)
RETRANSMITS = MetricDef(
    "kpod.net.tcp.retransmits",
    Kind.COUNTER,
    "{segment}",
    "TCP segments retransmitted on the cgroup's sockets, SYN-ACKs of its listeners included (as TcpRetransSegs"
    " counts them)",
)
BYTES_RETRANSMITTED = MetricDef(
    "kpod.net.tcp.bytes.retransmitted",
    Kind.COUNTER,
    "By",
    "Payload bytes retransmitted on the cgroup's TCP sockets (as TCP_INFO's tcpi_bytes_retrans counts them)",
)
CONNECTIONS = MetricDef(
    "kpod.net.tcp.connections",
    Kind.COUNTER,
    "1",
    "TCP connections of the cgroup's sockets that reached ESTABLISHED; direction: active (connect) or passive"
    " (accepted)",
    ("direction",),
)
RTT = MetricDef(
    "kpod.net.tcp.rtt",
    Kind.HISTOGRAM,
    "s",
    "Smoothed round-trip time of the cgroup's TCP sockets, sampled at each received segment",
)

ACTIVE = attributes(direction="active")
PASSIVE = attributes(direction="passive")

# The fexit receive route is compiled for tcp_recvmsg(sk, msg, len, flags, addr_len) (5.19+);
# older kernels have an extra `nonblock` parameter, which would shift `flags` and the return.
TCP_RECVMSG_PARAMS = 5
# tcp_probe reads tcp_sock through this kfunc; tcp_probe_read (one probe read) stands in without it.
RDONLY_CAST_KFUNC = "bpf_rdonly_cast"
SENDPAGE_FEED = f"{BYTES_SENT.name} (sendfile, splice: tcp_sendpage, before 6.5)"
# What the kretprobe routes' entry kprobes feed: the call's socket (and MSG_PEEK) for the return.
SENT_ENTRY_FEED = f"{BYTES_SENT.name} (the kretprobe's socket, kept at entry)"
SENDPAGE_ENTRY_FEED = f"{SENDPAGE_FEED} (the kretprobe's socket, kept at entry)"
RECEIVED_ENTRY_FEED = f"{BYTES_RECEIVED.name} (the kretprobe's socket and MSG_PEEK, kept at entry)"
# SYN-ACKs a listener retransmits: counted with the other retransmitted segments, from their own
# tracepoint (no skb of a write queue), beside tcp_retransmit rather than instead of it.
SYNACK_FEED = f"{RETRANSMITS.name} (SYN-ACKs of listeners)"


@dataclass
class NetTcpConfig:
    # The RTT histogram is the biggest map value (one histogram per pod) and tcp_probe the most
    # frequent TCP hook (each received segment): it can be switched off alone.
    rtt: bool = True


def kernel_function_params(name: str) -> int | None:
    """How many parameters the running kernel's function has (from its BTF), or None."""
    btf = btflayout.vmlinux()
    func_id = btf.find(name, btflayout.KIND_FUNC)
    if not func_id:
        return None
    proto = btf.type(btf.type(func_id).size_or_type)
    return len(proto.params) if proto.kind == btflayout.KIND_FUNC_PROTO else None


def kernel_struct_members(name: str) -> tuple[btflayout.BtfMember, ...]:
    btf = btflayout.vmlinux()
    type_id = btf.find(name, btflayout.KIND_STRUCT) or btf.find(name, btflayout.KIND_UNION)
    return btf.type(type_id).members if type_id else ()


class NetTcpReceiver(CgroupBpfReceiver):
    metrics = (
        BYTES_SENT, BYTES_RECEIVED, RETRANSMITS, BYTES_RETRANSMITTED, CONNECTIONS, RTT, PROGRAM_RUN_SECONDS,
        PROGRAM_RUNS,
    )  # fmt: skip
    object_name = "net"
    # All optional: the receiver is useful with any subset of its hooks.  Same `feeds` =
    # alternatives, first available wins (the others get autoload off).
    program_specs = (
        ProgramSpec("tcp_send_length", feeds=(BYTES_SENT.name,), optional=True),
        ProgramSpec("tcp_sendmsg_exit", feeds=(BYTES_SENT.name,), optional=True),
        ProgramSpec("tcp_sendmsg_ret", feeds=(BYTES_SENT.name,), optional=True),
        # The kretprobes' entry kprobes keep each call's socket (and MSG_PEEK) for the return.
        ProgramSpec("tcp_sendmsg_entry", feeds=(SENT_ENTRY_FEED,), optional=True, with_programs=("tcp_sendmsg_ret",)),
        # Before 6.5 sendfile and splice reach tcp_sendpage, not tcp_sendmsg: counted beside.
        ProgramSpec("tcp_sendpage_exit", feeds=(SENDPAGE_FEED,), optional=True),
        ProgramSpec("tcp_sendpage_ret", feeds=(SENDPAGE_FEED,), optional=True),
        ProgramSpec(
            "tcp_sendpage_entry", feeds=(SENDPAGE_ENTRY_FEED,), optional=True, with_programs=("tcp_sendpage_ret",)
        ),
        ProgramSpec("tcp_recv_length", feeds=(BYTES_RECEIVED.name,), optional=True),
        ProgramSpec("tcp_recvmsg_exit", feeds=(BYTES_RECEIVED.name,), optional=True),
        ProgramSpec("tcp_recvmsg_ret", feeds=(BYTES_RECEIVED.name,), optional=True),
        ProgramSpec(
            "tcp_recvmsg_entry", feeds=(RECEIVED_ENTRY_FEED,), optional=True, with_programs=("tcp_recvmsg_ret",)
        ),
        ProgramSpec("tcp_retransmit", feeds=(RETRANSMITS.name, BYTES_RETRANSMITTED.name), optional=True),
        ProgramSpec("tcp_retransmit_synack", feeds=(SYNACK_FEED,), optional=True),
        ProgramSpec("tcp_set_state", feeds=(CONNECTIONS.name,), optional=True),
        # bpf_rdonly_cast (6.2+) first; it fails to load on older kernels and is dropped.
        ProgramSpec("tcp_probe", feeds=(RTT.name,), optional=True),
        ProgramSpec("tcp_probe_read", feeds=(RTT.name,), optional=True),
    )

    def enabled_programs(self) -> set[str]:
        enabled = {s.program for s in self.program_specs}
        if not self.config.rtt:
            enabled -= {"tcp_probe", "tcp_probe_read"}
        if kernel_function_params("tcp_recvmsg") not in (None, TCP_RECVMSG_PARAMS):
            # Pre-5.19 signature: the kretprobe (return value only) is the right fallback.
            enabled.discard("tcp_recvmsg_exit")
        if kernel_function_params(RDONLY_CAST_KFUNC) is None:
            # Before 6.2: it would only fail to load (one wasted load attempt and a warning).
            enabled.discard("tcp_probe")
        return enabled

    def before_load(self, obj: libbpf.BpfObject) -> None:
        if FORCE_SOCK_CGROUP_VAL in self.force_routes:
            set_rodata(obj, "kpod_force_sock_cgroup_val", 1)
        recvmsg_params = kernel_function_params("tcp_recvmsg")
        if recvmsg_params is not None and recvmsg_params > TCP_RECVMSG_PARAMS:
            set_rodata(obj, "kpod_recvmsg_flags_5th", 1)  # before 5.19: (sk, msg, len, nonblock, flags, ...)
        if not self.kprobes_possible():
            obj.maps["tcp_calls"].set_max_entries(1)  # the kprobe route's per-thread calls: unused

    def kprobes_possible(self) -> bool:
        """Whether a kretprobe route could be taken on this kernel: only where a byte
        tracepoint is missing, or tcp_sendpage exists (before 6.5), or kprobes are forced."""
        if FORCE_KPROBE in self.force_routes:
            return True
        if kernel_function_params("tcp_sendpage") is not None:
            return True
        return any(hook_unavailable(f"tp_btf/sock_{d}_length") for d in ("send", "recv"))

    def choices(self) -> dict[str, str]:
        if FORCE_SOCK_CGROUP_VAL in self.force_routes:
            layout = "sock_cgroup_data.val, the pre-5.15 tagged union (kpod.bpf.force_routes: sock_cgroup_val)"
        elif "cgroup" in {m.name for m in kernel_struct_members("sock_cgroup_data")}:
            layout = "sk_cgrp_data.cgroup (5.15+)"
        else:
            layout = "sock_cgroup_data.val, the pre-5.15 tagged union (root cgroup once net_cls/net_prio tag it)"
        return {"socket cgroup": layout}

    def start(self) -> None:
        super().start()
        if self.loaded is not None:
            self._explain(self.loaded.routes)

    def routes(self) -> list[Route]:
        return self._explain(super().routes())

    def _explain(self, routes: list[Route]) -> list[Route]:
        """Say why the fexit receive route is off when it is the kernel's signature, not config."""
        params = kernel_function_params("tcp_recvmsg")
        has_rdonly_cast = kernel_function_params(RDONLY_CAST_KFUNC) is not None
        for route in routes:
            if route.program == "tcp_recvmsg_exit" and not route.active and params not in (None, TCP_RECVMSG_PARAMS):
                route.reason = f"tcp_recvmsg has {params} parameters here, the program expects {TCP_RECVMSG_PARAMS}"
            if route.program == "tcp_probe" and not route.active and not has_rdonly_cast:
                route.reason = f"kernel has no {RDONLY_CAST_KFUNC} kfunc (6.2+)"
        return routes

    def collect_maps(self, batch: Batch) -> None:
        sent = self.feeds_active(BYTES_SENT.name)
        received = self.feeds_active(BYTES_RECEIVED.name)
        retransmits = self.feeds_active(RETRANSMITS.name)
        connections = self.feeds_active(CONNECTIONS.name)
        start = self.loaded.loaded_at_ns if self.loaded else 0
        for ref, v in self.read_cgroup_map("net_tcp"):
            if sent:
                batch.add(self.point(BYTES_SENT, ref, float(v.bytes_sent)))
            if received:
                batch.add(self.point(BYTES_RECEIVED, ref, float(v.bytes_received)))
            if retransmits:
                batch.add(self.point(RETRANSMITS, ref, float(v.retransmits)))
                batch.add(self.point(BYTES_RETRANSMITTED, ref, float(v.bytes_retransmitted)))
            if connections:
                batch.add(Point(CONNECTIONS, ref, ACTIVE, float(v.conn_active), None, start))
                batch.add(Point(CONNECTIONS, ref, PASSIVE, float(v.conn_passive), None, start))
        if self.feeds_active(RTT.name):
            for ref, hist in self.read_cgroup_map("net_rtt"):
                batch.add(self.point(RTT, ref, self.histogram(hist)))


factory = Factory(
    "net_tcp",
    "receiver",
    NetTcpConfig,
    NetTcpReceiver,
    "eBPF: TCP bytes (as returned), retransmitted segments, connections and smoothed RTT per socket-owning cgroup",
    requires_bpf=True,
)
