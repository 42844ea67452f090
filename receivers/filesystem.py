"""filesystem: capacity, usage and available bytes of each container's real filesystems.

Per container (leaf cgroup) with a live process, from that process's view of the world:

  * <proc_root>/<pid>/mountinfo lists the container's mounts (its root overlay, volumes,
    emptyDirs, tmpfs mounts); kept open and read again only when the kernel reports a change
    (kpod.cgroup.mounttables);
  * each one is measured in the container's own mount namespace through <proc_root>/<pid>/root,
    so nothing has to be mounted or entered by the agent.

A pod controls its mounts and every name on the way to them (docs/SECURITY.md, "A hostile
pod"), so measuring goes through kpod.fsprobe: a worker process looks each mount point up
inside the container's root without following any symlink (kpod.kernel.inroot), checks that
it reached the very mount mountinfo names (its mount id) and statvfs's it there, under a
deadline.  A path that leads elsewhere is not reported (never a host filesystem under a pod's
labels); a mount that hangs costs its own series only (dropped while stuck, retried with
backoff, in kpod_filesystem_stuck_mounts and /debug/status); a pod's series are capped
(`max_series_per_pod`, whole mounts, in mountinfo order), the rest counted in
kpod_series_dropped_total{receiver, reason}.

Reported: mounts of real filesystems.  Skipped:
  * pseudo filesystems (proc, sysfs, cgroup, devpts, mqueue, ...) and anything mounted under
    /proc, /sys or /dev (masked paths, /dev/shm, /dev/pts);
  * bind-mounted single files (/etc/hosts, /etc/resolv.conf, /etc/hostname,
    /dev/termination-log, secrets projected as files): they are not filesystems of the
    container, and they would repeat the node's disk under many names (reference-pitfalls.md
    item 10).  A file mount is recognised by its path or by what the lookup reached not
    being a directory;
  * repeats: each filesystem (device number) once per container, under its first mountpoint in
    mountinfo order that measures (the root "/" comes first).

Within a cycle, a (device, root in the filesystem) measured through one container's path is
not measured again for another container that has it too: mountinfo, which the kernel writes,
says that container has that filesystem, and the figures are the filesystem's.  A container
whose shared mount could not be measured through the first container's path (that path was a
trap, or hung) is measured through its own.

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
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from kpod.cgroup.files import CgroupFileReceiver, pod_cgroup_path, read_text
from kpod.cgroup.mounttables import MountTables
from kpod.cgroup.parsers import MountInfo, parse_mountinfo, unescape_mountinfo
from kpod.component import ComponentUnavailable, Context, Factory
from kpod.fsprobe.client import Probe, StatfsProbes
from kpod.kernel.preflight import capability_gaps
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point
from kpod.units import Duration

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


STUCK_MOUNTS = "kpod.filesystem.stuck.mounts"
STUCK_MOUNTS_HELP = "Mounts whose statfs hung past its deadline and has not measured since (their series are dropped)."
PROBE_TIMEOUTS = "kpod.filesystem.probe.timeouts"
PROBE_TIMEOUTS_HELP = "Mount measurements that passed their deadline (each holds a worker thread until it returns)."
SERIES_PER_MOUNT = 3
MAX_ROUNDS = 4  # worker exchanges per collection (see FilesystemReceiver._measure)


# Per mount, ready for the per-cycle loop: the (device, root) a measurement is shared by, the
# point attributes, and the probe that measures it through this container's path.
_Mount = tuple[tuple[tuple[int, int], str], tuple[tuple[str, str], ...], Probe]
# One filesystem (device) of a container: its mounts in mountinfo order (the first that measures
# is reported).
_Filesystem = tuple[_Mount, ...]


@dataclass
class FilesystemConfig:
    # Extra filesystem types to skip (e.g. "squashfs", "fuse.lxcfs").
    exclude_fstypes: list[str] = field(default_factory=list)
    # Mountpoints (and everything below them) to skip.
    exclude_mountpoints: list[str] = field(default_factory=list)
    # A mount whose measurement takes longer is stuck: its series are dropped until it answers
    # (at most a quarter of the cycle timeout is waited, whatever this says).
    statfs_timeout: Duration = field(default_factory=lambda: Duration.parse("1s"))
    # Stuck measurements a pod may have at once (each holds one worker thread); its other
    # mounts are not measured meanwhile.
    max_stuck_mounts_per_pod: int = 4
    # Series per pod at most (3 per filesystem: whole filesystems, in mountinfo order).
    max_series_per_pod: int = 192

    def validate(self) -> None:
        if self.max_stuck_mounts_per_pod < 1:
            raise ValueError("max_stuck_mounts_per_pod: must be at least 1")
        if self.max_series_per_pod < SERIES_PER_MOUNT:
            raise ValueError(f"max_series_per_pod: must be at least {SERIES_PER_MOUNT}")
        if not 0 < self.statfs_timeout.seconds <= 60:
            raise ValueError("statfs_timeout: must be more than 0s and at most 60s")


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


@dataclass(eq=False)
class _Container:
    """A container as the per-cycle loop needs it, kept while its process and mount table
    stay the same (the cycle's work per container is then a lookup)."""

    ref: CgroupRef
    pod: str  # the pod cgroup (or the container's own path outside Kubernetes)
    pid: int  # the process whose mount table and root are used
    text: str  # that mount table, as MountTables returned it
    filesystems: tuple[_Filesystem, ...]  # in mountinfo order of their first mount


def plan_filesystems(
    key: Hashable, pod: str, root: str, mounts: list[tuple[MountInfo, tuple[tuple[str, str], ...]]]
) -> tuple[_Filesystem, ...]:
    """A container's candidate mounts (with their point attributes) grouped by device, each
    with its probe: what `_measure` walks every cycle, made once per mount table.  Pure."""
    by_dev: dict[tuple[int, int], list[_Mount]] = {}
    for m, attrs in mounts:
        probe = Probe((key, m.mount_id, m.mount_point), pod, root, m.mount_point, m.mount_id, m.dev)
        by_dev.setdefault(m.dev, []).append(((m.dev, m.root), attrs, probe))
    return tuple(tuple(group) for group in by_dev.values())


class FilesystemReceiver(CgroupFileReceiver):
    metrics = (CAPACITY, USAGE, AVAILABLE)

    def __init__(self, context: Context, config: FilesystemConfig) -> None:
        super().__init__(context, config)
        self.config: FilesystemConfig = config
        self.proc_root = context.settings.cgroup.proc_root.rstrip("/") or "/"
        self._exclude_fstypes = frozenset(config.exclude_fstypes)
        self._exclude_points = tuple(config.exclude_mountpoints)
        # Per container (cgroup id), rebuilt when its process or mount table changes.
        self._containers: dict[int, _Container] = {}
        # The host's mount table (for overlays' upper layers): read at most once per cycle,
        # and only when a container's mount table changed.
        self._host_mounts: list[MountInfo] | None = None
        # Each container's mountinfo, kept open and read again only when it changed.
        self._tables = MountTables(self.proc_root)
        settings = context.settings
        self._cycle_s = settings.cycle_timeout.seconds or settings.poll_interval.seconds
        deadline = min(config.statfs_timeout.seconds, self._cycle_s / 4)
        self._probes = StatfsProbes(self.log, deadline, config.max_stuck_mounts_per_pod)
        self._last: dict[str, int] = {}
        context.self_metrics.set(STUCK_MOUNTS, STUCK_MOUNTS_HELP, 0, (("receiver", self.id),))
        context.self_metrics.inc(PROBE_TIMEOUTS, PROBE_TIMEOUTS_HELP, (("receiver", self.id),), 0)
        for reason in ("mount_stuck", "mount_unreachable", "pod_limit"):
            self._dropped(reason, 0)

    def preflight(self) -> str | None:
        if not os.path.exists(f"{self.proc_root}/1/mountinfo"):
            return f"{self.proc_root}/1/mountinfo is missing: needs the host's /proc (hostPID)"
        return None

    def route(self) -> str:
        return (
            f"statvfs via {self.proc_root}/<pid>/root for the mounts in {self.proc_root}/<pid>/mountinfo, "
            "in a worker process, looked up without symlinks and checked against mountinfo"
        )

    def start(self) -> None:
        reason = self.preflight()
        if reason:
            raise ComponentUnavailable(reason)
        try:
            self._probes.start()
        except OSError as error:
            raise ComponentUnavailable(f"cannot start the statfs worker: {error}") from error
        # Runs without them, but loses data; say so once (docs/CAPABILITIES.md).
        for line in capability_gaps(CAPABILITY_LOSSES):
            self.log.warning(line)

    def shutdown(self) -> None:
        self._probes.shutdown()
        self._tables.close()

    def status(self) -> dict[str, Any]:
        return {
            "statfs_worker_pid": self._probes.worker_pid,
            "probes_hanging": self._probes.pending,
            "stuck_mounts": self._probes.stuck(),
            "last_cycle": dict(self._last),
            "mount_tables_kept": self._tables.kept,
            "mount_tables_limit": self._tables.limit,
            "mount_tables_read": self._tables.reads,
        }

    def collect(self) -> Batch:
        self._host_mounts = None
        containers: dict[int, _Container] = {}
        self._tables.begin()
        for ref in self.context.cgroups.workloads():
            pids = self._pids(ref)
            if pids:
                container = self._container(ref, pids)
                if container is not None:
                    containers[ref.id] = container
        self._tables.end()
        self._containers = containers  # forgets the containers not read this cycle
        # Half the cycle at most: the collection must end before the pipeline abandons it.
        return self._measure(list(containers.values()), budget_s=self._cycle_s / 2)

    def _container(self, ref: CgroupRef, pids: list[int]) -> _Container | None:
        # Any process of the container sees the container's mounts; the first one that is
        # still alive will do.  All of them gone since cgroup.procs is the usual "pod ended":
        # churn, not an error.
        try:
            pid, text = self._tables.read(ref.id, pids)
        except OSError:
            if any(os.path.isdir(f"{self.proc_root}/{pid}") for pid in pids):
                self._error()
            else:
                self._vanished()
            return None
        # A container's mount table rarely changes: plan it again only when its text does
        # (or its process or path), and keep what the per-cycle loop needs ready-made.
        known = self._containers.get(ref.id)
        if known is not None and known.pid == pid and known.ref == ref:
            if known.text is text:
                return known
            if known.text == text:  # read again, unchanged: keep the one text the tables keep
                known.text = text
                return known
        pod = pod_cgroup_path(ref.path) or ref.path
        root = f"{self.proc_root}/{pid}/root"
        return _Container(ref, pod, pid, text, plan_filesystems(ref.id, pod, root, self._candidates(text)))

    def _candidates(self, text: str) -> list[tuple[MountInfo, tuple[tuple[str, str], ...]]]:
        """The mounts of a mount table worth measuring, each with its point attributes."""
        out = []
        for m in candidate_mounts(parse_mountinfo(text), self._exclude_fstypes, self._exclude_points):
            device, fstype = backing_filesystem(m, self._host_table() if m.fstype == "overlay" else [])
            out.append((m, (("device", device), ("fstype", fstype), ("mountpoint", m.mount_point))))
        return out

    def _host_table(self) -> list[MountInfo]:
        if self._host_mounts is None:
            try:
                self._host_mounts = parse_mountinfo(read_text(f"{self.proc_root}/1/mountinfo"))
            except OSError:
                self._host_mounts = []  # overlays then keep their own device
        return self._host_mounts

    def _measure(self, containers: list[_Container], budget_s: float) -> Batch:
        """Measure each container's filesystems in rounds of probes (one worker exchange each):

        * a container's filesystem (device) is tried under its first mount point; under the
          next one only if that one was not measured (a file, unreachable, failed);
        * a (device, root) measured (or found a file) for one container is not probed again
          for another; one being probed for another container waits a round for its result;
        * a pod gets probes for at most as many filesystems as its series cap allows;
        * at most MAX_ROUNDS rounds: what is still unresolved then counts as unreachable.
        """
        batch = Batch()
        points = batch.points
        counts = {"measured": 0, "not_a_directory": 0, "not_the_mount": 0, "failed": 0, "stuck": 0, "capped": 0,
                  "probes": 0}  # fmt: skip
        room = dict.fromkeys((c.pod for c in containers), self.config.max_series_per_pod // SERIES_PER_MOUNT)
        # What is left to resolve: (container, filesystem, which of its mounts to try).
        todo = [(c, fs, 0) for c in containers for fs in c.filesystems]
        # (device, root) -> its capacity, usage and available bytes, or None for a file.
        shared: dict[tuple[tuple[int, int], str], tuple[float, float, float] | None] = {}
        interval = self.context.settings.poll_interval.seconds
        deadline = time.monotonic() + budget_s
        for _ in range(MAX_ROUNDS):
            if not todo:
                break
            probes: list[Probe] = []
            asked: dict[tuple[tuple[int, int], str], Hashable] = {}
            # With the key of this round's own probe, or None: the result is the shared one.
            waiting: list[tuple[_Container, _Filesystem, int, Hashable | None]] = []
            planned = dict.fromkeys(room, 0)
            for container, fs, index in todo:
                pod = container.pod
                if planned[pod] >= room[pod]:
                    counts["capped"] += 1  # the pod's cap: not measured at all
                    continue
                share, _, probe = fs[index]
                key = None
                if share not in shared and share not in asked:
                    probes.append(probe)
                    asked[share] = key = probe.key
                # else: measured already, or another container's probe of it answers this round
                waiting.append((container, fs, index, key))
                planned[pod] += 1
            counts["probes"] += len(probes)
            results = self._probes.measure(probes, max(0.0, deadline - time.monotonic()), interval)
            for share, key in asked.items():
                result = results[key]
                if result.outcome == "measured":
                    assert result.vfs is not None
                    blocks, bfree, bavail, frsize = result.vfs
                    shared[share] = (float(blocks * frsize), float((blocks - bfree) * frsize), float(bavail * frsize))
                elif result.outcome == "not_a_directory":
                    shared[share] = None
            todo = []
            for container, fs, index, key in waiting:
                share, attrs, _ = fs[index]
                if key is None:
                    if share not in shared:
                        todo.append((container, fs, index))  # probed for another container: next round
                        continue
                    values = shared[share]
                    outcome = "measured" if values is not None else "not_a_directory"
                else:
                    outcome = results[key].outcome
                    values = shared.get(share)
                if outcome == "measured":
                    assert values is not None
                    pod = container.pod
                    if room[pod] <= 0:
                        counts["capped"] += 1
                        continue
                    room[pod] -= 1
                    counts["measured"] += 1
                    ref = container.ref
                    capacity, usage, available = values
                    points.append(Point(CAPACITY, ref, attrs, capacity))
                    points.append(Point(USAGE, ref, attrs, usage))
                    points.append(Point(AVAILABLE, ref, attrs, available))
                elif outcome in ("stuck", "stuck_limit", "deferred"):
                    counts["stuck"] += 1
                else:
                    counts[outcome if outcome in counts else "failed"] += 1
                    if index + 1 < len(fs):
                        todo.append((container, fs, index + 1))  # the same filesystem under its next mount point
        counts["not_the_mount"] += len(todo)  # still unresolved after MAX_ROUNDS
        self._account(counts)
        return batch

    def _account(self, counts: dict[str, int]) -> None:
        if counts["failed"]:
            self._error(counts["failed"])
        self._dropped("mount_stuck", SERIES_PER_MOUNT * counts["stuck"])
        self._dropped("mount_unreachable", SERIES_PER_MOUNT * counts["not_the_mount"])
        self._dropped("pod_limit", SERIES_PER_MOUNT * counts["capped"])
        labels = (("receiver", self.id),)
        metrics = self.context.self_metrics
        metrics.set(STUCK_MOUNTS, STUCK_MOUNTS_HELP, float(len(self._probes.stuck())), labels)
        metrics.set_counter(PROBE_TIMEOUTS, PROBE_TIMEOUTS_HELP, float(self._probes.timeouts), labels)
        self._last = counts


factory = Factory(
    type="filesystem",
    kind="receiver",
    config_class=FilesystemConfig,
    create=lambda context, config: FilesystemReceiver(context, config),
    description="Capacity, usage and available bytes of each container's filesystems (statvfs)",
)
