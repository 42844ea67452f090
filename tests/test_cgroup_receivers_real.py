"""The cgroup receivers against the real kernel: a pod network namespace with a veth pair, a
container in its own mount namespace, real block I/O accounting.

Each test builds a kubepods-shaped cgroup tree under a uniquely named directory of the cgroup2
mount (and of v1 blkio on hybrid hosts), and points a CgroupIndex at that directory, so the
receivers see only what the test made.  Everything is removed again, also on failure: the
processes we started are killed by PID, cgroups we created are removed deepest first, and the
netns, veth, loop device and mounts we made are deleted.  Nothing else is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cgroup_tree import make_context
from helpers import require_tools
from kernel_util import DIRECT_IO_SCRIPT, enable_controllers
from kpod.receivers.cgroup_memory import CgroupMemoryReceiver
from kpod.receivers.disk import DiskConfig, DiskReceiver
from kpod.receivers.filesystem import FilesystemConfig, FilesystemReceiver
from kpod.receivers.net_iface import NetIfaceConfig, NetIfaceReceiver
from kpod.receivers.pressure import PressureReceiver

from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.mounts import CgroupMounts, parse_mountinfo_cgroups
from kpod.cgroup.parsers import (
    parse_blkio_throttle,
    parse_flat_keyed,
    parse_io_stat,
    parse_net_dev,
    parse_pressure_totals,
)
from kpod.component import EmptyConfig
from kpod.model import Batch

MOUNTS = parse_mountinfo_cgroups(Path("/proc/self/mountinfo").read_text())


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates cgroups, namespaces, mounts)"
    if MOUNTS.unified is None:
        return "no cgroup2 mount"
    return None


needs_root_and_cgroup2 = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def _run(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


class Scratch:
    """What a test created, undone in reverse order by `close` (also after a failure)."""

    def __init__(self) -> None:
        self.tag = f"kpodt{os.getpid()}{uuid.uuid4().hex[:6]}"
        self._undo: list[tuple[str, object]] = []
        self.procs: list[subprocess.Popen[str]] = []

    def mkdirs(self, path: str) -> str:
        """mkdir -p, remembering each directory we made (never one that existed)."""
        made = []
        p = Path(path)
        while not p.exists():
            made.append(p)
            p = p.parent
        for directory in reversed(made):
            directory.mkdir()
            self._undo.append(("rmdir", str(directory)))
        return path

    def on_close(self, argv: list[str]) -> None:
        self._undo.append(("run", argv))

    def spawn(self, argv: list[str], cgroups: list[str]) -> subprocess.Popen[str]:
        """Start a process that waits for a line on stdin, and put it in `cgroups` first."""
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        for cgroup in cgroups:
            Path(cgroup, "cgroup.procs").write_text(str(proc.pid))
        return proc

    def close(self) -> None:
        for proc in self.procs:  # only processes we started, by PID
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        errors = []
        for action, arg in reversed(self._undo):
            try:
                if action == "rmdir":
                    os.rmdir(str(arg))
                else:
                    subprocess.run(arg, check=True, capture_output=True)  # type: ignore[call-overload]
            except (OSError, subprocess.CalledProcessError) as err:
                errors.append(f"{action} {arg}: {err}")
        assert not errors, f"cleanup failed: {errors}"


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    s = Scratch()
    try:
        yield s
    finally:
        s.close()


def _pod_tree(s: Scratch, pods: int, containers: int) -> tuple[str, list[list[str]]]:
    """<cgroup2>/<tag>/kubepods/burstable/pod<uid>/<cid>: the base dir and container dirs."""
    assert MOUNTS.unified is not None
    base = f"{MOUNTS.unified}/{s.tag}"
    out = []
    for _ in range(pods):
        pod = f"{base}/kubepods/burstable/pod{uuid.uuid4()}"
        out.append([s.mkdirs(f"{pod}/{uuid.uuid4().hex}{uuid.uuid4().hex}") for _ in range(containers)])
    # As a kubelet does on pure cgroup2: controllers enabled down to the containers, top down,
    # in the directories made here (processes go into containers only).  No-op on hybrid.
    top = Path(base)
    inner = {p for group in out for c in group for p in Path(c).parents if p == top or top in p.parents}
    for directory in sorted(inner, key=lambda p: len(p.parts)):
        enable_controllers(directory)
    return base, out


def _series(batch: Batch) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
    return {(p.metric.name, p.cgroup.path, p.attributes): p.value for p in batch if p.cgroup}  # type: ignore[misc]


# ------------------------------------------------------------------------------------------ net_iface

# Sends raw Ethernet frames on eth0 (no IP stack involved): `count` frames of `size` bytes.
_SENDER = r"""
import socket, sys
sys.stdin.readline()
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
count, size = int(sys.argv[1]), int(sys.argv[2])
frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01" + b"\x88\xb5"
for _ in range(count):
    s.send(frame + b"\x00" * (size - len(frame)))
print("sent", flush=True)
sys.stdin.readline()
"""


@needs_root_and_cgroup2
def test_net_iface_real_netns(scratch: Scratch) -> None:
    require_tools("ip")
    s = scratch
    ns, host_if = s.tag, f"kv{s.tag[-8:]}"
    _run("ip", "netns", "add", ns)
    s.on_close(["ip", "netns", "del", ns])
    # No IPv6 anywhere before links come up: no router/neighbour solicitations, so the only
    # traffic is ours.  lo in the namespace stays down.
    _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
    _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1")
    _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", f"{host_if}p")
    s.on_close(["ip", "link", "del", host_if])
    _run("sysctl", "-qw", f"net.ipv6.conf.{host_if}.disable_ipv6=1")
    _run("ip", "link", "set", f"{host_if}p", "netns", ns, "name", "eth0")
    _run("ip", "link", "set", host_if, "up")
    _run("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")

    base, pods = _pod_tree(s, pods=2, containers=2)
    pod, host_pod = pods
    # Pod 1: both containers have a process in the pod's netns; pod 2 is host-network.
    in_ns = ["ip", "netns", "exec", ns, sys.executable, "-c", _SENDER]
    sender = s.spawn([*in_ns, "10", "100"], [pod[0]])
    idle = s.spawn([*in_ns, "0", "60"], [pod[1]])
    host = s.spawn([sys.executable, "-c", "import sys; sys.stdin.readline()"], [host_pod[0]])

    # The host sends 3 frames of an ethertype nobody in the pod listens to: received, then
    # dropped by the core stack (rx drop).
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((host_if, 0))
        for _ in range(3):
            raw.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb6" + b"\x00" * 46)
    assert sender.stdin and sender.stdout
    sender.stdin.write("go\n")
    sender.stdin.flush()
    assert sender.stdout.readline().strip() == "sent"

    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    receiver = NetIfaceReceiver(make_context("net_iface", index), NetIfaceConfig())
    assert receiver.preflight() is None
    receiver.start()
    got = _series(receiver.collect())
    truth = parse_net_dev(Path(f"/proc/{idle.pid}/net/dev").read_text())["eth0"]

    pod_path = pod[0][len(base) :].rpartition("/")[0]
    eth0 = (("interface", "eth0"),)
    names = ("rx.bytes", "rx.packets", "rx.errors", "rx.drops", "tx.bytes", "tx.packets", "tx.errors", "tx.drops")
    counters = {name: got[(f"kpod.net.iface.{name}", pod_path, eth0)] for name in names}
    # == /proc/<pid>/net/dev of the pod's processes
    assert counters == {
        "rx.bytes": truth.rx_bytes, "rx.packets": truth.rx_packets, "rx.errors": truth.rx_errors,
        "rx.drops": truth.rx_drops, "tx.bytes": truth.tx_bytes, "tx.packets": truth.tx_packets,
        "tx.errors": truth.tx_errors, "tx.drops": truth.tx_drops,
    }  # fmt: skip
    # == the known traffic: 10 x 100 bytes out; 3 x 60 bytes in, all dropped (no handler)
    assert counters == {"rx.bytes": 180, "rx.packets": 3, "rx.errors": 0, "rx.drops": 3,
                        "tx.bytes": 1000, "tx.packets": 10, "tx.errors": 0, "tx.drops": 0}  # fmt: skip
    # Once per netns (two containers, one set of series, on the pod cgroup); lo excluded; the
    # host-network pod skipped.
    assert len(got) == 8 and {k[1] for k in got} == {pod_path}
    assert receiver.status()["host_network_skipped"] == 1 and receiver.status()["namespaces"] == 1
    assert host.poll() is None

    # The next collection reads the namespace's file kept open (kpod.cgroup.netdevfiles), afresh:
    # 2 more frames in, as /proc/<pid>/net/dev opened now says.
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
        raw.bind((host_if, 0))
        for _ in range(2):
            raw.send(b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb6" + b"\x00" * 46)
    again = _series(receiver.collect())
    truth = parse_net_dev(Path(f"/proc/{idle.pid}/net/dev").read_text())["eth0"]
    assert again[("kpod.net.iface.rx.packets", pod_path, eth0)] == truth.rx_packets == 5
    assert again[("kpod.net.iface.rx.bytes", pod_path, eth0)] == truth.rx_bytes == 300
    assert again.keys() == got.keys()
    assert receiver.status()["net_dev_opened"] == 1 and receiver.status()["net_dev_kept"] == 1
    receiver.shutdown()


@needs_root_and_cgroup2
def test_net_iface_reads_the_namespace_its_pods_process_is_in_now(scratch: Scratch) -> None:
    """A pod whose process is now in another network namespace is read there, not through the
    file kept for the namespace it was in; the kept file of a namespace no pod is in any more is
    closed after the collection."""
    require_tools("ip")
    s = scratch
    namespaces = [f"{s.tag}a", f"{s.tag}b"]
    for ns, bridge in zip(namespaces, ("kpodbra", "kpodbrb"), strict=True):
        _run("ip", "netns", "add", ns)
        s.on_close(["ip", "netns", "del", ns])
        _run("ip", "netns", "exec", ns, "ip", "link", "add", bridge, "type", "bridge")
    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    pod_path = container[len(base) :].rpartition("/")[0]
    wait = [sys.executable, "-c", "import sys; print('in', flush=True); sys.stdin.readline()"]
    first = s.spawn(["ip", "netns", "exec", namespaces[0], *wait], [container])
    assert first.stdout and first.stdout.readline().strip() == "in"  # in its namespace by now

    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    receiver = NetIfaceReceiver(make_context("net_iface", index), NetIfaceConfig(host_netns_path="/proc/self/ns/net"))
    receiver.start()
    try:
        assert {k[2] for k in _series(receiver.collect())} == {(("interface", "kpodbra"),)}
        assert {k[2] for k in _series(receiver.collect())} == {(("interface", "kpodbra"),)}
        assert receiver.status()["net_dev_opened"] == 1  # the second read was the kept file's
        # The pod's only process is now one in the other namespace.
        second = s.spawn(["ip", "netns", "exec", namespaces[1], *wait], [container])
        assert second.stdout and second.stdout.readline().strip() == "in"
        first.kill()
        first.wait()
        got = _series(receiver.collect())
        assert {(k[1], k[2]) for k in got} == {(pod_path, (("interface", "kpodbrb"),))}
        truth = parse_net_dev(Path(f"/proc/{second.pid}/net/dev").read_text())["kpodbrb"]
        assert got[("kpod.net.iface.tx.packets", pod_path, (("interface", "kpodbrb"),))] == truth.tx_packets
        assert receiver.status()["net_dev_opened"] == 2 and receiver.status()["net_dev_kept"] == 1
        # A collection that fails half-way still closes what it did not read: a failure every
        # cycle must not keep gone pods' namespaces alive.
        def fail(members: object) -> None:
            raise RuntimeError("half-way")

        receiver._one_pid_netns = fail  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="half-way"):
            receiver.collect()
        assert receiver.status()["net_dev_kept"] == 0
    finally:
        receiver.shutdown()


# ------------------------------------------------------------------------------------------ filesystem

_MOUNTER = r"""
set -e
mount -t overlay overlay -o "lowerdir=$1/lower,upperdir=$1/upper,workdir=$1/work" "$1/merged"
mount -t tmpfs -o size=8m kpodtmp "$1/tmpfs"
mount --bind "$1/tmpfs" "$1/tmpfs-again"
head -c 1048576 /dev/zero > "$1/tmpfs/blob"
mount --bind "$1/hosts-source" "$1/hosts"
mount -t ext4 "$2" "$1/ext4"
echo ready
read line
"""


@needs_root_and_cgroup2
def test_filesystem_real_mount_namespace(scratch: Scratch, tmp_path: Path) -> None:
    require_tools("unshare", "losetup", "mkfs.ext4", "findmnt")
    s = scratch
    for d in ("tmpfs", "tmpfs-again", "ext4", "lower", "upper", "work", "merged"):
        (tmp_path / d).mkdir()
    (tmp_path / "hosts-source").write_text("127.0.0.1 localhost\n")
    (tmp_path / "hosts").write_text("")
    image = tmp_path / "fs.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    _run("mkfs.ext4", "-q", "-F", str(image))
    loop = _run("losetup", "-f", "--show", str(image)).strip()
    s.on_close(["losetup", "-d", loop])

    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    # The mounts live only in the child's private mount namespace: they vanish with it.
    proc = s.spawn(["unshare", "-m", "--propagation", "private", "sh", "-c", _MOUNTER, "sh", str(tmp_path), loop],
                   [container])  # fmt: skip
    assert proc.stdout and proc.stdout.readline().strip() == "ready"

    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    receiver = FilesystemReceiver(make_context("filesystem", index), FilesystemConfig())
    assert receiver.preflight() is None
    got = _series(receiver.collect())
    path = container[len(base) :]
    root = f"/proc/{proc.pid}/root"

    # Which filesystem each series is on (the labels that tell disks apart), by mountpoint.
    labels = {dict(k[2])["mountpoint"]: dict(k[2]) for k in got if k[1] == path}

    def values(mountpoint: str) -> tuple[float, float, float]:
        attrs = tuple(sorted(labels[mountpoint].items()))
        return tuple(got[(f"kpod.fs.{m}.bytes", path, attrs)] for m in ("capacity", "usage", "available"))  # type: ignore[return-value]

    def findmnt(target: Path) -> tuple[str, str]:
        source, fstype = _run("findmnt", "-n", "--nofsroot", "-o", "SOURCE,FSTYPE", "-T", str(target)).split()
        return source, fstype

    # The overlay's data is on its upper layer's filesystem (findmnt, in the host's namespace,
    # says which): the overlay is labelled with that filesystem, not with its own 0:N.
    merged = str(tmp_path / "merged")
    upper_source, upper_fstype = findmnt(tmp_path / "upper")
    if not (upper_source.startswith("/") or ":/" in upper_source):  # tmpfs & co. name no device
        upper_dev = os.stat(tmp_path / "upper").st_dev
        upper_source = f"{os.major(upper_dev)}:{os.minor(upper_dev)}"
    assert (labels[merged]["device"], labels[merged]["fstype"]) == (upper_source, upper_fstype)
    vfs = os.statvfs(tmp_path / "upper")
    assert values(merged)[0] == vfs.f_blocks * vfs.f_frsize  # statvfs of an overlay: its upper fs

    # A tmpfs names no device: its own device number tells it from every other tmpfs.
    tmpfs = str(tmp_path / "tmpfs")
    st = os.stat(f"{root}{tmpfs}")
    assert (labels[tmpfs]["device"], labels[tmpfs]["fstype"]) == (
        f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}",
        "tmpfs",
    )
    vfs = os.statvfs(root + tmpfs)
    expected = (vfs.f_blocks * vfs.f_frsize, (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize)
    assert values(tmpfs) == expected
    assert values(tmpfs) == (8 * 1024 * 1024, 1024 * 1024, 7 * 1024 * 1024)  # size=8m, one 1 MiB file
    mountpoints = set(labels)
    assert str(tmp_path / "tmpfs-again") not in mountpoints  # the same tmpfs: once per container
    assert str(tmp_path / "hosts") not in mountpoints  # a bind-mounted single file
    assert not any(m.startswith(("/proc", "/sys", "/dev")) for m in mountpoints)
    ext4 = str(tmp_path / "ext4")
    vfs = os.statvfs(root + ext4)
    assert values(ext4) == (
        vfs.f_blocks * vfs.f_frsize,
        (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize,
        vfs.f_bavail * vfs.f_frsize,
    )
    assert 0 < values(ext4)[0] <= 16 * 1024 * 1024
    assert (labels[ext4]["device"], labels[ext4]["fstype"]) == (loop, "ext4")
    # Not mounted outside the child's namespace: the receiver really looked through its root.
    assert not os.path.ismount(tmpfs)


# ------------------------------------------------------------------------------------------ disk


def _io_route() -> str | None:
    assert MOUNTS.unified is not None
    if "io" in Path(MOUNTS.unified, "cgroup.controllers").read_text().split():
        return "v2"
    return "v1" if "blkio" in MOUNTS.v1 else None


@needs_root_and_cgroup2
@pytest.mark.skipif(MOUNTS.unified is not None and _io_route() is None,
                    reason="no io accounting on this host (no io controller, no blkio)")  # fmt: skip
def test_disk_real_block_io(scratch: Scratch, tmp_path: Path) -> None:
    require_tools("losetup")
    s = scratch
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.truncate(16 * 1024 * 1024)
    loop = _run("losetup", "-f", "--show", str(image)).strip()
    s.on_close(["losetup", "-d", loop])
    rdev = os.stat(loop).st_rdev
    dev = f"{os.major(rdev)}:{os.minor(rdev)}"

    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    rel = container[len(base) :]
    cgroups = [container]
    v1: dict[str, str] = {}
    route = _io_route()
    if route == "v1":
        # The same relative path in our own blkio tree, with a throttle rule on the loop device
        # (1 TiB/s: no limit in effect), without which 6.x keeps no v1 stats (fixtures README).
        blkio_base = f"{MOUNTS.v1['blkio']}/{s.tag}"
        blkio = s.mkdirs(blkio_base + rel)
        Path(blkio, "blkio.throttle.write_bps_device").write_text(f"{dev} 1099511627776")
        cgroups.append(blkio)
        v1["blkio"] = blkio_base
    proc = s.spawn(["sh", "-c", DIRECT_IO_SCRIPT, "sh", loop], cgroups)
    assert proc.stdin and proc.stdout
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"

    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base, v1))
    index.refresh()
    receiver = DiskReceiver(make_context("disk", index), DiskConfig())
    receiver.start()
    assert receiver.route() == ("blkio v1 fallback" if route == "v1" else "io.stat (cgroup2)")
    first = _series(receiver.collect())
    device = (("device", Path(loop).name),)  # the name came from /sys/dev/block/M:m/uevent
    # Exact: dd wrote 4 MiB and read 2 MiB with O_DIRECT.
    assert first[("kpod.disk.read.bytes", rel, device)] == 2097152
    assert first[("kpod.disk.written.bytes", rel, device)] == 4194304
    assert first[("kpod.disk.reads", rel, device)] > 0 and first[("kpod.disk.writes", rel, device)] > 0
    if route == "v1":
        file_ = parse_blkio_throttle(Path(v1["blkio"] + rel, "blkio.throttle.io_serviced").read_text())
        ios = file_[(os.major(rdev), os.minor(rdev))]
        assert (first[("kpod.disk.reads", rel, device)], first[("kpod.disk.writes", rel, device)]) == (
            ios["Read"], ios["Write"])  # fmt: skip
    else:
        stats = parse_io_stat(Path(container, "io.stat").read_text())[(os.major(rdev), os.minor(rdev))]
        assert first[("kpod.disk.reads", rel, device)] == stats["rios"]
    # Cumulative counters as they are: a second cycle does not add anything up.
    assert _series(receiver.collect()) == first


# ------------------------------------------------------------------------------------------ memory, PSI

_HOLDER = r"""
import sys
block = bytearray(16 * 1024 * 1024)
for i in range(0, len(block), 4096):
    block[i] = 1
print("ready", flush=True)
sys.stdin.readline()
"""


def _memory_route() -> str | None:
    assert MOUNTS.unified is not None
    if "memory" in Path(MOUNTS.unified, "cgroup.controllers").read_text().split():
        return "v2"
    return "v1" if "memory" in MOUNTS.v1 else None


@needs_root_and_cgroup2
@pytest.mark.skipif(MOUNTS.unified is not None and _memory_route() is None, reason="no memory controller")
def test_memory_and_pressure_real(scratch: Scratch) -> None:
    s = scratch
    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    rel = container[len(base) :]
    v1: dict[str, str] = {}
    cgroups = [container]
    if _memory_route() == "v1":
        memory_base = f"{MOUNTS.v1['memory']}/{s.tag}"
        cgroups.append(s.mkdirs(memory_base + rel))
        v1["memory"] = memory_base
    memory_dir = cgroups[-1]
    proc = s.spawn([sys.executable, "-c", _HOLDER], cgroups)
    assert proc.stdout and proc.stdout.readline().strip() == "ready"

    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base, v1))
    index.refresh()
    memory = CgroupMemoryReceiver(make_context("cgroup_memory", index), EmptyConfig())
    memory.start()
    usage_file, inactive_key = ("memory.current", "inactive_file") if not v1 else (
        "memory.usage_in_bytes", "total_inactive_file")  # fmt: skip

    def read_files() -> tuple[int, int]:
        usage = int(Path(memory_dir, usage_file).read_text())
        return usage, usage - parse_flat_keyed(Path(memory_dir, "memory.stat").read_text())[0][inactive_key]

    before = read_files()
    got = _series(memory.collect())
    after = read_files()
    # The process is idle, but the kernel may still settle per-CPU charge batches and page
    # cache: the receiver's values lie between the file values read around it, 1 MiB slack.
    slack = 1 << 20
    usage = got[("kpod.mem.usage.bytes", rel, ())]
    working_set = got[("kpod.mem.working_set.bytes", rel, ())]
    assert min(before[0], after[0]) - slack <= usage <= max(before[0], after[0]) + slack, (before, usage, after)
    assert usage >= 16 * 1024 * 1024  # the touched bytearray
    assert min(before[1], after[1]) - slack <= working_set <= max(before[1], after[1]) + slack, (
        before, working_set, after)  # fmt: skip

    pressure = PressureReceiver(make_context("pressure", index), EmptyConfig())
    assert pressure.preflight() is None
    before = {r: parse_pressure_totals(Path(container, f"{r}.pressure").read_text()) for r in ("cpu", "memory", "io")}
    got = _series(pressure.collect())
    after = {r: parse_pressure_totals(Path(container, f"{r}.pressure").read_text()) for r in ("cpu", "memory", "io")}
    for resource, lines in before.items():
        for kind, total in lines.items():
            value = got[(f"kpod.pressure.{resource}.waiting.seconds", rel, (("kind", kind),))]
            assert total / 1e6 <= value <= after[resource][kind] / 1e6
    assert len(got) == sum(len(lines) for lines in before.values())


# Busy for one second, pinned to the CPU given on the command line.
_HOG = r"""
import os, sys, time
os.sched_setaffinity(0, {int(sys.argv[1])})
print("ready", flush=True)
sys.stdin.readline()
end = time.monotonic() + 1.0
while time.monotonic() < end:
    pass
print("done", flush=True)
"""


@needs_root_and_cgroup2
def test_pressure_measures_cpu_contention(scratch: Scratch) -> None:
    """PSI is accounted on cgroup2 whatever the layout (hybrid hosts included: the controllers
    being on v1 does not matter): two hogs on one CPU for a second in a container make its
    cpu.pressure `some` grow by a good part of that second, and the receiver reports it."""
    s = scratch
    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    rel = container[len(base) :]
    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    pressure = PressureReceiver(make_context("pressure", index), EmptyConfig())
    assert pressure.preflight() is None
    cpu = min(os.sched_getaffinity(0))
    hogs = [s.spawn([sys.executable, "-c", _HOG, str(cpu)], [container]) for _ in range(2)]
    for hog in hogs:
        assert hog.stdout and hog.stdout.readline().strip() == "ready"
    before = _series(pressure.collect())[("kpod.pressure.cpu.waiting.seconds", rel, (("kind", "some"),))]
    for hog in hogs:
        assert hog.stdin
        hog.stdin.write("go\n")
        hog.stdin.flush()
    for hog in hogs:
        assert hog.stdout and hog.stdout.readline().strip() == "done"
    after = _series(pressure.collect())[("kpod.pressure.cpu.waiting.seconds", rel, (("kind", "some"),))]
    # One of the two waits whenever the other runs: "some" stall of about the whole second.
    print(f"\npressure: cpu some +{after - before:.3f} s for two hogs sharing one CPU for 1 s ({MOUNTS.layout})")
    assert after - before >= 0.3, (before, after)


# ------------------------------------------------------------------------------------------ shared reads

# A container in its own mount namespace that mounts a tmpfs when told to ("mount"), and
# unmounts it again ("umount").
_REMOUNTER = r"""
echo ready
while read line; do
  case "$line" in
    mount) mount -t tmpfs -o size=4m kpodlate "$1";;
    umount) umount "$1";;
  esac
  echo done
done
"""


@contextlib.contextmanager
def _opens(paths: list[str]) -> Iterator[None]:
    """Appends to `paths` every file this process opens while the context is active: by path
    (the audit hook), or through a kept directory (kpod.cgroup.dirs: openat, whose audit event
    names the file relative to the directory, so it is recorded with its full path there).
    Directories kept with O_PATH are not files read."""
    from kpod.cgroup.dirs import CgroupDirs

    active = [True]

    def hook(event: str, args: tuple[object, ...]) -> None:
        if active[0] and event == "open" and isinstance(args[0], (str, bytes)):
            path = os.fsdecode(args[0])
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            if path.startswith("/") and not flags & os.O_PATH:
                paths.append(path)

    through_dirs = CgroupDirs.open

    def recorded(self: CgroupDirs, path: str, flags: int) -> int | None:
        fd = through_dirs(self, path, flags)
        if fd is not None and active[0]:
            paths.append(path)
        return fd

    sys.addaudithook(hook)  # audit hooks cannot be removed: this one goes quiet instead
    CgroupDirs.open = recorded  # type: ignore[method-assign]
    try:
        yield
    finally:
        active[0] = False
        CgroupDirs.open = through_dirs  # type: ignore[method-assign]


@needs_root_and_cgroup2
def test_mount_tables_are_read_again_only_after_a_mount_change(scratch: Scratch, tmp_path: Path) -> None:
    """The filesystem receiver keeps each container's mountinfo open and reads it again only
    when the kernel reports a change: a tmpfs mounted (then unmounted) in the container between
    two collections shows (then goes) at the next one, and collections in between open no
    mountinfo.  When the process leaves, its table is closed (the namespace is not held)."""
    require_tools("unshare")
    s = scratch
    late = tmp_path / "late"
    late.mkdir()
    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    proc = s.spawn(["unshare", "-m", "--propagation", "private", "sh", "-c", _REMOUNTER, "sh", str(late)],
                   [container])  # fmt: skip
    assert proc.stdin and proc.stdout and proc.stdout.readline().strip() == "ready"

    def tell(command: str) -> None:
        assert proc.stdin and proc.stdout
        proc.stdin.write(command + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"

    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    receiver = FilesystemReceiver(make_context("filesystem", index), FilesystemConfig())
    path = container[len(base) :]
    mountinfo = f"/proc/{proc.pid}/mountinfo"

    def collect() -> tuple[set[str], list[str]]:
        opened: list[str] = []
        with _opens(opened):
            got = _series(receiver.collect())
        return {dict(k[2])["mountpoint"] for k in got if k[1] == path}, opened

    try:
        first, opened = collect()
        assert str(late) not in first and mountinfo in opened
        status = receiver.status()
        assert (status["mount_tables_kept"], status["mount_tables_read"]) == (1, 1)
        again, opened = collect()
        assert again == first and mountinfo not in opened
        assert receiver.status()["mount_tables_read"] == 1
        tell("mount")
        mounted, opened = collect()
        assert mounted == first | {str(late)} and mountinfo not in opened  # read again, not reopened
        assert receiver.status()["mount_tables_read"] == 2
        truth = Path(mountinfo).read_text()
        assert f" {late} " in truth and " kpodlate " in truth
        tell("umount")
        assert collect()[0] == first
        assert receiver.status()["mount_tables_read"] == 3
        # The process leaves the container (for a leaf outside the walked kubepods tree: on pure
        # cgroup2 the base, with controllers enabled below it, takes no processes): its table is
        # closed, nothing is kept.
        Path(s.mkdirs(f"{base}/away"), "cgroup.procs").write_text(str(proc.pid))
        assert collect()[0] == set()
        assert receiver.status()["mount_tables_kept"] == 0
        assert not any(os.readlink(f"/proc/self/fd/{fd}") == mountinfo for fd in os.listdir("/proc/self/fd")
                       if os.path.exists(f"/proc/self/fd/{fd}"))  # fmt: skip
    finally:
        receiver.shutdown()


# As runc's init does: in its own mount namespace and already in the container's cgroup, it
# mounts the rootfs and a volume below it, then pivot_root's there and detaches the old root.
_PIVOTER = r"""
import ctypes, os, subprocess, sys
new_root = sys.argv[1]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "kpodroot", new_root], check=True)
os.mkdir(new_root + "/data")
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "kpoddata", new_root + "/data"], check=True)
libc = ctypes.CDLL(None, use_errno=True)
pivot_root = {"x86_64": 155, "aarch64": 41}[os.uname().machine]
print("ready", flush=True)
sys.stdin.readline()
os.chdir(new_root)
if libc.syscall(pivot_root, b".", b".") or libc.umount2(b".", 2):  # MNT_DETACH
    raise OSError(ctypes.get_errno(), "pivot_root")
os.chdir("/")
print("done", flush=True)
sys.stdin.readline()
"""


@needs_root_and_cgroup2
def test_a_mount_table_kept_from_before_the_pivot_root_of_its_process_is_opened_again(
    scratch: Scratch, tmp_path: Path
) -> None:
    """A container's process is in its cgroup before it pivot_root's into its rootfs (runc's
    init): a mountinfo kept open from then is written relative to the root it had when opened,
    so after the pivot it no longer shows the container's mounts.  The receiver sees the
    container's "/" and "/data" at the next collection, as a fresh mountinfo does."""
    require_tools("unshare")
    if os.uname().machine not in ("x86_64", "aarch64"):
        pytest.skip("pivot_root's syscall number is only known here for x86_64 and aarch64")
    s = scratch
    new_root = tmp_path / "rootfs"
    new_root.mkdir()
    base, pods = _pod_tree(s, pods=1, containers=1)
    container = pods[0][0]
    proc = s.spawn(["unshare", "-m", "--propagation", "private", sys.executable, "-c", _PIVOTER, str(new_root)],
                   [container])  # fmt: skip
    assert proc.stdin and proc.stdout and proc.stdout.readline().strip() == "ready"
    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    receiver = FilesystemReceiver(make_context("filesystem", index), FilesystemConfig())
    path = container[len(base) :]

    def mountpoints() -> set[str]:
        return {dict(k[2])["mountpoint"] for k in _series(receiver.collect()) if k[1] == path}

    try:
        before = mountpoints()
        assert str(new_root / "data") in before and "/data" not in before  # the host's root, seen from outside
        assert receiver.status()["mount_tables_kept"] == 1
        proc.stdin.write("pivot\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        fresh = {line.split()[4] for line in Path(f"/proc/{proc.pid}/mountinfo").read_text().splitlines()}
        assert fresh == {"/", "/data"}, fresh
        assert mountpoints() == {"/", "/data"}
        assert mountpoints() == {"/", "/data"}  # kept again, from the new root
        assert receiver.status()["mount_tables_kept"] == 1
    finally:
        receiver.shutdown()


@needs_root_and_cgroup2
def test_cgroup_procs_is_read_once_per_cycle_by_filesystem_and_net_iface(scratch: Scratch) -> None:
    """Within one cycle (index.new_cycle(), as the pipeline does), filesystem and net_iface
    read each container's cgroup.procs once between them; the next cycle reads it again and
    sees a process that moved in meanwhile."""
    s = scratch
    base, pods = _pod_tree(s, pods=2, containers=1)
    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    filesystem = FilesystemReceiver(make_context("filesystem", index), FilesystemConfig())
    net = NetIfaceReceiver(make_context("net_iface", index), NetIfaceConfig(host_netns_path="/proc/self/ns/net"))
    net.start()
    procs = [f"{group[0]}/cgroup.procs" for group in pods]
    first = s.spawn([sys.executable, "-c", "import sys; sys.stdin.readline()"], [pods[0][0]])

    def cycle() -> tuple[list[str], set[str]]:
        index.new_cycle()
        opened: list[str] = []
        with _opens(opened):
            got = _series(filesystem.collect())
            net.collect()
        return [p for p in opened if p.endswith("/cgroup.procs")], {k[1] for k in got}

    try:
        opened, containers = cycle()
        assert sorted(opened) == sorted(procs)  # two readers, each file once
        assert containers == {pods[0][0][len(base) :]}
        second = s.spawn([sys.executable, "-c", "import sys; sys.stdin.readline()"], [pods[1][0]])
        opened, containers = cycle()
        assert sorted(opened) == sorted(procs)
        assert containers == {group[0][len(base) :] for group in pods}  # the moved-in process is seen
        assert first.poll() is None and second.poll() is None
        # Without cycles (a receiver driven by hand), every read goes to the file.
        fresh = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
        fresh.refresh()
        opened = []
        with _opens(opened):
            FilesystemReceiver(make_context("filesystem", fresh), FilesystemConfig()).collect()
            host = NetIfaceConfig(host_netns_path="/proc/self/ns/net")
            NetIfaceReceiver(make_context("net_iface", fresh), host).collect()
        assert sorted(p for p in opened if p.endswith("/cgroup.procs")) == sorted(procs * 2)
    finally:
        filesystem.shutdown()


def test_mount_tables_keep_nothing_outside_procfs_and_close_with_their_owner(tmp_path: Path) -> None:
    """A proc root that is not a procfs (a fixture tree) reports no changes through poll, so
    its tables are read every time; tables still open when their owner is dropped without
    close() are closed with it."""
    import gc

    from kpod.cgroup.mounttables import MountTables

    fake = tmp_path / "proc"
    (fake / "123").mkdir(parents=True)
    (fake / "123" / "mountinfo").write_text("first\n")
    tables = MountTables(str(fake))
    assert tables.limit == 0
    tables.begin()
    assert tables.read("c", [123]) == (123, "first\n")
    (fake / "123" / "mountinfo").write_text("second\n")
    tables.begin()
    assert tables.read("c", [123]) == (123, "second\n") and tables.kept == 0

    def open_mountinfos() -> int:
        mine = f"/proc/{os.getpid()}/mountinfo"
        links = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                links.append(os.readlink(f"/proc/self/fd/{fd}"))
        return links.count(mine)

    before = open_mountinfos()
    real = MountTables()
    real.begin()
    real.read("self", [os.getpid()])
    assert real.kept == 1 and open_mountinfos() == before + 1
    del real
    gc.collect()
    assert open_mountinfos() == before


@needs_root_and_cgroup2
def test_index_ids_are_the_directories_inodes_and_unchanged_entries_stay(scratch: Scratch) -> None:
    """The walk takes each cgroup's id from its directory entry (d_ino), not a stat per
    directory: every id is the directory's inode, as the kernel's cgroup id is.  A walk that
    finds nothing changed keeps the refs of the last one (points of a cgroup share one); a
    cgroup made inside a container makes the container a non-leaf and the new one a leaf."""
    s = scratch
    base, pods = _pod_tree(s, pods=2, containers=2)
    index = CgroupIndex(base, scope="kubepods", mounts=CgroupMounts(base))
    index.refresh()
    known = index.known_ids()
    assert len(known) == 1 + 1 + 2 + 4  # kubepods, burstable, two pods, four containers
    for cgroup_id in known:
        path = index.path_of(cgroup_id)
        assert path is not None and os.stat(index.abspath(path)).st_ino == cgroup_id, path
    containers = sorted(c[len(base) :] for group in pods for c in group)
    assert sorted(r.path for r in index.workloads()) == containers
    before = {r.id: r for r in index.workloads()}
    index.refresh()
    assert all(index.ref(cgroup_id) is ref for cgroup_id, ref in before.items())
    nested = s.mkdirs(f"{pods[0][0]}/nested")
    index.refresh()
    leaves = {r.path: r.id for r in index.workloads()}
    assert nested[len(base) :] in leaves and pods[0][0][len(base) :] not in leaves
    assert leaves[nested[len(base) :]] == os.stat(nested).st_ino


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@needs_root_and_cgroup2
def test_cgroup_dirs_open_the_files_of_the_directory_the_path_names_now(scratch: Scratch) -> None:
    """kpod.cgroup.dirs against real cgroups: a file opened through the kept directory is the
    file its full path names (same inode); a directory removed and made again under the same
    path is the new one; one not read for KEEP_CYCLES cycles is closed; limit 0 keeps none."""
    from kpod.cgroup.dirs import CgroupDirs
    from kpod.cgroup.keptfds import KEEP_CYCLES

    s = scratch
    _, pods = _pod_tree(s, pods=2, containers=1)
    (first,), (second,) = pods
    dirs = CgroupDirs()

    def same_file(path: str) -> bool:
        fd = dirs.open(path, os.O_RDONLY)
        assert fd is not None
        try:
            return os.fstat(fd).st_ino == os.stat(path).st_ino and os.read(fd, 4096).startswith(b"some ")
        finally:
            os.close(fd)

    try:
        assert same_file(f"{first}/cpu.pressure") and same_file(f"{first}/io.pressure")
        assert same_file(f"{second}/cpu.pressure")
        assert dirs.kept == 2
        os.rmdir(second)
        os.mkdir(second)  # the same path, a new cgroup (Scratch removes it again)
        assert same_file(f"{second}/cpu.pressure")
        assert dirs.kept == 2
        for _ in range(KEEP_CYCLES + 1):
            dirs.new_cycle()
            assert same_file(f"{second}/memory.pressure")
        assert dirs.kept == 1  # first's directory was not read for KEEP_CYCLES cycles
        with pytest.raises(FileNotFoundError):
            dirs.open(f"{second}/no.such.file", os.O_RDONLY)
        assert CgroupDirs(limit=0).open(f"{first}/cpu.pressure", os.O_RDONLY) is None
    finally:
        dirs.close()
    assert dirs.kept == 0


_BURN = r"""
import sys, time
print("ready", flush=True)
for _ in sys.stdin:
    end = time.thread_time() + 0.05
    while time.thread_time() < end:
        pass
    print("done", flush=True)
"""


def _by_path(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


@needs_root_and_cgroup2
def test_kept_files_read_afresh_the_file_the_path_names_now(scratch: Scratch, tmp_path: Path) -> None:
    """kpod.cgroup.kept against real cgroups: a kept cpu.stat read again gives the kernel's
    figure now (CPU burnt in between shows), with no descriptor opened; a removed cgroup's file
    raises FileNotFoundError and is no longer kept; one made again under the same path is the
    new cgroup's; a file not read for KEEP_CYCLES cycles is closed; limit 0 and plain files
    (not a cgroup filesystem) are read and not kept."""
    from kpod.cgroup.kept import KeptFiles
    from kpod.cgroup.keptfds import KEEP_CYCLES

    s = scratch
    _, pods = _pod_tree(s, pods=2, containers=1)
    (first,), (second,) = pods
    proc = s.spawn([sys.executable, "-c", _BURN], [first])
    assert proc.stdin and proc.stdout and proc.stdout.readline().strip() == "ready"
    kept = KeptFiles(_by_path)

    def usage(path: str) -> int:
        return parse_flat_keyed(kept.read(path).decode())[0]["usage_usec"]

    try:
        before = usage(f"{first}/cpu.stat")
        assert kept.kept == 1
        fds = _fds()
        proc.stdin.write("burn\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"
        after = usage(f"{first}/cpu.stat")
        truth = parse_flat_keyed(Path(first, "cpu.stat").read_text())[0]["usage_usec"]
        assert before + 40_000 <= after <= truth, (before, after, truth)  # 50 ms burnt
        assert _fds() == fds and kept.kept == 1  # read through the kept descriptor
        assert kept.read(f"{second}/cpu.pressure").startswith(b"some ")
        assert kept.kept == 2
        os.rmdir(second)
        with pytest.raises(FileNotFoundError):
            kept.read(f"{second}/cpu.pressure")
        assert kept.kept == 1
        os.mkdir(second)  # the same path, a new cgroup (Scratch removes it again)
        assert usage(f"{second}/cpu.stat") == 0 and kept.kept == 2
        for _ in range(KEEP_CYCLES + 1):
            kept.new_cycle()
            assert usage(f"{second}/cpu.stat") == 0
        assert kept.kept == 1  # first's cpu.stat was not read for KEEP_CYCLES cycles
        none = KeptFiles(_by_path, limit=0)
        assert none.read(f"{first}/cpu.pressure").startswith(b"some ") and none.kept == 0
        plain = tmp_path / "cpu.stat"
        plain.write_text("usage_usec 5\n")
        assert kept.read(str(plain)) == b"usage_usec 5\n" and kept.kept == 1
    finally:
        kept.close()
    assert kept.kept == 0


@needs_root_and_cgroup2
def test_kept_files_close_the_descriptors_of_removed_cgroups(scratch: Scratch) -> None:
    """A churn of cgroups whose files are read through kept descriptors cycle after cycle (40
    made and some removed each cycle): the process's descriptors never grow past the cgroups
    that are live or read in the last KEEP_CYCLES cycles, a removed cgroup's file is closed at
    its first failed read, and all are closed once every cgroup is gone."""
    from kpod.cgroup.kept import KeptFiles
    from kpod.cgroup.keptfds import KEEP_CYCLES

    s = scratch
    base, _ = _pod_tree(s, pods=1, containers=1)
    kept = KeptFiles(_by_path)
    before = _fds()
    live: list[str] = []
    try:
        for cycle in range(8):
            kept.new_cycle()
            for n in range(40):
                live.append(f"{base}/churn{cycle}-{n}")
                os.mkdir(live[-1])
            for path in live:
                assert kept.read(f"{path}/cpu.pressure").startswith(b"some ")
            assert kept.kept >= len(live)
            assert _fds() - before <= len(live) + 40 * KEEP_CYCLES
            while len(live) > 20 * (cycle + 1) // 2:  # half of them go
                gone = live.pop(0)
                os.rmdir(gone)
        held = kept.kept  # the last one removed was read in this cycle: still kept
        with pytest.raises(FileNotFoundError):
            kept.read(f"{gone}/cpu.pressure")
        assert kept.kept == held - 1
    finally:
        for path in live:
            os.rmdir(path)
    for _ in range(KEEP_CYCLES + 1):
        kept.new_cycle()
    assert kept.kept == 0
    assert _fds() == before


@needs_root_and_cgroup2
def test_cgroup_dirs_close_the_descriptors_of_removed_cgroups(scratch: Scratch) -> None:
    """A churn of cgroups read through the index's kept directories, as the cgroup-file
    receivers read them (cycle after cycle, 40 containers made and removed each cycle): the
    process's open descriptors (/proc/self/fd) never grow past the cgroups that are live or read
    in the last KEEP_CYCLES cycles, and are back where they began once all are removed."""
    from kpod.cgroup.keptfds import KEEP_CYCLES

    s = scratch
    base, _ = _pod_tree(s, pods=1, containers=1)
    index = CgroupIndex(base, scope="all")
    reads = index.reads
    before = _fds()
    live: list[str] = []
    try:
        for cycle in range(8):
            index.new_cycle()
            index.refresh()
            for n in range(40):
                live.append(f"{base}/churn{cycle}-{n}")
                os.mkdir(live[-1])
            for path in live:
                assert reads.read(f"{path}/cpu.pressure", record=True).startswith("some ")
            assert _fds() - before <= len(live) + 40 * KEEP_CYCLES
            while len(live) > 20 * (cycle + 1) // 2:  # half of them go
                os.rmdir(live.pop(0))
        assert reads.dirs.kept >= len(live)
    finally:
        for path in live:
            os.rmdir(path)
    for _ in range(KEEP_CYCLES + 1):
        index.new_cycle()
    assert reads.dirs.kept == 0
    assert _fds() == before
