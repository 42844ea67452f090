"""Containers' mount tables (/proc/<pid>/mountinfo), read again only when the kernel says so.

An open mountinfo file can be polled: the kernel reports POLLPRI|POLLERR on it once after its
mount namespace's table changed (since the file was opened or last polled; fs/proc_namespace.c,
mounts_poll).  So `MountTables` keeps one open mountinfo per container (of the first live
process of its cgroup), asks the kernel once per collection which of them changed (one poll()
call for all), and reads only those again.  A container's mounts change when a volume is
mounted, not every second; generating a mountinfo costs the kernel a path walk per mount.

An open mountinfo is bound to what its process had when it was opened: its mount namespace
and its root directory (fs/proc_namespace.c, mounts_open_common), and paths are written
relative to that root, mounts outside it left out.  A process may change either later while
keeping its pid: runc's init joins the container's cgroup before it mounts the container's
volumes and pivot_root's into its rootfs (and chroot and unshare(CLONE_NEWNS) do the same).
A table opened before then would go on reading the host's root, where the container's /data
is not "/data" (after pivot_root it is not reachable at all): so each kept table also keeps
the identity of its process's root directory (device, inode) and mount namespace (inode),
taken before it was opened, and is opened again when they differ (two stat calls per kept
container and collection; a process whose root the agent may not stat is read every time).

What keeping a file costs: a file descriptor, and it holds the container's mount namespace
(and the process's root) until the collection after its process left the cgroup, when it is
closed.  At most `limit` files are kept (a share of RLIMIT_NOFILE); containers beyond it, and
every container when `proc_root` is not a procfs (a test's fixture tree: a plain file reports
no change), are read every collection, as without this.

One thread at a time (the receiver that owns it): `begin`, any number of `read`, `end`.
"""

from __future__ import annotations

import os
import select
import weakref
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from kpod.cgroup.keptfds import close_all, default_limit
from kpod.cgroup.parsers import parse_mountinfo

_READ_CHUNK = 65536
_MAX_KEPT = 4096


def on_procfs(path: str) -> bool:
    """Whether `path` lies on a procfs mount (this process's mount table: the longest mount
    point above it)."""
    try:
        target = os.path.realpath(path)
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as handle:
            mounts = parse_mountinfo(handle.read())
    except OSError:
        return False
    best = None
    for mount in mounts:
        point = mount.mount_point
        below = target == point or point == "/" or target.startswith(point.rstrip("/") + "/")
        if below and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best is not None and best.fstype == "proc"


def _read_from_start(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)  # seq_file: generated again from the start
    chunks = []
    while chunk := os.read(fd, _READ_CHUNK):
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", "surrogateescape")  # as kpod.cgroup.files.read_text


def _view(proc_root: str, pid: int) -> tuple[int, int, int]:
    """What a process's mountinfo shows depends on: its root directory (device, inode) and its
    mount namespace (inode).  Raises OSError when the process is gone."""
    root = os.stat(f"{proc_root}/{pid}/root")
    return root.st_dev, root.st_ino, os.stat(f"{proc_root}/{pid}/ns/mnt").st_ino


@dataclass
class _Table:
    pid: int
    fd: int
    text: str
    view: tuple[int, int, int]  # _view of its process, taken before the file was opened


_fd_of = attrgetter("fd")


class MountTables:
    def __init__(self, proc_root: str = "/proc", limit: int | None = None) -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        if limit is None:
            limit = default_limit(_MAX_KEPT) if on_procfs(self.proc_root) else 0
        self.limit = limit
        self._tables: dict[Hashable, _Table] = {}
        # Files still open when the owner is dropped without close() (a receiver a test never
        # shut down) are closed with it.
        weakref.finalize(self, close_all, self._tables, _fd_of)
        self._poll = select.poll()
        self._changed: set[int] = set()
        self._used: set[Hashable] = set()
        self.reads = 0  # mountinfo files generated (opened, or read again after a change)

    @property
    def kept(self) -> int:
        return len(self._tables)

    def begin(self) -> None:
        """A collection begins: which kept tables changed since the last one."""
        self._changed = {fd for fd, _ in self._poll.poll(0)} if self._tables else set()
        self._used = set()

    def read(self, key: Hashable, pids: Sequence[int]) -> tuple[int, str]:
        """(pid, mountinfo text) for the container `key` whose live processes are `pids` (from
        its cgroup.procs this collection): the kept table while its process is among them and
        nothing changed (neither its mounts nor the process's root or mount namespace), else the
        first process's table that can be read.  Raises OSError when none can."""
        self._used.add(key)
        table = self._tables.get(key)
        if table is not None:
            if table.pid in pids and self._same_view(table):
                if table.fd not in self._changed:
                    return table.pid, table.text
                try:
                    table.text = _read_from_start(table.fd)
                    self.reads += 1
                    return table.pid, table.text
                except OSError:
                    pass  # read it again through a process that is there
            self._close(key)
        error: OSError = FileNotFoundError(f"no process of {key!r} to read a mount table from")
        room = len(self._tables) < self.limit
        for pid in pids:
            # Taken before the open: a change in between makes the next read open it again; a
            # file whose view is older than the one recorded is never kept.  A root the agent
            # may not look at (a process holding capabilities it lacks) is read every time.
            view = self._view(pid) if room else None
            try:
                fd = os.open(f"{self.proc_root}/{pid}/mountinfo", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as failure:
                error = failure
                continue
            try:
                text = _read_from_start(fd)
            except OSError as failure:
                os.close(fd)
                error = failure
                continue
            self.reads += 1
            if view is not None:
                self._tables[key] = _Table(pid, fd, text, view)
                self._poll.register(fd, select.POLLPRI)
            else:
                os.close(fd)
            return pid, text
        raise error

    def _view(self, pid: int) -> tuple[int, int, int] | None:
        try:
            return _view(self.proc_root, pid)
        except OSError:
            return None

    def _same_view(self, table: _Table) -> bool:
        return self._view(table.pid) == table.view

    def end(self) -> None:
        """The collection is over: close the tables of containers it did not read."""
        for key in self._tables.keys() - self._used:
            self._close(key)

    def close(self) -> None:
        for key in list(self._tables):
            self._close(key)

    def _close(self, key: Hashable) -> None:
        table = self._tables.pop(key)
        self._poll.unregister(table.fd)
        os.close(table.fd)
