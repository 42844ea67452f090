"""File access shared by the cgroup-file receivers (disk, net_iface, filesystem, memory, pressure).

The parsers in kpod.cgroup.parsers are pure; this module does the reading: one `os.read` loop per
file (kernfs and procfs files are generated on read, so there is nothing to gain from Python's
buffered layer), the error accounting every receiver must do the same way, and the few path
rules of the cgroup layouts (v1 controller paths on hybrid hosts, the pod cgroup of a
container, the live processes of a cgroup).
"""

from __future__ import annotations

import errno
import functools
import os
import re
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar

from kpod.cgroup.dirs import CgroupDirs
from kpod.cgroup.kept import KeptFiles
from kpod.cgroup.mounts import CgroupMounts
from kpod.cgroup.parsers import parse_cgroup_procs, skipped_in_this_thread
from kpod.cgroup.paths import is_dir, open_long
from kpod.component import ComponentUnavailable, Context, Receiver
from kpod.model import CgroupRef

# The scheduler's family: a file that cannot be read counts as the receiver's collection error.
from kpod.scheduler import COLLECTION_ERRORS, COLLECTION_ERRORS_HELP

VANISHED_READS = "kpod.collection.vanished"
VANISHED_READS_HELP = (
    "Reads a receiver skipped because their cgroup or process ended between the cycle's index and "
    "the read, by receiver: the churn of a busy node, not an error."
)
SERIES_DROPPED = "kpod.series.dropped"
SERIES_DROPPED_HELP = (
    "Series a receiver did not report, by receiver and reason: pod_limit (the pod's series cap), "
    "mount_stuck (a measurement that hung), mount_unreachable (a mount point that leads elsewhere)."
)

_READ_CHUNK = 65536
# Longest line of cgroup.procs ("4194304\n") and of /proc/<pid>/net/dev (a 15-byte name and 16
# 20-digit counters), with room to spare.
PROCS_MAX_RECORD = 32
NET_DEV_MAX_RECORD = 512


_PAGE = os.sysconf("SC_PAGE_SIZE")


def _open(path: str, dirs: CgroupDirs | None = None) -> int:
    if dirs is not None:
        fd = dirs.open(path, os.O_RDONLY)  # relative to its kept directory (kpod.cgroup.dirs)
        if fd is not None:
            return fd
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise
        return open_long(path, os.O_RDONLY)  # a cgroup nested past PATH_MAX (kpod.cgroup.paths)


def read_text(path: str, max_record: int = 0, dirs: CgroupDirs | None = None) -> str:
    """The whole file as text.  Raises OSError (FileNotFoundError when it vanished).

    Bytes that are not UTF-8 are kept as surrogate escapes (os.fsdecode's convention), so
    paths from mountinfo round-trip to the kernel unchanged and parsers never see a decode error.

    `max_record`: the longest line the file can have, for seq_file files of short lines
    (cgroup.procs, net/dev).  seq_file fills a page-sized buffer record by record and stops
    short of the caller's buffer only when the next record does not fit that page, so a
    first read shorter than a page minus the longest record is the whole file: no EOF read.

    `dirs`: open it relative to a kept descriptor of its directory (kpod.cgroup.dirs).
    """
    fd = _open(path, dirs)
    try:
        data = os.read(fd, _READ_CHUNK)
        if data and not (max_record and len(data) < _PAGE - max_record):
            # Most files fit one read; keep reading until EOF for the few that do not
            # (a large cgroup.procs or mountinfo).
            chunks = [data]
            while chunk := os.read(fd, _READ_CHUNK):
                chunks.append(chunk)
            if len(chunks) > 1:
                data = b"".join(chunks)
    finally:
        os.close(fd)
    return data.decode("utf-8", "surrogateescape")


def read_record(path: str, dirs: CgroupDirs | None = None) -> str:
    """A file the kernel generates as ONE seq_file record: one read() returns all of it.

    For cgroup stat files (io.stat, memory.stat, memory.current, *.pressure, cpu.stat,
    blkio.throttle.*), whose show() callback prints the whole file at once, a read shorter
    than the buffer is the end of the file, which saves the EOF read per file (a quarter of
    the syscalls of a cycle).  Not for multi-record files (cgroup.procs, mountinfo, net/dev):
    seq_file may stop those short of EOF at a page boundary; use read_text.
    """
    fd = _open(path, dirs)
    try:
        data = os.read(fd, _READ_CHUNK)
        if len(data) == _READ_CHUNK:  # larger than any such file: be safe, read on
            chunks = [data]
            while chunk := os.read(fd, _READ_CHUNK):
                chunks.append(chunk)
            data = b"".join(chunks)
    finally:
        os.close(fd)
    return data.decode("utf-8", "surrogateescape")


class CycleReads:
    """Files that several receivers read in one cycle, read once per cycle: a container's
    cgroup.procs, which filesystem and net_iface both need.  A cycle is the pipeline's: it
    calls `new_cycle()` as each one begins, and until it first does (a receiver driven by
    hand, in a test) every read goes to the file.

    An error is remembered like a text, so each receiver still counts its own.  Receivers run
    in threads: two that ask for one path at the same moment may both read it (the same
    text); the dict operations themselves are atomic.
    """

    def __init__(self) -> None:
        self._texts: dict[str, str | OSError] | None = None
        # Every cgroup file is opened from a kept descriptor of its directory; swept per cycle.
        self.dirs = CgroupDirs()
        dirs = self.dirs
        # Single-record stat files stay open and are read again from their start (read_kept).
        self.files = KeptFiles(lambda path: _open(path, dirs))

    def new_cycle(self) -> None:
        self._texts = {}
        self.dirs.new_cycle()
        self.files.new_cycle()

    def read_kept(self, path: str) -> str:
        """A single-record file (see read_record) read through a descriptor kept open across
        cycles (kpod.cgroup.kept): one pread instead of open, read and close.  Raises OSError."""
        return self.files.read(path).decode("utf-8", "surrogateescape")

    def read_kept_bytes(self, path: str) -> bytes:
        """read_kept's bytes, not decoded (for ParseMemo).  Raises OSError."""
        return self.files.read(path)

    def read(self, path: str, record: bool = False, max_record: int = 0) -> str:
        """read_record(path) (`record`) or read_text(path, max_record), this cycle's file, opened
        through its kept directory.  Raises OSError."""
        return read_record(path, self.dirs) if record else read_text(path, max_record, self.dirs)

    def read_text(self, path: str, max_record: int = 0) -> str:
        """read_text(path, max_record), at most once per cycle.  Raises OSError."""
        texts = self._texts
        if texts is None:
            return read_text(path, max_record, self.dirs)
        found = texts.get(path)
        if found is None:
            try:
                found = read_text(path, max_record, self.dirs)
            except OSError as error:
                found = error
            texts[path] = found
        if isinstance(found, OSError):
            raise found.with_traceback(None)
        return found


def v1_path(mounts: CgroupMounts, controller: str, cgroup_path: str) -> str | None:
    """The v1 directory of `controller` for a cgroup2-relative path, on hybrid hosts.

    Container runtimes and systemd create the same relative path in every hierarchy they
    manage (kubepods.slice/... or kubepods/...), so the cgroup2 path is also the v1 path.
    """
    mount = mounts.v1.get(controller)
    if mount is None:
        return None
    return mount if cgroup_path == "/" else mount.rstrip("/") + cgroup_path


# The pod-level cgroup of both kubelet cgroup drivers:
#   systemd:  kubepods-burstable-pod0a1b2c3d_0000_..._000000000001.slice
#   cgroupfs: pod0a1b2c3d-0000-...-000000000004
# (a static pod's cgroup carries the kubelet's 32-hex-digit config hash instead of a uid)
_H = "[0-9a-fA-F]"
_UID = rf"(?:{_H}{{8}}[-_]{_H}{{4}}[-_]{_H}{{4}}[-_]{_H}{{4}}[-_]{_H}{{12}}|{_H}{{32}})"
_POD_DIR = re.compile(r"(^|-)pod" + _UID + r"(\.slice)?$")


@functools.lru_cache(maxsize=16384)
def pod_cgroup_path(cgroup_path: str) -> str | None:
    """The pod cgroup a container cgroup belongs to (its parent, if that is a pod), or None.

    Cached: the answer depends on the path alone, and the same paths come back every cycle.
    """
    parent, _, _ = cgroup_path.rpartition("/")
    name = parent.rpartition("/")[2]
    return parent if parent and _POD_DIR.search(name) else None


T = TypeVar("T")
_UNKNOWN: Any = object()


class ParseMemo(Generic[T]):
    """A parse of a file's text remembered by the file's bytes, for the next cycle.

    Most of a node's cgroups are idle from one cycle to the next: their PSI files print the same
    averages and totals, a cpu.stat without a quota the same zeros, blkio the same "Total 0",
    and idle cgroups print byte for byte the same files as each other.  Such a file is still read
    every cycle and its bytes compared (a dict lookup); only the decoding and parsing of bytes
    already parsed is saved.  `parse` is pure (kpod.cgroup.parsers, and what a receiver makes of
    its result), so its result for those bytes is the one it would return again; callers read it
    and never change it.  A parse that skipped a line is not remembered, so
    kpod.parser.skipped.lines counts every read of a damaged file as before.

    Kept: the results of the bytes seen in the last cycle and in this one (`new_cycle` begins a
    cycle), so it holds at most two cycles' distinct files.  One per receiver and file kind,
    used from that receiver's collect only.
    """

    def __init__(self, parse: Callable[[str], T]) -> None:
        self._parse = parse
        self._last: dict[bytes, T] = {}
        self._seen: dict[bytes, T] = {}

    def new_cycle(self) -> None:
        self._last, self._seen = self._seen, {}

    def __call__(self, data: bytes) -> T:
        found = self._last.get(data, _UNKNOWN)
        if found is _UNKNOWN:
            found = self._seen.get(data, _UNKNOWN)
            if found is _UNKNOWN:
                skipped = skipped_in_this_thread()
                found = self._parse(data.decode("utf-8", "surrogateescape"))
                if skipped_in_this_thread() != skipped:
                    return found
        self._seen[data] = found
        return found


class CgroupFileReceiver(Receiver):
    """A receiver that reads files per cgroup: the error accounting they share.

    A file that cannot be read is skipped and counted in kpod.collection.errors{receiver};
    the rest of the cycle goes on.  Two exceptions are not errors: a file that a live cgroup
    simply does not have (a controller not enabled for that subtree) is a property of the node
    and not counted; a file whose cgroup or process ended after the cycle's index listed it is
    churn, counted apart in kpod.collection.vanished{receiver}.  Counting either as an error
    would bury real errors and fire the collection-errors alert on every busy node (a soak
    with pods living ~1 s gave 2-6 per cycle).
    """

    def __init__(self, context: Context, config: Any) -> None:
        super().__init__(context, config)
        # At 0 from the start, as the errors are (kpod.scheduler): a counter that appears only at
        # its first increment escapes increase(), and the families the agent exports would
        # depend on whether some pod happened to end during a cycle.
        context.self_metrics.inc(VANISHED_READS, VANISHED_READS_HELP, (("receiver", self.id),), 0)

    def _error(self, amount: int = 1) -> None:
        self.context.self_metrics.inc(
            COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, labels=(("receiver", self.id),), amount=amount
        )

    def _vanished(self) -> None:
        self.context.self_metrics.inc(VANISHED_READS, VANISHED_READS_HELP, labels=(("receiver", self.id),))

    def _dropped(self, reason: str, series: int) -> None:
        """Count series not reported (a cap, a mount that hangs...); 0 declares the series."""
        labels = (("receiver", self.id), ("reason", reason))
        self.context.self_metrics.inc(SERIES_DROPPED, SERIES_DROPPED_HELP, labels=labels, amount=series)

    def _read(
        self,
        path: str,
        cgroup_dir: str | None = None,
        record: bool = False,
        max_record: int = 0,
        once_per_cycle: bool = False,
    ) -> str | None:
        """Read a file, or count the failure and return None.

        `cgroup_dir`: the directory that holds the file; when given, a missing file in a
        directory that still exists is "not provided here" and not counted.
        `record`: the file is a single seq_file record (see read_record), read through a
        descriptor kept across cycles (CycleReads.read_kept).
        `once_per_cycle`: other receivers read it too this cycle (CycleReads).
        """
        try:
            reads = self.context.cgroups.reads
            if once_per_cycle:
                return reads.read_text(path, max_record)
            if record:
                return reads.read_kept(path)
            return reads.read(path, False, max_record)
        except OSError as err:
            self._failed(err, path, cgroup_dir)
            return None

    def _read_bytes(self, path: str, cgroup_dir: str) -> bytes | None:
        """A single-record file's bytes through its kept descriptor (for a ParseMemo), or count
        the failure as _read(path, cgroup_dir, record=True) does and return None."""
        try:
            return self.context.cgroups.reads.read_kept_bytes(path)
        except OSError as err:
            self._failed(err, path, cgroup_dir)
            return None

    def _failed(self, err: OSError, path: str, cgroup_dir: str | None = None) -> None:
        """Count a read of `path` that raised `err` (see _read), for receivers that read
        through `reads` themselves."""
        # Vanished when the file's cgroup (or /proc/<pid>) is gone: ENOENT, or ENODEV/ESRCH
        # for one torn down between open and read.  Else a missing file in a cgroup that
        # still exists is "not provided here"; any other failure (EACCES: a process that
        # changed credentials) is an error.  All are per-file, none stops the cycle.
        missing = isinstance(err, FileNotFoundError)
        if not missing:
            self.log.debug("reading %s: %s", path, err)
        if not is_dir(cgroup_dir if cgroup_dir is not None else os.path.dirname(path)):
            self._vanished()
        elif cgroup_dir is None or not missing:
            self._error()

    def _pids(self, ref: CgroupRef) -> list[int] | None:
        """The processes of a cgroup from its cgroup.procs (never a /proc scan)."""
        directory = self.context.cgroups.abspath(ref.path)
        text = self._read(directory + "/cgroup.procs", max_record=PROCS_MAX_RECORD, once_per_cycle=True)
        if text is None:
            return None
        return parse_cgroup_procs(text)


class ControllerFilesReceiver(CgroupFileReceiver):
    """A cgroup-file receiver that reads one controller's files: the cgroup2 ones where the
    controller is enabled on the cgroup2 tree, else (hybrid hosts) the v1 hierarchy's.

    Subclasses set the controller names and the two route descriptions; the route is chosen
    once, at start, and `self._route` is ROUTE_V2 or ROUTE_V1 from then on.
    """

    v2_controller: ClassVar[str]
    v1_controller: ClassVar[str]
    route_v2: ClassVar[str]
    route_v1: ClassVar[str]
    _route: str | None = None

    def _choose_route(self) -> tuple[str | None, str]:
        """(route, reason when there is none)."""
        cgroups = self.context.cgroups
        try:
            controllers = read_text(cgroups.abspath("/") + "/cgroup.controllers").split()
        except OSError:
            controllers = []
        if self.v2_controller in controllers:
            return self.route_v2, ""
        mount = cgroups.mounts.v1.get(self.v1_controller)
        if mount and os.path.isdir(mount):
            return self.route_v1, ""
        return None, f"no {self.v2_controller} controller on cgroup2 and no v1 {self.v1_controller} mount"

    def preflight(self) -> str | None:
        route, reason = self._choose_route()
        return None if route else reason

    def route(self) -> str:
        return self._route or self._choose_route()[0] or ""

    def start(self) -> None:
        route, reason = self._choose_route()
        if route is None:
            raise ComponentUnavailable(reason)
        self._route = route


