"""filesystem: capacity, usage and available bytes of each container's real filesystems.

Per container (leaf cgroup) with a live process, from that process's view of the world:

  * <proc_root>/<pid>/mountinfo lists the container's mounts (its root overlay, volumes,
    emptyDirs, tmpfs mounts); kept open and read again only when the kernel reports a change
    (kpod.cgroup.mounttables);
  * statvfs(<proc_root>/<pid>/root/<mountpoint>) measures each one in the container's own
    mount namespace, so nothing has to be mounted or entered by the agent.

Reported: mounts of real filesystems.  Skipped:
  * pseudo filesystems (proc, sysfs, cgroup, devpts, mqueue, ...) and anything mounted under
    /proc, /sys or /dev (masked paths, /dev/shm, /dev/pts);
  * bind-mounted single files (/etc/hosts, /etc/resolv.conf, /etc/hostname,
    /dev/termination-log, secrets projected as files): they are not filesystems of the
    container, and they would repeat the node's disk under many names (reference-pitfalls.md
    item 10).  A file mount is recognised by its path or, for any bind mount (root != "/"),
    by stat telling a regular file;
  * repeats: each filesystem (device number) once per container, under its first mountpoint in
    mountinfo order (the root "/" comes first).

Values (bytes, gauges): capacity = f_blocks * f_frsize, available = f_bavail * f_frsize (what an
unprivileged writer can still use), usage = (f_blocks - f_bfree) * f_frsize (as df "Used").

Which disk: many containers report the same filesystem (every root overlay and emptyDir lives
on the node's disk; statvfs of an overlay measures its upper layer's filesystem).  Each series
carries the filesystem that holds its data, so one full disk is one alert:

  * `device`: that filesystem's source as mountinfo names it ("/dev/nvme0n1p1", an NFS export,
    the node_exporter convention), or its kernel device number "major:minor" when the source
    names no device (each tmpfs is a filesystem of its own, all called "tmpfs");
  * `fstype`: its type (ext4, xfs, tmpfs, ...).

For an overlay that is the filesystem of its upperdir, looked up in the host's mount table
(<proc_root>/1/mountinfo: the mount whose mountpoint is the longest prefix of the upperdir).
Pure string work, no path is resolved; an overlay whose upperdir is not found stays itself.
"""

from __future__ import annotations

import os
import stat as stat_mod
from dataclasses import dataclass, field

from kpod.cgroup.files import CgroupFileReceiver, read_text
from kpod.cgroup.mounttables import MountTables
from kpod.cgroup.parsers import MountInfo, parse_mountinfo, unescape_mountinfo
from kpod.component import ComponentUnavailable, Context, Factory
from kpod.kernel.preflight import capability_gaps
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point

_MP = ("device", "fstype", "mountpoint")
CAPACITY = MetricDef("kpod.fs.capacity.bytes", Kind.GAUGE, "By", "Filesystem size", _MP)
USAGE = MetricDef("kpod.fs.usage.bytes", Kind.GAUGE, "By", "Filesystem bytes in use", _MP)
AVAILABLE = MetricDef(
    "kpod.fs.available.bytes", Kind.GAUGE, "By", "Filesystem bytes available to unprivileged users", _MP
)

PSEUDO_FSTYPES = frozenset(
    {
        "autofs", "binfmt_misc", "bpf", "cgroup", "cgroup2", "configfs", "debugfs", "devpts", "devtmpfs",
        "efivarfs", "fusectl", "hugetlbfs", "mqueue", "nsfs", "proc", "pstore", "rpc_pipefs",
        "securityfs", "selinuxfs", "sysfs", "tracefs",
    }
)  # fmt: skip

# Files the kubelet and runtimes bind-mount into every container.
KNOWN_FILE_MOUNTS = frozenset(
    {"/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/dev/termination-log", "/run/.containerenv"}
)
_PSEUDO_PREFIXES = ("/proc/", "/sys/", "/dev/")


CAPABILITY_LOSSES = {
    "CAP_SYS_PTRACE": "the root of a pod process holding capabilities the agent lacks (most pods) cannot be "
    "entered, so those pods get no filesystem series (counted as collection errors)",
    "CAP_DAC_READ_SEARCH": "volumes below a directory only its (non-root) owner may search are skipped",
}


# Per mount, ready for the per-cycle loop: device, (device, root) cache key, mountpoint,
# the point attributes, and whether it is a bind mount (root != "/": may be a single file).
_Entry = tuple[tuple[int, int], tuple[tuple[int, int], str], str, tuple[tuple[str, str], ...], bool]


@dataclass
class FilesystemConfig:
    # Extra filesystem types to skip (e.g. "squashfs", "fuse.lxcfs").
    exclude_fstypes: list[str] = field(default_factory=list)
    # Mountpoints (and everything below them) to skip.
    exclude_mountpoints: list[str] = field(default_factory=list)


def candidate_mounts(
    mounts: list[MountInfo],
    exclude_fstypes: frozenset[str] = frozenset(),
    exclude_mountpoints: tuple[str, ...] = (),
) -> list[MountInfo]:
    """The mounts worth measuring, by mountinfo alone (no I/O): pure, so it is unit tested.

    Drops pseudo filesystems, mounts under /proc, /sys and /dev, the known file mounts and
    excluded ones.  Bind mounts of other single files still need a stat, and repeats of a
    device are dropped after it (so a file bind mount cannot hide a real volume on the same
    device): both are the receiver's job.
    """
    chosen: list[MountInfo] = []
    for mount in mounts:
        point = mount.mount_point
        if mount.fstype in PSEUDO_FSTYPES or mount.fstype in exclude_fstypes:
            continue
        if point in ("/proc", "/sys", "/dev") or point.startswith(_PSEUDO_PREFIXES):
            continue
        if point in KNOWN_FILE_MOUNTS:
            continue
        if any(point == p or point.startswith(p.rstrip("/") + "/") for p in exclude_mountpoints):
            continue
        chosen.append(mount)
    return chosen


def _names_a_device(source: str) -> bool:
    """A source that tells filesystems apart: a device path or a network export ("host:/path")."""
    return source.startswith("/") or ":/" in source


def _super_option(super_options: str, name: str) -> str | None:
    """One option of mountinfo's super options (commas inside values are written as \\054)."""
    prefix = name + "="
    for option in super_options.split(","):
        if option.startswith(prefix):
            return unescape_mountinfo(option[len(prefix) :])
    return None


def containing_mount(path: str, mounts: list[MountInfo]) -> MountInfo | None:
    """The mount `path` lies on: the longest mountpoint that is `path` or a parent of it (the
    last one in mountinfo order when several are stacked there)."""
    best: MountInfo | None = None
    for mount in mounts:
        point = mount.mount_point
        below = path == point or point == "/" or path.startswith(point.rstrip("/") + "/")
        if below and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best


def backing_filesystem(mount: MountInfo, host_mounts: list[MountInfo]) -> tuple[str, str]:
    """(device, fstype) of the filesystem that holds a mount's data (see the module doc).

    Pure: `host_mounts` is the host's mount table, used for overlays (their data is in the
    upperdir's filesystem, which is also what statvfs of the overlay measures)."""
    if mount.fstype == "overlay":
        upper = _super_option(mount.super_options, "upperdir")
        below = containing_mount(upper, host_mounts) if upper and upper.startswith("/") else None
        if below is not None and below.fstype != "overlay":
            mount = below
    if _names_a_device(mount.source):
        return mount.source, mount.fstype
    return f"{mount.dev[0]}:{mount.dev[1]}", mount.fstype


class FilesystemReceiver(CgroupFileReceiver):
    metrics = (CAPACITY, USAGE, AVAILABLE)

    def __init__(self, context: Context, config: FilesystemConfig) -> None:
        super().__init__(context, config)
        self.proc_root = context.settings.cgroup.proc_root.rstrip("/") or "/"
        self._exclude_fstypes = frozenset(config.exclude_fstypes)
        self._exclude_points = tuple(config.exclude_mountpoints)
        self._mount_cache: dict[int, tuple[str, list[_Entry]]] = {}
        # The host's mount table (for overlays' upper layers): read at most once per cycle,
        # and only when a container's mount table changed.
        self._host_mounts: list[MountInfo] | None = None
        # Each container's mountinfo, kept open and read again only when it changed.
        self._tables = MountTables(self.proc_root)

    def preflight(self) -> str | None:
        if not os.path.exists(f"{self.proc_root}/1/mountinfo"):
            return f"{self.proc_root}/1/mountinfo is missing: needs the host's /proc (hostPID)"
        return None

    def route(self) -> str:
        return f"statvfs via {self.proc_root}/<pid>/root for the mounts in {self.proc_root}/<pid>/mountinfo"

    def start(self) -> None:
        reason = self.preflight()
        if reason:
            raise ComponentUnavailable(reason)
        # Runs without them, but loses data; say so once (docs/CAPABILITIES.md).
        for line in capability_gaps(CAPABILITY_LOSSES):
            self.log.warning(line)

    def shutdown(self) -> None:
        self._tables.close()

    def status(self) -> dict[str, object]:
        return {"mount_tables_kept": self._tables.kept, "mount_tables_read": self._tables.reads}

    def collect(self) -> Batch:
        batch = Batch()
        # (device, root inside the filesystem) -> statvfs result, or None for a regular file.
        # Within one cycle the same subtree of the same filesystem measures the same through
        # any container's root (keyed by root too, so per-directory quotas stay apart).
        measured: dict[tuple[tuple[int, int], str], os.statvfs_result | None] = {}
        live: set[int] = set()
        self._host_mounts = None
        self._tables.begin()
        for ref in self.context.cgroups.workloads():
            pids = self._pids(ref)
            if pids:
                self._collect_container(ref, pids, batch, measured, live)
        self._tables.end()
        # Forget the mount tables of processes that were not read this cycle.
        for pid in self._mount_cache.keys() - live:
            del self._mount_cache[pid]
        return batch

    def _candidates(self, pid: int, text: str) -> list[_Entry]:
        # A container's mount table rarely changes: parse it again only when its text does,
        # and keep what the loop below needs per mount ready-made.
        cached = self._mount_cache.get(pid)
        if cached is not None and cached[0] == text:
            return cached[1]
        entries: list[_Entry] = []
        for m in candidate_mounts(parse_mountinfo(text), self._exclude_fstypes, self._exclude_points):
            device, fstype = backing_filesystem(m, self._host_table() if m.fstype == "overlay" else [])
            attrs = (("device", device), ("fstype", fstype), ("mountpoint", m.mount_point))
            entries.append((m.dev, (m.dev, m.root), m.mount_point, attrs, m.root != "/"))
        self._mount_cache[pid] = (text, entries)
        return entries

    def _host_table(self) -> list[MountInfo]:
        if self._host_mounts is None:
            try:
                self._host_mounts = parse_mountinfo(read_text(f"{self.proc_root}/1/mountinfo"))
            except OSError:
                self._host_mounts = []  # overlays then keep their own device
        return self._host_mounts

    def _collect_container(
        self,
        ref: CgroupRef,
        pids: list[int],
        batch: Batch,
        measured: dict[tuple[tuple[int, int], str], os.statvfs_result | None],
        live: set[int],
    ) -> None:
        # Any process of the container sees the container's mounts; the first one that is
        # still alive will do.  Its exit between the reads is the usual "pod ended" error.
        try:
            pid, text = self._tables.read(ref.id, pids)
        except OSError:
            self._error()
            return
        live.add(pid)
        root = f"{self.proc_root}/{pid}/root"
        add = batch.points.append
        seen: set[tuple[int, int]] = set()
        for dev, key, mount_point, attrs, is_bind in self._candidates(pid, text):
            if dev in seen:
                continue  # the same filesystem under another mountpoint: once per container
            if key in measured:
                vfs = measured[key]
            else:
                path = root + mount_point
                try:
                    # A bind-mounted single file (root != "/" and a regular file) is not a
                    # filesystem of the container: remembered as None.
                    is_file = is_bind and stat_mod.S_ISREG(os.stat(path).st_mode)
                    vfs = None if is_file else os.statvfs(path)
                except OSError:
                    self._error()
                    continue
                measured[key] = vfs
            if vfs is None:
                continue
            seen.add(dev)
            frsize = vfs.f_frsize
            add(Point(CAPACITY, ref, attrs, float(vfs.f_blocks * frsize)))
            add(Point(USAGE, ref, attrs, float((vfs.f_blocks - vfs.f_bfree) * frsize)))
            add(Point(AVAILABLE, ref, attrs, float(vfs.f_bavail * frsize)))


factory = Factory(
    type="filesystem",
    kind="receiver",
    config_class=FilesystemConfig,
    create=lambda context, config: FilesystemReceiver(context, config),
    description="Capacity, usage and available bytes of each container's filesystems (statvfs)",
)
