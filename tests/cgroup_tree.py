"""Test support for the cgroup receivers: the captured kernel files (tests/fixtures, see its
README for what each holds) and a node-shaped tree built from them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.mounts import CgroupMounts
from kpod.cgroup.parsers import parse_mountinfo
from kpod.component import Context
from kpod.kernel.inroot import mount_of
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V2 = FIXTURES / "cgroup-v2-kernel-6.1"
HYBRID = FIXTURES / "cgroup-hybrid-kernel-6.18"


# Real files of one container of each role, from the 6.1 capture.
_POD1 = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice"
_POD3 = "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_0000_4000_8000_000000000003.slice"
SRC_IO = _POD1 + "/cri-containerd-a38b6325e8f53ac409df59c7e8415bdad54139296ebfa17f5dbb24a9774ed983.scope"
SRC_SANDBOX = _POD1 + "/cri-containerd-dfa15a989fae12701a7a9b2890bad323888b19ccf407ba514797a491c2d2a09a.scope"
SRC_MEM = _POD3 + "/cri-containerd-13bf7efd066cba86cb078dd995ca5edd1ca632bfe55d45fa78038acb8ce9dbd4.scope"
V2_FILES = ("io.stat", "cpu.stat", "memory.current", "memory.stat", "cpu.pressure", "memory.pressure",
            "io.pressure")  # fmt: skip
HYBRID_UNIFIED = HYBRID / "unified" / "kpod-fixture-unified"
HYBRID_BLKIO = HYBRID / "blkio" / "kpod-fixture-blkio"
HYBRID_BLKIO_NORULE = HYBRID / "blkio" / "kpod-fixture-blkio-norule"
HYBRID_MEM = HYBRID / "memory" / "kpod-fixture-mem"
QOS = ("burstable", "besteffort", "guaranteed")


@dataclass
class Container:
    path: str  # relative to the cgroup2 root, starting with "/"
    role: str  # sandbox | io | mem | exited
    pid: int | None


@dataclass
class Pod:
    uid: str
    path: str
    containers: list[Container]
    host_network: bool
    netns_file: str = ""


@dataclass
class Tree:
    """A node-shaped fixture: cgroup2 root (plus v1 blkio/memory on hybrid), /proc and /sys."""

    base: Path
    layout: str  # v2 | hybrid
    driver: str  # systemd | cgroupfs
    cgroup_root: str
    proc_root: str
    sys_root: str
    mounts: CgroupMounts
    pods: list[Pod] = field(default_factory=list)

    def index(self) -> CgroupIndex:
        index = CgroupIndex(self.cgroup_root, scope="kubepods", mounts=self.mounts)
        index.refresh()
        return index

    def context(self, component_id: str, index: CgroupIndex | None = None,
                self_metrics: SelfMetrics | None = None) -> Context:  # fmt: skip
        return make_context(component_id, index or self.index(), self.proc_root, self_metrics)


def make_context(component_id: str, index: CgroupIndex, proc_root: str = "/proc",
                 self_metrics: SelfMetrics | None = None) -> Context:  # fmt: skip
    settings = KpodSettings()
    settings.cgroup.root = index.root
    settings.cgroup.proc_root = proc_root
    return Context(component_id, settings, index, self_metrics or SelfMetrics())


def _uid(n: int) -> str:
    return f"0a1b2c3d-0000-4000-8000-{n:012d}"


def _cid(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _pod_paths(driver: str, n: int, qos: str) -> tuple[str, str]:
    """(pod cgroup path, container path template with {cid})."""
    uid = _uid(n)
    if driver == "systemd":
        us = uid.replace("-", "_")
        if qos == "guaranteed":
            pod = f"/kubepods.slice/kubepods-pod{us}.slice"
        else:
            pod = f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{us}.slice"
        return pod, pod + "/cri-containerd-{cid}.scope"
    pod = f"/kubepods/pod{uid}" if qos == "guaranteed" else f"/kubepods/{qos}/pod{uid}"
    return pod, pod + "/{cid}"


def build_tree(base: Path, pods: int = 110, layout: str = "v2", driver: str = "systemd") -> Tree:
    """Lay out a node with `pods` pods from the captured files.

    Every pod has a sandbox container (a live pid), an I/O container (a live pid, the real
    io.stat of the dd container and the memory-holder's memory files) and, every third pod, a
    container that has exited (no pid).  Every tenth pod uses the host network.  Processes are
    /proc directories: net/dev (the captured pod one), ns/net (one file per pod netns, a symlink
    to /proc/1/ns/net for host-network pods), mountinfo (the captured container one) and root (a
    directory with the mountpoints, so statvfs works on the test machine's filesystem).
    With layout "hybrid", cgroup2 has no controllers and blkio/memory live in v1 trees with the
    same relative paths (every other pod's blkio files are "Total 0": no throttle rule).
    """
    cg2 = base / ("unified" if layout == "hybrid" else "cgroup")
    proc = base / "proc"
    sysfs = base / "sys"
    cg2.mkdir(parents=True)
    v1: dict[str, str] = {}
    if layout == "hybrid":
        (cg2 / "cgroup.controllers").write_text("")
        for controller in ("blkio", "memory"):
            (base / controller).mkdir()
            v1[controller] = str(base / controller)
    else:
        shutil.copy(V2 / "cgroup.controllers", cg2 / "cgroup.controllers")
    root_source = HYBRID_UNIFIED if layout == "hybrid" else V2
    for name in ("cpu.pressure", "io.pressure", "memory.pressure", "cpu.stat"):
        shutil.copy(root_source / name, cg2 / name)
    (proc / "1" / "ns").mkdir(parents=True)
    (proc / "1" / "ns" / "net").write_text("host netns\n")
    shutil.copy(V2 / "proc" / "mountinfo-host-v2.txt", proc / "1" / "mountinfo")
    for devnum, source in (("254:0", V2 / "sys" / "dev-block-uevent.txt"),
                           ("7:0", HYBRID / "sys" / "dev-block-uevent-loop0.txt")):  # fmt: skip
        (sysfs / "dev" / "block" / devnum).mkdir(parents=True)
        shutil.copy(source, sysfs / "dev" / "block" / devnum / "uevent")
    mountinfo = (V2 / "proc" / "mountinfo-container.txt").read_text()
    net_dev = (V2 / "proc" / "net-dev-pod.txt").read_text()
    mountpoints = [m.mount_point for m in parse_mountinfo(mountinfo)]

    tree = Tree(base, layout, driver, str(cg2), str(proc), str(sysfs), CgroupMounts(str(cg2), v1))
    next_pid = 1000
    for n in range(1, pods + 1):
        qos = QOS[n % 3]
        pod_path, template = _pod_paths(driver, n, qos)
        roles = ["sandbox", "io"] + (["exited"] if n % 3 == 0 else [])
        containers = []
        for role in roles:
            pid = None if role == "exited" else next_pid
            next_pid += 1 if pid else 0
            containers.append(Container(template.format(cid=_cid(f"pod{n}-{role}")), role, pid))
        pod = Pod(_uid(n), pod_path, containers, host_network=n % 10 == 0)
        pod.netns_file = str(proc / "1" / "ns" / "net") if pod.host_network else str(base / "netns" / pod.uid)
        if not pod.host_network:
            (base / "netns").mkdir(exist_ok=True)
            Path(pod.netns_file).write_text(pod.uid)
        tree.pods.append(pod)
        for c in containers:
            _write_container(tree, n, c, pod, mountinfo, net_dev, mountpoints)
    return tree


def _mount_id(path: Path) -> int:
    fd = os.open(path, os.O_PATH | os.O_DIRECTORY)
    try:
        reached = mount_of(fd)
    finally:
        os.close(fd)
    assert reached.mount_id is not None, "statx has no mount id here (kernel before 5.8?)"
    return reached.mount_id


def _own_mountinfo(text: str, pid: int, mount_id: int) -> str:
    """The captured container mountinfo, made this container's own as on a real node: its
    own root overlay (0:24), /run tmpfs (0:27) and /data tmpfs (0:34).  The node's disk
    (254:0), the 9p share and the pseudo filesystems stay shared.  Every line names
    `mount_id`, the mount the fake root's directories really are on: the filesystem receiver
    measures a mount only where its lookup reaches the mount that mountinfo names."""
    own = {"0:24": f"0:{100000 + pid}", "0:27": f"0:{200000 + pid}", "0:34": f"0:{300000 + pid}"}
    lines = []
    for line in text.splitlines():
        fields = line.split(" ")
        fields[0] = str(mount_id)
        fields[1] = str(int(fields[1]) + pid * 100)
        fields[2] = own.get(fields[2], fields[2])
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"


def _write_container(tree: Tree, n: int, c: Container, pod: Pod, mountinfo: str, net_dev: str,
                     mountpoints: list[str]) -> None:  # fmt: skip
    base = tree.base
    directory = Path(tree.cgroup_root + c.path)
    directory.mkdir(parents=True)
    source = {"sandbox": V2 / SRC_SANDBOX, "io": V2 / SRC_IO, "exited": V2 / SRC_IO}[c.role]
    (directory / "cgroup.procs").write_text(f"{c.pid}\n" if c.pid else "")
    if tree.layout == "v2":
        for name in V2_FILES:
            src = (V2 / SRC_MEM / name) if name.startswith("memory.") and c.role == "io" else source / name
            shutil.copy(src, directory / name)
    else:
        for name in ("cpu.stat", "cpu.pressure", "io.pressure", "memory.pressure"):
            shutil.copy(HYBRID_UNIFIED / name, directory / name)
        blkio = Path(tree.mounts.v1["blkio"] + c.path)
        blkio.mkdir(parents=True)
        src_blkio = HYBRID_BLKIO if (c.role == "io" and n % 2) else HYBRID_BLKIO_NORULE
        for name in ("blkio.throttle.io_service_bytes", "blkio.throttle.io_serviced"):
            shutil.copy(src_blkio / name, blkio / name)
        memory = Path(tree.mounts.v1["memory"] + c.path)
        memory.mkdir(parents=True)
        for name in ("memory.usage_in_bytes", "memory.stat"):
            shutil.copy(HYBRID_MEM / name, memory / name)
    if c.pid is None:
        return
    pdir = base / "proc" / str(c.pid)
    (pdir / "ns").mkdir(parents=True)
    (pdir / "net").mkdir()
    (pdir / "ns" / "net").symlink_to(pod.netns_file)
    (pdir / "net" / "dev").write_text(net_dev)
    root = base / "roots" / str(c.pid)
    for point in mountpoints:
        target = root / point.lstrip("/")
        if point == "/etc/hosts":
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("127.0.0.1 localhost\n")
        else:
            target.mkdir(parents=True, exist_ok=True)
    (pdir / "root").symlink_to(root)
    (pdir / "mountinfo").write_text(_own_mountinfo(mountinfo, c.pid, _mount_id(root)))
