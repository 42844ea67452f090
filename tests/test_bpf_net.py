"""The net_tcp receiver against the real kernel, compared with what the sockets themselves say.

Two pods (kubepods-shaped cgroup2 directories), one process each, a loopback TCP transfer of an
odd number of bytes from pod A to pod B.  Ground truth: the sum of send()'s return values in A,
of recv()'s in B, and each socket's TCP_INFO (laid out from the kernel's BTF).  Retransmits are
provoked in a private network namespace whose loopback drops every packet for a while (a
generic-XDP drop program compiled here; the host's interfaces are never touched).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import BpftoolBtf, poll_until, require_tools
from kernel_util import (
    ODD_BYTES,
    REPO,
    Workload,
    cgroup_tree,
    context,
    forced_routes,
    kernel_test,
    points_for,
    transfer,
    workloads,
)
from kpod.receivers.net_tcp import RTT, TCP_RECVMSG_PARAMS, NetTcpConfig, NetTcpReceiver

from kpod.kernel import bpfinfo, btflayout, ebpf, libbpf

pytestmark = kernel_test

RTT_NAME = RTT.name


def collect(receiver: NetTcpReceiver):
    receiver.context.cgroups.refresh()
    return receiver.collect()


def value(batch, metric: str, cgroup_id: int, **attrs: str) -> float | None:
    points = [
        p for p in points_for(batch, metric, cgroup_id) if all(dict(p.attributes).get(k) == v for k, v in attrs.items())
    ]
    assert len(points) <= 1, points
    return points[0].value if points else None


def tcp_info(hexdata: str) -> ctypes.Structure:
    """TCP_INFO bytes as the kernel's own struct tcp_info (from BTF, no hand-written offsets)."""
    info_t = btflayout.vmlinux_struct("tcp_info")
    raw = bytes.fromhex(hexdata)
    return info_t.from_buffer_copy(raw.ljust(ctypes.sizeof(info_t), b"\0"))


@contextlib.contextmanager
def private_netns() -> Iterator[str]:
    """A network namespace of our own with loopback up; deleted afterwards, also on failure."""
    require_tools("ip")
    name = f"kpod-test-{uuid.uuid4().hex[:10]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


DROP_ALL_XDP = """
struct xdp_md;
__attribute__((section("xdp"), used)) int drop_all(struct xdp_md *ctx) { return 1; /* XDP_DROP */ }
char LICENSE[] __attribute__((section("license"), used)) = "GPL";
"""


# Drops the IPv4 TCP segments without SYN: a handshake's SYN and SYN-ACK pass, the client's
# ACK that completes it does not, so the listener's request waits and retransmits its SYN-ACK.
DROP_NON_SYN_XDP = """
struct xdp_md { unsigned int data, data_end; };
__attribute__((section("xdp"), used)) int drop_non_syn(struct xdp_md *ctx)
{
	unsigned char *data = (unsigned char *)(unsigned long)ctx->data;
	unsigned char *end = (unsigned char *)(unsigned long)ctx->data_end;
	unsigned char *ip = data + 14, *tcp;

	if (ip + 20 > end || data[12] != 0x08 || data[13] != 0x00 || ip[9] != 6)
		return 2;  /* XDP_PASS: not IPv4 TCP (loopback frames have an Ethernet header) */
	tcp = ip + (ip[0] & 0x0f) * 4;
	if (tcp + 14 > end)
		return 2;
	return (tcp[13] & 0x02) ? 2 : 1;  /* SYN passes, anything else is dropped */
}
char LICENSE[] __attribute__((section("license"), used)) = "GPL";
"""


def build_drop_program(tmp_path: Path, source: str = DROP_ALL_XDP) -> Path:
    require_tools("clang")
    src, obj = tmp_path / "drop.bpf.c", tmp_path / "drop.bpf.o"
    src.write_text(source)
    subprocess.run(["clang", "-O2", "-target", "bpf", "-c", str(src), "-o", str(obj)], check=True)
    return obj


@contextlib.contextmanager
def dropping(ns: str, program: Path) -> Iterator[None]:
    """The XDP `program` on the namespace's loopback (generic XDP: every packet in the namespace
    goes through it on receive) for the block; detached afterwards, also on failure."""
    lo = ["ip", "-n", ns, "link", "set", "dev", "lo", "xdpgeneric"]
    subprocess.run([*lo, "obj", str(program), "sec", "xdp"], check=True)
    try:
        yield
    finally:
        subprocess.run([*lo, "off"], check=True)


class ProbeReadReceiver(NetTcpReceiver):
    """As on kernels without the bpf_rdonly_cast kfunc (< 6.2): the probe-read RTT program."""

    def enabled_programs(self) -> set[str]:
        return super().enabled_programs() - {"tcp_probe"}


@pytest.mark.parametrize("receiver_class", [NetTcpReceiver, ProbeReadReceiver], ids=["rdonly_cast", "probe_read"])
def test_loopback_transfer_exact_bytes_connections_and_rtt(receiver_class: type[NetTcpReceiver]) -> None:
    receiver = receiver_class(context("net_tcp"), NetTcpConfig())
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            a, b = transfer(tree, procs, pod_a, pod_b)
            a.send("send")
            b_result = json.loads(b.readline())
            a_result = json.loads(a.readline())
            assert a_result["sent"] == ODD_BYTES and b_result["received"] == ODD_BYTES
            batch = collect(receiver)
            A, B = pod_a.container_id, pod_b.container_id
            # Bytes: exactly what the calls returned, each side charged to its own pod.
            assert value(batch, "kpod.net.tcp.bytes.sent", A) == ODD_BYTES
            assert value(batch, "kpod.net.tcp.bytes.received", B) == ODD_BYTES
            assert value(batch, "kpod.net.tcp.bytes.received", A) == 0
            assert value(batch, "kpod.net.tcp.bytes.sent", B) == 0
            # Connections: the connect()ing side is active, the accepting side passive.
            assert value(batch, "kpod.net.tcp.connections", A, direction="active") == 1
            assert value(batch, "kpod.net.tcp.connections", A, direction="passive") == 0
            assert value(batch, "kpod.net.tcp.connections", B, direction="passive") == 1
            assert value(batch, "kpod.net.tcp.connections", B, direction="active") == 0
            # Retransmits (usually none on loopback): segments and payload bytes, as TCP_INFO counts them.
            assert value(batch, "kpod.net.tcp.retransmits", A) == tcp_info(a_result["info"]).tcpi_total_retrans
            assert value(batch, "kpod.net.tcp.bytes.retransmitted", A) == tcp_info(a_result["info"]).tcpi_bytes_retrans
            # RTT: non-empty for both sockets' pods.
            rtt_a = value(batch, "kpod.net.tcp.rtt", A)
            rtt_b = value(batch, "kpod.net.tcp.rtt", B)
            # One RTT program: tcp_probe where the kernel has bpf_rdonly_cast (6.2+), else the
            # probe-read one (Debian's 6.1 in `make test-vm` takes that branch by load failure).
            rtt_programs = {r.program for r in receiver.loaded.routes if r.active and RTT_NAME in r.feeds}
            assert len(rtt_programs) == 1 and rtt_programs <= {"tcp_probe", "tcp_probe_read"}, rtt_programs
            if receiver_class is ProbeReadReceiver:
                assert rtt_programs == {"tcp_probe_read"}
            assert rtt_a is not None and rtt_a.count > 0
            assert rtt_b is not None and rtt_b.count > 0
            assert points_for(batch, "kpod.net.tcp.rtt", A)[0].metric.unit == "s"
            # B never sends data, so its srtt is fixed at the handshake's SYN-ACK sample: every
            # sample must equal TCP_INFO's tcpi_rtt (srtt_us >> 3, microseconds) exactly.
            # Scaling by 8 (or not shifting at all) would be off by 8x.
            b_rtt_us = tcp_info(b_result["info"]).tcpi_rtt
            assert b_rtt_us > 0
            assert rtt_b.sum == pytest.approx(rtt_b.count * b_rtt_us * 1e-6, rel=1e-9), (rtt_b, b_rtt_us)
            assert sum(1 for c in rtt_b.counts if c) == 1  # one value: one bucket
            # A's srtt moves with every ACK, and a busy machine (qemu TCG in make test-vm) can
            # stretch one sample tenfold (43.7 ms against a final srtt of 4.9 ms was seen), so
            # A is checked for the unit only: B's exact equality above is what catches a scaling
            # error.  Microseconds or nanoseconds taken as seconds would be far above 1 s.
            assert tcp_info(a_result["info"]).tcpi_rtt > 0
            assert 0 < rtt_a.sum / rtt_a.count < 1.0
        finally:
            receiver.shutdown()


def test_accepted_socket_belongs_to_the_listeners_cgroup() -> None:
    """Verified here: an accepted socket inherits its LISTENER's cgroup (sk_clone_lock copies
    sk_cgrp_data), not the cgroup the accepting task is in at accept() time.  In a pod the
    listener is created by the container's own process, so this is the socket's owner.  Every
    byte route charges the socket (the kretprobe one through the socket its entry kprobe kept)."""
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b, pod_c = tree.pod(), tree.pod(), tree.pod()
        receiver.start()
        try:
            a, b = transfer(tree, procs, pod_a, pod_b, nbytes=4097, move_b_to=pod_c)
            a.send("send")
            assert json.loads(b.readline())["received"] == 4097
            a.readline()
            batch = collect(receiver)
            assert value(batch, "kpod.net.tcp.bytes.received", pod_b.container_id) == 4097
            assert value(batch, "kpod.net.tcp.connections", pod_b.container_id, direction="passive") == 1
            assert value(batch, "kpod.net.tcp.bytes.received", pod_c.container_id) is None
            assert not points_for(batch, "kpod.net.tcp.rtt", pod_b.container_id), "rtt: false"
        finally:
            receiver.shutdown()


def test_retransmits_charged_to_the_sending_pod(tmp_path: Path) -> None:
    drop = build_drop_program(tmp_path)
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig())
    with private_netns() as ns, cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            a, b = transfer(tree, procs, pod_a, pod_b, netns=ns, nbytes=1001)
            misses_before = recursion_misses(receiver, "tcp_retransmit")
            # Every packet on the namespace's loopback is dropped on receive: A's data is lost
            # after A sent it successfully, so A must retransmit once the drop is gone.
            with dropping(ns, drop):
                a.send("send")
                time.sleep(1.0)  # a few RTO / tail-loss-probe rounds
            assert json.loads(b.readline(timeout=60))["received"] == 1001
            a_result = json.loads(a.readline(timeout=60))
            truth = tcp_info(a_result["info"]).tcpi_total_retrans
            assert truth > 0, "the drop did not cause a retransmission"
            batch = collect(receiver)
            got = value(batch, "kpod.net.tcp.retransmits", pod_a.container_id)
            # One 1001-byte skb: each retransmission is one segment, so skbs == segments (the
            # program's recursion misses aside: assert_counted).
            misses = recursion_misses(receiver, "tcp_retransmit") - misses_before
            assert_counted(got, truth, misses, "segments")
            assert value(batch, "kpod.net.tcp.retransmits", pod_b.container_id) == 0
            # Their payload (a lone FIN retransmitted has none), as tcpi_bytes_retrans counts it.
            bytes_truth = tcp_info(a_result["info"]).tcpi_bytes_retrans
            assert bytes_truth >= 1001
            got_bytes = value(batch, "kpod.net.tcp.bytes.retransmitted", pod_a.container_id)
            assert_counted(got_bytes, bytes_truth, misses, "bytes")
            assert value(batch, "kpod.net.tcp.bytes.retransmitted", pod_b.container_id) == 0
            assert value(batch, "kpod.net.tcp.bytes.sent", pod_a.container_id) == 1001
        finally:
            receiver.shutdown()


# The independent side of the segment test: every tcp_retransmit_skb event (successful or not,
# so never fewer than the successful ones the agent sees), per network namespace, in a map.
SKB_COUNTER_SOURCE = """
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, __u32);    /* the socket's network namespace (its inode number) */
	__type(value, __u64);  /* tracepoint events: one per retransmitted skb */
} skbs SEC(".maps");
SEC("tp_btf/tcp_retransmit_skb")
int count_skbs(unsigned long long *ctx)
{
	const struct sock *sk = (const struct sock *)ctx[0];
	__u32 netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	__u64 one = 1, *n = bpf_map_lookup_elem(&skbs, &netns);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		bpf_map_update_elem(&skbs, &netns, &one, BPF_NOEXIST);
	return 0;
}
char LICENSE[] SEC("license") = "GPL";
"""


@contextlib.contextmanager
def retransmitted_skbs(directory: Path, ns: str) -> Iterator[Callable[[], int]]:
    """Counts tcp_retransmit_skb events on sockets of network namespace `ns` from now until exit
    (detached and closed also on failure); yields the function that reads the count."""
    obj_path = compile_bpf(directory, "skbs", SKB_COUNTER_SOURCE)
    with libbpf.BpfObject.open(str(obj_path)) as obj:
        obj.load()
        obj.programs["count_skbs"].attach()
        key = os.stat(f"/run/netns/{ns}").st_ino.to_bytes(4, sys.byteorder)
        yield lambda: int.from_bytes(obj.maps["skbs"].lookup(key) or bytes(8), sys.byteorder)


def recursion_misses(receiver: NetTcpReceiver, program: str) -> int:
    """How often the kernel skipped `program` because it was already running on that CPU
    (bpf_prog_info.recursion_misses, 5.12+; 0 where the kernel does not report it)."""
    assert receiver.loaded is not None
    info = bpfinfo.prog_info(receiver.loaded.obj.programs[program].fd)
    return int(getattr(info, "recursion_misses", 0))


def assert_counted(got: float | None, truth: int, misses: int, what: str) -> None:
    """The agent's count equals the kernel's, unless the kernel skipped runs of the counting
    program (`misses`, see recursion_misses): a run skipped on a CPU where the program was
    already running (a softirq's retransmission interrupting another socket's in process
    context) loses that retransmission, so then the count may be lower, never higher."""
    if misses == 0:
        assert got == truth, (what, got, truth)
    else:
        assert got is not None and got <= truth, (what, got, truth, f"recursion misses {misses}")


def netns_tcp_mib(ns: str) -> dict[str, int]:
    """The namespace's own TCP counters (per network namespace) under nstat's names: the Tcp:
    table of /proc/net/snmp (TcpRetransSegs) and the TcpExt: one of /proc/net/netstat
    (TcpExtTCPSynRetrans).  Each table is a line of names followed by a line of values."""
    text = subprocess.run(["ip", "netns", "exec", ns, "cat", "/proc/net/snmp", "/proc/net/netstat"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    lines = [line.split() for line in text.splitlines() if line.startswith(("Tcp:", "TcpExt:"))]
    mib: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        assert names[0] == values[0], (names, values)
        table = names[0].rstrip(":")
        mib.update({table + name: int(value) for name, value in zip(names[1:], values[1:], strict=True)})
    return mib


def test_retransmits_count_segments_of_multi_segment_skbs(tmp_path: Path) -> None:
    """The kernel counts a retransmission as tcp_skb_pcount(skb) segments (tcpi_total_retrans,
    TcpRetransSegs); under GSO one retransmitted skb carries several.  The namespace's loopback
    gets a 1500-byte MTU (MSS 1448, GSO skbs of up to 44 segments), the whole first flight of
    300 kB is dropped, and after the drop the sender's slow start retransmits it several
    segments per skb.  The agent must count the segments, as the kernel does."""
    drop = build_drop_program(tmp_path)
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    nbytes = 300_001
    with private_netns() as ns, cgroup_tree() as tree, workloads() as procs, retransmitted_skbs(tmp_path, ns) as skbs:
        subprocess.run(["ip", "-n", ns, "link", "set", "dev", "lo", "mtu", "1500"], check=True)
        # Multi-segment retransmissions at any machine speed (the namespace's own settings, gone
        # with it): skbs of at least 16 segments (where the RTT is long, as under qemu TCG, TSO
        # autosizing makes them as small as 2), and plain RTO recovery, whose slow start
        # retransmits 2, 4, 8 ... segments per skb (F-RTO may send new data instead).
        subprocess.run(["ip", "netns", "exec", ns, "sh", "-c", "echo 16 > /proc/sys/net/ipv4/tcp_min_tso_segs"
                        " && echo 0 > /proc/sys/net/ipv4/tcp_frto"], check=True)  # fmt: skip
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            a, b = transfer(tree, procs, pod_a, pod_b, netns=ns, nbytes=nbytes)
            mib_before = netns_tcp_mib(ns)
            misses_before = recursion_misses(receiver, "tcp_retransmit")
            with dropping(ns, drop):
                a.send("send")
                time.sleep(1.0)  # the first flight is lost; RTO and loss probes fire
            assert json.loads(b.readline(timeout=60))["received"] == nbytes
            a_result = json.loads(a.readline(timeout=60))
            truth = tcp_info(a_result["info"]).tcpi_total_retrans
            mib = netns_tcp_mib(ns)
            batch = collect(receiver)
            got = value(batch, "kpod.net.tcp.retransmits", pod_a.container_id)
            events = skbs()
            # Only A's connection lives in this namespace: its MIB is that socket's, as nstat shows it.
            assert mib["TcpRetransSegs"] - mib_before["TcpRetransSegs"] == truth
            # The scenario did what it is for: fewer retransmitted skbs than segments.
            assert 0 < events < truth, (events, truth)
            misses = recursion_misses(receiver, "tcp_retransmit") - misses_before
            assert_counted(got, truth, misses, f"segments ({events} skbs)")
            assert value(batch, "kpod.net.tcp.retransmits", pod_b.container_id) == 0
            # Their payload, as the kernel adds it up (tcpi_bytes_retrans).
            bytes_truth = tcp_info(a_result["info"]).tcpi_bytes_retrans
            assert bytes_truth > 0
            got_bytes = value(batch, "kpod.net.tcp.bytes.retransmitted", pod_a.container_id)
            assert_counted(got_bytes, bytes_truth, misses, "bytes")
            assert value(batch, "kpod.net.tcp.bytes.sent", pod_a.container_id) == nbytes
        finally:
            receiver.shutdown()


def test_synack_retransmits_charged_to_the_listening_pod(tmp_path: Path) -> None:
    """A listener's SYN-ACK retransmissions count in the namespace's TcpRetransSegs (and
    TcpExtTCPSynRetrans), not through tcp_retransmit_skb: tcp_rtx_synack has a tracepoint of
    its own.  Pod B listens, pod A connects; the namespace's loopback drops every segment
    without SYN, so A's handshake ACK is lost and B's request retransmits its SYN-ACK, after
    about 1 s, then 2 s later.  The drop stays until the kernel has counted two (a count, not
    a flag), then A's data completes the handshake.  B's cgroup must count exactly the SYN-ACKs
    the namespace counted, which is also what B's accepted socket reports
    (tcp_create_openreq_child starts its total_retrans at the request's), and A's cgroup none
    of them."""
    drop = build_drop_program(tmp_path, DROP_NON_SYN_XDP)
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    with private_netns() as ns, cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            synack = {r.program: r for r in receiver.loaded.routes}["tcp_retransmit_synack"]
            assert synack.active, synack
            mib_before = netns_tcp_mib(ns)
            with dropping(ns, drop):
                a, b = transfer(tree, procs, pod_a, pod_b, netns=ns, nbytes=1001)  # A's connect() returned
                before = mib_before["TcpExtTCPSynRetrans"]
                counted = poll_until(lambda: netns_tcp_mib(ns)["TcpExtTCPSynRetrans"] >= before + 2, 120, 0.1)
                assert counted, f"not two SYN-ACKs retransmitted in 120 s: {netns_tcp_mib(ns)}"
            a.send("send")
            b_result = json.loads(b.readline(timeout=120))
            a_result = json.loads(a.readline(timeout=120))
            assert b_result["received"] == 1001
            mib = netns_tcp_mib(ns)
            batch = collect(receiver)
            segs = mib["TcpRetransSegs"] - mib_before["TcpRetransSegs"]
            synacks = mib["TcpExtTCPSynRetrans"] - mib_before["TcpExtTCPSynRetrans"]
            a_info, b_info = tcp_info(a_result["info"]), tcp_info(b_result["info"])
            seen = {"TcpRetransSegs": segs, "TcpExtTCPSynRetrans": synacks, "A tcpi_total_retrans":
                    a_info.tcpi_total_retrans, "B tcpi_total_retrans": b_info.tcpi_total_retrans}  # fmt: skip
            # B sent no data before reading its TCP_INFO: its retransmissions are the SYN-ACKs.
            assert synacks >= 2 and b_info.tcpi_total_retrans == synacks, seen
            # Whatever else the namespace retransmitted is A's own (none, unless a loaded machine
            # delayed B's ACK of A's data past A's loss probe).
            assert segs == synacks + a_info.tcpi_total_retrans, seen
            assert value(batch, "kpod.net.tcp.retransmits", pod_b.container_id) == synacks, seen
            assert value(batch, "kpod.net.tcp.retransmits", pod_a.container_id) == a_info.tcpi_total_retrans, seen
            # A SYN-ACK carries no payload, and tcpi_bytes_retrans does not count it.
            assert b_info.tcpi_bytes_retrans == 0
            assert value(batch, "kpod.net.tcp.bytes.retransmitted", pod_b.container_id) == 0
            assert value(batch, "kpod.net.tcp.connections", pod_b.container_id, direction="passive") == 1
        finally:
            receiver.shutdown()


def test_retransmits_without_the_synack_tracepoint(monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel whose BTF has no tcp_retransmit_synack tracepoint: that program alone is off,
    with the reason, and the other retransmissions are still counted."""
    real = ebpf.hook_unavailable
    hidden = "tp_btf/tcp_retransmit_synack"
    monkeypatch.setattr(ebpf, "hook_unavailable", lambda s: f"hidden by the test: {s}" if s == hidden else real(s))
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    receiver.start()
    try:
        routes = {r.program: r for r in receiver.loaded.routes}
        assert not routes["tcp_retransmit_synack"].active
        assert routes["tcp_retransmit_synack"].reason == f"hidden by the test: {hidden}"
        assert routes["tcp_retransmit"].active, routes["tcp_retransmit"]
        assert receiver.feeds_active("kpod.net.tcp.retransmits")
    finally:
        receiver.shutdown()


# Empty programs on the fallback hooks: the independent side of the fallback test.  What they
# meet is the kernel's answer, not the receiver's choice.
PROBES = {"fexit/tcp_sendmsg": "fexit_send", "kretprobe/tcp_sendmsg": "kretprobe_send",
          "fexit/tcp_recvmsg": "fexit_recv", "kretprobe/tcp_recvmsg": "kretprobe_recv"}  # fmt: skip
PROBE_SOURCE = (
    '#include "vmlinux.h"\n#include <bpf/bpf_helpers.h>\n'
    + "".join(f'SEC("{section}") int {name}(void *ctx) {{ return 0; }}\n' for section, name in PROBES.items())
    + 'char LICENSE[] SEC("license") = "GPL";\n'
)


def compile_bpf(directory: Path, name: str, source: str) -> Path:
    """`source` compiled as the project's BPF objects are (against bpf/vmlinux.h) into
    directory/<name>.bpf.o."""
    require_tools("clang")
    src, obj_path = directory / f"{name}.bpf.c", directory / f"{name}.bpf.o"
    src.write_text(source)
    arch = {"x86_64": "x86", "aarch64": "arm64"}[os.uname().machine]
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", "-I", str(REPO / "bpf"),
                    "-c", str(src), "-o", str(obj_path)], check=True)  # fmt: skip
    return obj_path


def build_probes(directory: Path) -> Path:
    return compile_bpf(directory, "probes", PROBE_SOURCE)


def kernel_refuses(probes: Path, section: str) -> str | None:
    """Why this kernel does not load and attach the empty program at `section`, or None."""
    try:
        with libbpf.BpfObject.open(str(probes)) as obj:
            for name, program in obj.programs.items():
                program.set_autoload(name == PROBES[section])
            obj.load()
            obj.programs[PROBES[section]].attach()
    except libbpf.LibbpfError as exc:
        return str(exc)
    return None


def tcp_recvmsg_params() -> int:
    """tcp_recvmsg's parameter count, as bpftool reads the kernel's BTF."""
    btf = BpftoolBtf("/sys/kernel/btf/vmlinux")
    return len(btf.types[btf.types[btf.named("FUNC", "tcp_recvmsg")]["type_id"]]["params"])


def expected_route(probes: Path, function: str, fexit: str, kretprobe: str, params_ok: bool = True) -> str | None:
    """The first alternative this kernel can run for `function`'s bytes (kpod.bpf.force_routes:
    kprobe, as `make test`'s second pass sets it, takes the kretprobe even where fexit runs)."""
    if params_ok and "kprobe" not in forced_routes() and kernel_refuses(probes, f"fexit/{function}") is None:
        return fexit
    if kernel_refuses(probes, f"kretprobe/{function}") is None:
        return kretprobe
    return None


def test_route_falls_back_when_the_tracepoints_are_missing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On a kernel without sock:sock_{send,recv}_length (Debian's 6.1) the plan picks fexit,
    then kretprobes; a program that cannot run here is dropped and the receiver runs on.  Which
    route must win is found out independently: empty fexit and kretprobe programs of our own
    on the same functions, and tcp_recvmsg's parameter count as bpftool reads the kernel's BTF."""
    real = ebpf.hook_unavailable

    def without_length_tracepoints(section: str) -> str | None:
        if section in ("tp_btf/sock_send_length", "tp_btf/sock_recv_length"):
            return "kernel has no tp_btf/" + section.split("/")[1]
        return real(section)

    monkeypatch.setattr(ebpf, "hook_unavailable", without_length_tracepoints)
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig())
    specs = receiver.program_specs
    probes = build_probes(tmp_path)
    # The plan alone, as `kpod-metrics check` prints it: fexit is next in line for sends, if an
    # fexit program can attach here (not on this host: EPERM; nor on arm64 before 6.4).
    routes = {r.program: r for r in ebpf.plan_routes("net", "", specs, receiver.enabled_programs())}
    assert not routes["tcp_send_length"].active and "no tp_btf/sock_send_length" in routes["tcp_send_length"].reason
    fexit_ok = kernel_refuses(probes, "fexit/tcp_sendmsg") is None
    assert routes["tcp_sendmsg_exit"].active == fexit_ok, routes
    if fexit_ok:
        assert not routes["tcp_sendmsg_ret"].active
    else:
        assert "cannot attach to tcp_sendmsg" in routes["tcp_sendmsg_exit"].reason
    assert routes["tcp_retransmit"].active
    assert routes["tcp_probe"].active or routes["tcp_probe_read"].active  # the latter before 6.2

    expected = {
        "sent": expected_route(probes, "tcp_sendmsg", "tcp_sendmsg_exit", "tcp_sendmsg_ret"),
        "received": expected_route(probes, "tcp_recvmsg", "tcp_recvmsg_exit", "tcp_recvmsg_ret",
                                   params_ok=tcp_recvmsg_params() == TCP_RECVMSG_PARAMS),
    }  # fmt: skip
    # Loading for real: whatever cannot load is dropped with its reason, the other TCP metrics work.
    receiver.start()
    try:
        loaded = {r.program: r for r in receiver.loaded.routes}
        for program in ("tcp_retransmit", "tcp_set_state"):
            assert loaded[program].active, loaded[program]
        assert loaded["tcp_probe"].active or loaded["tcp_probe_read"].active
        for program in ("tcp_send_length", "tcp_recv_length"):
            assert not loaded[program].active
        for direction, alternatives in (("sent", ("tcp_sendmsg_exit", "tcp_sendmsg_ret")),
                                        ("received", ("tcp_recvmsg_exit", "tcp_recvmsg_ret"))):  # fmt: skip
            active = [p for p in alternatives if loaded[p].active]
            assert active == ([expected[direction]] if expected[direction] else []), (direction, loaded)
            assert all(loaded[p].reason for p in alternatives if not loaded[p].active), loaded
    finally:
        receiver.shutdown()


def test_kernel_function_params_reads_btf() -> None:
    from kpod.receivers.net_tcp import kernel_function_params

    assert kernel_function_params("tcp_sendmsg") == 3  # (sk, msg, size) since 4.1
    assert kernel_function_params("no_such_function_kpod") is None


@pytest.mark.parametrize("route", ["fexit", "kretprobe"])
def test_fallback_byte_routes_are_exact(route: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Bytes through the routes kernels without sock_*_length use.  This host refuses fentry
    (EPERM) and has no kprobes, so here the test skips with the kernel's answer; in Debian's 6.1
    (`make test-vm`) both routes load and must be as exact as the tracepoints.  A route the
    kernel would run (an empty program of our own loads there) but the receiver dropped fails."""
    if route == "fexit" and "kprobe" in forced_routes():
        pytest.skip("kpod.bpf.force_routes: kprobe drops fexit programs by design (the unforced pass tests them)")
    real = ebpf.hook_unavailable
    hidden = {"tp_btf/sock_send_length", "tp_btf/sock_recv_length"}
    if route == "kretprobe":
        hidden |= {"fexit/tcp_sendmsg", "fexit/tcp_recvmsg"}
    monkeypatch.setattr(ebpf, "hook_unavailable", lambda s: f"hidden by the test: {s}" if s in hidden else real(s))
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            programs = {
                "fexit": ("tcp_sendmsg_exit", "tcp_recvmsg_exit"),
                "kretprobe": ("tcp_sendmsg_ret", "tcp_recvmsg_ret"),
            }
            routes = {r.program: r for r in receiver.loaded.routes}
            off = [p for p in programs[route] if not routes[p].active]
            if off:
                probes = build_probes(tmp_path)
                hooks = {p: f"{route}/tcp_{'send' if 'send' in p else 'recv'}msg" for p in off}
                refused = {p: kernel_refuses(probes, hook) for p, hook in hooks.items()}
                if route == "fexit" and "tcp_recvmsg_exit" in off and tcp_recvmsg_params() != TCP_RECVMSG_PARAMS:
                    refused["tcp_recvmsg_exit"] = f"tcp_recvmsg has {tcp_recvmsg_params()} parameters here"
                dropped = {p: routes[p].reason for p, why in refused.items() if why is None}
                assert not dropped, f"this kernel runs {route} programs, the receiver dropped {dropped}"
                pytest.skip(f"this kernel cannot run the {route} route: {refused}")
            a, b = transfer(tree, procs, pod_a, pod_b, nbytes=ODD_BYTES)
            a.send("send")
            assert json.loads(b.readline())["received"] == ODD_BYTES
            assert json.loads(a.readline())["sent"] == ODD_BYTES
            batch = collect(receiver)
            assert value(batch, "kpod.net.tcp.bytes.sent", pod_a.container_id) == ODD_BYTES
            assert value(batch, "kpod.net.tcp.bytes.received", pod_b.container_id) == ODD_BYTES
            assert value(batch, "kpod.net.tcp.bytes.received", pod_a.container_id) == 0
            assert value(batch, "kpod.net.tcp.bytes.sent", pod_b.container_id) == 0
        finally:
            receiver.shutdown()


@pytest.mark.parametrize("method", ["sendfile", "splice"])
def test_sendfile_and_splice_bytes_are_exact(method: str) -> None:
    """Bytes the kernel moves from a file or a pipe into the socket: before 6.5 they reach
    tcp_sendpage, past every sendmsg route (Debian 12's 6.1 counted none of them); 6.5+ sends
    them through sendmsg, so the tracepoint route sees them.  Exact either way."""
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            routes = {r.program: r for r in receiver.loaded.routes}
            if not any(routes[p].active for p in ("tcp_send_length", "tcp_sendmsg_exit", "tcp_sendmsg_ret")):
                pytest.skip("no route for sent bytes on this kernel")
            a, b = transfer(tree, procs, pod_a, pod_b, nbytes=ODD_BYTES, method=method)
            a.send("send")
            assert json.loads(b.readline())["received"] == ODD_BYTES
            assert json.loads(a.readline())["sent"] == ODD_BYTES
            batch = collect(receiver)
            assert value(batch, "kpod.net.tcp.bytes.sent", pod_a.container_id) == ODD_BYTES, routes
            assert value(batch, "kpod.net.tcp.bytes.received", pod_b.container_id) == ODD_BYTES
        finally:
            receiver.shutdown()


def receive_route(receiver: NetTcpReceiver) -> str:
    active = [r.hook for r in receiver.loaded.routes if r.active and "kpod.net.tcp.bytes.received" in r.feeds]
    return active[0] if active else ""


def test_peeked_bytes_are_not_received_twice() -> None:
    """MSG_PEEK returns bytes that stay queued: only the read that consumes them counts (on the
    kretprobe route too: its entry kprobe keeps the call's flags)."""
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            a, b = transfer(tree, procs, pod_a, pod_b, peek=True)
            a.send("send")
            result = json.loads(b.readline())
            a.readline()
            assert result["received"] == ODD_BYTES and result["peeked"] > 0
            batch = collect(receiver)
            assert value(batch, "kpod.net.tcp.bytes.received", pod_b.container_id) == ODD_BYTES
        finally:
            receiver.shutdown()


def test_full_tcp_map_counts_update_errors() -> None:
    """Room for one cgroup: the second pod's first event cannot be inserted and is counted."""
    from kpod.receivers.bpf_maps import BpfMapsReceiver

    from kpod.component import EmptyConfig

    receiver = NetTcpReceiver(context("net_tcp", map_max_entries=1), NetTcpConfig(rtt=False))
    maps = BpfMapsReceiver(context("bpf_maps"), EmptyConfig())
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            a, b = transfer(tree, procs, pod_a, pod_b, nbytes=1001)
            a.send("send")
            b.readline()
            a.readline()
            assert receiver.loaded.error_counts()["net_tcp"] > 0
            values = {p.metric.name: p.value for p in maps.collect() if dict(p.attributes).get("map") == "net_tcp"}
            assert values["kpod.bpf.map.capacity"] == 1
            assert values["kpod.bpf.map.entries"] == 1
            assert values["kpod.bpf.map.update.errors.total"] > 0
        finally:
            receiver.shutdown()


def test_check_lists_each_hook_once() -> None:
    """tcp_probe and tcp_probe_read both attach to tp_btf/tcp_probe: `check` (the receiver's
    route) names that hook once per metric, as the route that feeds it."""
    route = NetTcpReceiver(context("net_tcp"), NetTcpConfig()).route()
    entries = [part.split(": off")[0] for part in route.split("; ")]
    assert len(entries) == len(set(entries)), route
    assert entries.count(f"{RTT.name} <- tp_btf/tcp_probe") == 1, route


def test_alternatives_on_one_hook_that_all_fail_keep_each_reason() -> None:
    routes = [
        ebpf.Route("a", "tp_btf/x", ("m",), False, "no kfunc"),
        ebpf.Route("b", "tp_btf/x", ("m",), False, "verifier said no"),
        ebpf.Route("c", "tp_btf/y", ("n",), True),
    ]
    assert ebpf.describe_routes(routes) == "m <- tp_btf/x: off (a: no kfunc; b: verifier said no); n <- tp_btf/y"


# The kretprobe route's one blind spot, measured: N threads of pod B block in recv() on N
# connections at once, then pod A sends CALL_BYTES on each (one loopback segment: each recv
# returns all of it).
CALL_BYTES = 1001
BLOCKED_RECEIVERS = textwrap.dedent(
    """
    import socket, threading
    n = int(sys.stdin.readline())
    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    ls.listen(n)
    print(ls.getsockname()[1], flush=True)
    conns = [ls.accept()[0] for _ in range(n)]
    got = [0] * n
    def receive(i):
        got[i] = len(conns[i].recv(65536))
    threads = [threading.Thread(target=receive, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    print(json.dumps([t.native_id for t in threads]), flush=True)
    for t in threads:
        t.join()
    print(json.dumps({'received': sum(got), 'calls': got}), flush=True)
    sys.stdin.readline()
    """
)
SENDER_PER_CONNECTION = textwrap.dedent(
    """
    import socket
    port, n, size = (int(sys.stdin.readline()) for _ in range(3))
    conns = [socket.create_connection(('127.0.0.1', port)) for _ in range(n)]
    print('connected', flush=True)
    sys.stdin.readline()
    for c in conns:
        c.sendall(b'k' * size)
    print('sent', flush=True)
    sys.stdin.readline()
    """
)


def kretprobe_default_maxactive() -> int:
    """The instances a kretprobe made without `maxactive` gets (kernel/kprobes.c,
    register_kretprobe; libbpf's perf-event kretprobes pass none): max(10, 2 x possible CPUs).
    Measured so on Debian's 6.1, preemptible (amd64) or not (arm64); kernels before the
    branch on CONFIG_PREEMPTION went give a non-preemptible kernel the possible CPUs only."""
    possible = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        possible += int(high or low) - int(low) + 1
    release = tuple(int(x) for x in os.uname().release.split("-")[0].split(".")[:2])
    if release < (6, 1) and "PREEMPT" not in os.uname().version:
        return possible
    return max(10, 2 * possible)


def wait_in_recv(pid: int, tids: list[int], timeout_s: float = 120.0) -> None:
    """Until every thread sleeps in the socket's wait (inside tcp_recvmsg), by its wchan."""
    deadline = time.monotonic() + timeout_s
    waiting: list[int] = tids
    while time.monotonic() < deadline:
        waiting = [t for t in tids if Path(f"/proc/{pid}/task/{t}/wchan").read_text() != "wait_woken"]
        if not waiting:
            return
        time.sleep(0.05)
    raise AssertionError(f"threads {waiting} of {pid} never blocked in recv")


@pytest.mark.parametrize("beyond", [0, 3], ids=["within_maxactive", "beyond_maxactive"])
def test_kretprobe_route_bound_is_maxactive_calls_in_flight(beyond: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kretprobe byte route is exact while at most `maxactive` calls of a function are in
    flight at once; a call entered beyond that is not seen at return (the kernel counts it in
    the kretprobe's nmissed, which a perf-event kprobe does not expose before 6.7).  Asserted
    at the bound and past it: maxactive threads blocked in recv all count, maxactive + 3
    count exactly maxactive calls.  Runs where kretprobes do (make test-vm, test-vm-arm64)."""
    real = ebpf.hook_unavailable
    hidden = {"tp_btf/sock_send_length", "tp_btf/sock_recv_length", "fexit/tcp_sendmsg", "fexit/tcp_recvmsg"}
    monkeypatch.setattr(ebpf, "hook_unavailable", lambda s: f"hidden by the test: {s}" if s in hidden else real(s))
    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    maxactive = kretprobe_default_maxactive()
    n = maxactive + beyond
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            if receive_route(receiver) != "kretprobe/tcp_recvmsg":
                why = [r.reason for r in receiver.loaded.routes if r.program == "tcp_recvmsg_ret"]
                pytest.skip(f"no kretprobe route here: {why}")
            b = Workload(BLOCKED_RECEIVERS)
            procs.append(b)
            tree.move(b.pid, pod_b.container_dir)
            b.go()
            b.send(str(n))
            port = int(b.readline())
            a = Workload(SENDER_PER_CONNECTION)
            procs.append(a)
            tree.move(a.pid, pod_a.container_dir)
            a.go()
            for line in (port, n, CALL_BYTES):
                a.send(str(line))
            assert a.readline(timeout=120) == "connected"
            tids = json.loads(b.readline(timeout=120))
            wait_in_recv(b.pid, tids)
            a.send("send")
            assert a.readline(timeout=120) == "sent"
            result = json.loads(b.readline(timeout=120))
            assert result["calls"] == [CALL_BYTES] * n, result  # one recv, one segment each
            batch = collect(receiver)
            counted = value(batch, "kpod.net.tcp.bytes.received", pod_b.container_id)
            assert value(batch, "kpod.net.tcp.bytes.sent", pod_a.container_id) == n * CALL_BYTES
            assert counted == min(n, maxactive) * CALL_BYTES, (counted, n, maxactive)
        finally:
            receiver.shutdown()


# kTLS: the sender's socket encrypts in the kernel (TLS 1.2, AES-GCM-128, a fixed key: no
# handshake is needed for the kernel to build records); the receiver reads the records as
# plain TCP.  Ground truth: A's send() returns (plaintext), B's recv() returns (ciphertext).
KTLS_SENDER = textwrap.dedent(
    """
    import socket, struct
    port, nbytes = int(sys.stdin.readline()), int(sys.stdin.readline())
    c = socket.create_connection(('127.0.0.1', port))
    try:
        c.setsockopt(socket.IPPROTO_TCP, 31, b'tls')  # TCP_ULP (loads the tls module on demand)
    except OSError as e:
        print(json.dumps({'no_ktls': f'{e.strerror} (errno {e.errno})'}), flush=True)
        sys.exit(0)
    # SOL_TLS, TLS_TX, struct tls12_crypto_info_aes_gcm_128: TLS 1.2, AES-GCM-128, iv, key, salt, rec_seq
    c.setsockopt(282, 1, struct.pack('=HH8s16s4s8s', 0x0303, 51, b'i' * 8, b'k' * 16, b's' * 4, bytes(8)))
    print(json.dumps({'ktls': True}), flush=True)
    sys.stdin.readline()
    data = b'p' * nbytes
    sent = 0
    while sent < nbytes:
        sent += c.send(data[sent:])
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
    print(json.dumps({'sent': sent}), flush=True)
    sys.stdin.readline()
    """
)
PLAIN_RECEIVER = textwrap.dedent(
    """
    import socket
    ls = socket.socket()
    ls.bind(('127.0.0.1', 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    conn, _ = ls.accept()
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        total += len(chunk)
    conn.close()
    print(json.dumps({'received': total}), flush=True)
    sys.stdin.readline()
    """
)


def test_ktls_sent_bytes() -> None:
    """What each kernel counts for a kTLS sender.  6.5+ (the tracepoint route): the plaintext
    send() returned, as for any socket.  Before 6.5 (tcp_sendpage exists; Debian 12's 6.1 in
    the VMs): nothing, since tls_sw_sendmsg replaces tcp_sendmsg in the socket's protocol and
    the records leave through do_tcp_sendpages, which no route hooks; asserted exactly, so a
    route that starts counting them (or counts part) fails here.  The receiving pod, a plain
    TCP socket, is charged the ciphertext it read, on every kernel."""
    from kpod.receivers.net_tcp import kernel_function_params

    receiver = NetTcpReceiver(context("net_tcp"), NetTcpConfig(rtt=False))
    with cgroup_tree() as tree, workloads() as procs:
        pod_a, pod_b = tree.pod(), tree.pod()
        receiver.start()
        try:
            b = Workload(PLAIN_RECEIVER)
            procs.append(b)
            tree.move(b.pid, pod_b.container_dir)
            b.go()
            port = int(b.readline())
            a = Workload(KTLS_SENDER)
            procs.append(a)
            tree.move(a.pid, pod_a.container_dir)
            a.go()
            a.send(str(port))
            a.send(str(ODD_BYTES))
            state = json.loads(a.readline(timeout=60))
            if "no_ktls" in state:
                pytest.skip(f"this kernel has no kTLS (CONFIG_TLS): setsockopt(TCP_ULP, tls): {state['no_ktls']}")
            a.send("send")
            received = json.loads(b.readline(timeout=120))["received"]
            assert json.loads(a.readline(timeout=120))["sent"] == ODD_BYTES
            assert received > ODD_BYTES  # records: header, nonce and tag around the plaintext
            batch = collect(receiver)
            assert value(batch, "kpod.net.tcp.bytes.received", pod_b.container_id) == received
            sent = value(batch, "kpod.net.tcp.bytes.sent", pod_a.container_id)
            if kernel_function_params("tcp_sendpage") is not None:
                assert not sent, f"kTLS records counted before 6.5 ({sent} bytes): update docs/KERNELS.md"
            else:
                assert sent == ODD_BYTES
        finally:
            receiver.shutdown()


@pytest.mark.parametrize("old_layouts", [False, True], ids=["5.19+_recvmsg", "pre-5.19_recvmsg_pre-5.15_socket"])
def test_kprobe_route_programs_verify_here(old_layouts: bool) -> None:
    """The kprobe route's programs pass this kernel's verifier with either value of their
    read-only flags, also where they cannot attach (this host has no kprobes): a program
    the verifier refuses would otherwise first show in a VM, or on a node."""
    from kpod.kernel.ebpf import set_rodata

    kprobe_route = {"tcp_sendmsg_entry", "tcp_sendmsg_ret", "tcp_recvmsg_entry", "tcp_recvmsg_ret",
                    "tcp_sendpage_entry", "tcp_sendpage_ret"}  # fmt: skip
    with libbpf.BpfObject.open(str(REPO / "bpf" / "net.bpf.o")) as obj:
        assert kprobe_route <= set(obj.programs)
        set_rodata(obj, "kpod_recvmsg_flags_5th", int(old_layouts))
        set_rodata(obj, "kpod_force_sock_cgroup_val", int(old_layouts))
        for name, program in obj.programs.items():
            program.set_autoload(name in kprobe_route)
        obj.load()  # raises with the verifier's log
        assert all(obj.programs[name].fd >= 0 for name in kprobe_route)
