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

import os
from collections.abc import Callable, Iterable

from kpod.cgroup.keptfds import KeptDescriptors
from kpod.cgroup.parsers import parse_mountinfo

# Larger than any cgroup stat file; one that fills it is read on until its end.
_CHUNK = 65536


def cgroupfs_devices(mountinfo: str = "/proc/self/mountinfo") -> frozenset[int]:
    """The device numbers (st_dev) of this mount namespace's cgroup and cgroup2 mounts."""
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as handle:
            mounts = parse_mountinfo(handle.read())
    except OSError:
        return frozenset()
    return frozenset(os.makedev(*m.dev) for m in mounts if m.fstype in ("cgroup", "cgroup2"))


class KeptFiles(KeptDescriptors):
    def __init__(
        self, open_file: Callable[[str], int], limit: int | None = None, devices: Iterable[int] | None = None
    ) -> None:
        """`open_file(path)`: a new read-only descriptor of `path` (raises OSError).
        `devices`: the st_dev of files that may be kept (default: cgroupfs_devices(), at first use)."""
        super().__init__(limit)
        self._open_file = open_file
        self._devices = None if devices is None else frozenset(devices)

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
                    return data if len(data) < _CHUNK else read_on(fd, data)
            fd = self._open_file(path)
            try:
                data = os.pread(fd, _CHUNK, 0)
                if len(data) == _CHUNK:
                    data = read_on(fd, data)
                keep = len(self._fds) < self.limit and self._keepable(fd)
            except BaseException:
                os.close(fd)
                raise
            if keep:
                self._keep(path, fd)
            else:
                os.close(fd)
            return data

    def _keepable(self, fd: int) -> bool:
        if self._devices is None:
            self._devices = cgroupfs_devices()
        return os.fstat(fd).st_dev in self._devices


def read_on(fd: int, data: bytes) -> bytes:
    """`data` (read at offset 0) and the rest of the file after it, by pread to its end."""
    chunks = [data]
    offset = len(data)
    while chunk := os.pread(fd, _CHUNK, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)
