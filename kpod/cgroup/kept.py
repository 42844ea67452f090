"""Cgroup stat files kept open and read again from their start each cycle, not opened again.

Opening a kernfs file is most of what reading a small cgroup file costs the kernel: the open
allocates the file, its seq_file and kernfs's per-open state, and the close frees them again,
while the read itself prints a few lines.  Measured on this project's 110-pod bench node
(Linux 6.18, 1,155 files of cgroup_cpu, cgroup_memory and pressure): openat + read + close
14.7 ms of CPU per pass, pread on kept descriptors 5.3 ms.

Only files of a cgroup filesystem are kept (their device is a cgroup or cgroup2 mount's, from
/proc/self/mountinfo): on kernfs a removed file fails its reads, while a plain file (a test's
fixture tree) would still be read through its descriptor after its directory was removed.

A cgroup stat file (cpu.stat, memory.stat, memory.current, *.pressure, io.stat, cpuacct.usage,
blkio.throttle.*) is one seq_file record: its show() prints the whole file at once, and a read
at offset 0 makes seq_file start over (fs/seq_file.c: a read at a position other than where the
last one ended traverses from the first record, and since 4.x a read at 0 resets the iterator
outright; kernfs, which serves cgroup and cgroup v1 files, passes pread to seq_file as it is),
so one `pread(fd, n, 0)` per cycle returns what open/read/close did, printed afresh.  Not for
multi-record files (cgroup.procs, mountinfo): kpod.cgroup.files.read_text.

Lifetime, as kpod.cgroup.dirs: at the start of each cycle (`new_cycle`) the files no read used
in the last KEEP_CYCLES cycles are closed.  A file whose cgroup was removed fails its read
(ENODEV: kernfs deactivated it); that descriptor is closed at once and the path opened again,
which gives the caller the path's own answer: FileNotFoundError when the cgroup is gone, the
new cgroup's file when one was made again under the path.  At most `limit` files are kept (a
share of RLIMIT_NOFILE, like kpod.cgroup.dirs); past it, a file is opened, read and closed as
without this module.

What keeping costs: a descriptor per file, and the seq_file's page-sized buffer the kernel
allocates at the first read and frees at close (about 4.4 KiB per file measured from
/proc/meminfo's Slab, charged to the agent's memory cgroup: about 6 MiB at 110 pods).

Receivers run in threads and the pipeline sweeps at the start of each cycle, so a descriptor
is looked up, read and closed under one lock: it is never read after it was closed (its number
could by then name another file).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import weakref
from collections.abc import Callable, Iterable

from kpod.cgroup.parsers import parse_mountinfo

# Files the cycle reads are about 1,500 at 110 pods and 3,400 at 250; past this, by path.
MAX_KEPT = 8192
KEEP_CYCLES = 2
# Larger than any cgroup stat file; one that fills it is read on until its end.
_CHUNK = 65536


def default_limit() -> int:
    """A quarter of the soft RLIMIT_NOFILE (kpod.cgroup.dirs and kpod.cgroup.mounttables keep
    up to a quarter each; BPF objects and sockets need the rest), at most MAX_KEPT."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_KEPT
    return max(0, min(MAX_KEPT, soft // 4))


def cgroupfs_devices(mountinfo: str = "/proc/self/mountinfo") -> frozenset[int]:
    """The device numbers (st_dev) of this mount namespace's cgroup and cgroup2 mounts."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            mounts = parse_mountinfo(handle.read())
    except OSError:
        return frozenset()
    return frozenset(os.makedev(*m.dev) for m in mounts if m.fstype in ("cgroup", "cgroup2"))


class KeptFiles:
    def __init__(
        self, open_file: Callable[[str], int], limit: int | None = None, devices: Iterable[int] | None = None
    ) -> None:
        """`open_file(path)`: a new read-only descriptor of `path` (raises OSError).
        `devices`: the st_dev of files that may be kept (default: cgroupfs_devices(), at first use)."""
        self.limit = default_limit() if limit is None else limit
        self._open_file = open_file
        self._devices = None if devices is None else frozenset(devices)
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._used: dict[str, int] = {}  # path -> the cycle it was last read in
        self._cycle = 0
        weakref.finalize(self, _close_all, self._fds)

    @property
    def kept(self) -> int:
        return len(self._fds)

    def read(self, path: str) -> bytes:
        """The whole file, generated afresh.  Raises OSError as opening and reading it would."""
        with self._lock:
            fd = self._fds.get(path)
            if fd is not None:
                try:
                    data = os.pread(fd, _CHUNK, 0)
                except OSError:
                    self._close(path)  # its cgroup was removed: the path's own answer, below
                else:
                    self._used[path] = self._cycle
                    return data if len(data) < _CHUNK else _read_on(fd, data)
            fd = self._open_file(path)
            try:
                data = os.pread(fd, _CHUNK, 0)
                if len(data) == _CHUNK:
                    data = _read_on(fd, data)
                keep = len(self._fds) < self.limit and self._keepable(fd)
            except BaseException:
                os.close(fd)
                raise
            if keep:
                self._fds[path] = fd
                self._used[path] = self._cycle
            else:
                os.close(fd)
            return data

    def _keepable(self, fd: int) -> bool:
        if self._devices is None:
            self._devices = cgroupfs_devices()
        return os.fstat(fd).st_dev in self._devices

    def new_cycle(self) -> None:
        """A cycle begins: close the files not read in the last KEEP_CYCLES cycles."""
        with self._lock:
            self._cycle += 1
            oldest = self._cycle - KEEP_CYCLES
            for path in [p for p, cycle in self._used.items() if cycle < oldest]:
                self._close(path)

    def close(self) -> None:
        with self._lock:
            _close_all(self._fds)
            self._used.clear()

    def _close(self, path: str) -> None:
        self._used.pop(path, None)
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)


def _read_on(fd: int, data: bytes) -> bytes:
    chunks = [data]
    offset = len(data)
    while chunk := os.pread(fd, _CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
