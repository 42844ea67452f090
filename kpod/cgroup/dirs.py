"""Cgroup files opened relative to their directory (openat), not by their full path.

A container's cgroup file sits 6-8 names deep (/sys/fs/cgroup/kubepods.slice/
kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope/cpu.stat),
and opening it by path makes the kernel look up every name again, for each of the cgroup's
files, every cycle.  `CgroupDirs` keeps an O_PATH descriptor per directory the receivers read
in and opens each file with openat: one name to look up.  An O_PATH descriptor is a `struct
file` and nothing else (no seq_file buffer, unlike an open cgroup file), and it does not keep
the cgroup from being removed.  A directory past PATH_MAX is opened through
kpod.cgroup.paths.open_long once, and its files with one openat from then on.

One per cgroup index (its `reads`), shared by every receiver: a directory has one descriptor
however many receivers read in it.  Receivers run in threads and the pipeline sweeps at the
start of each cycle, so a descriptor is looked up, used and closed under one lock: it is never
used after it was closed (its number could by then name another file).

Lifetime: at the start of each cycle (`new_cycle`), the directories no read used during the
last KEEP_CYCLES cycles are closed: a removed cgroup's descriptor goes at most that many cycles
after its last read.  A path made again after its cgroup was removed is a new directory: the
kept descriptor names the old one (whose files are gone), so when a file cannot be found
through it, the directory is opened again by its path and the file looked for there.  At most
`limit` directories are kept (a share of RLIMIT_NOFILE, like kpod.cgroup.mounttables); past it,
files are opened by path as before.
"""

from __future__ import annotations

import os

from kpod.cgroup.keptfds import KeptDescriptors
from kpod.cgroup.paths import open_long

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY


class CgroupDirs(KeptDescriptors):
    def open(self, path: str, flags: int) -> int | None:
        """os.open(path, flags | O_CLOEXEC) through the kept descriptor of its directory, or
        None when no descriptor can be kept for it (the caller opens the path itself, which
        also gives the path's own error).  Raises OSError for a file its directory lacks."""
        directory, _, name = path.rpartition("/")
        if not directory or not name:
            return None
        flags |= os.O_CLOEXEC
        with self._lock:
            fd = self._fds.get(directory)
            if fd is not None:
                self._used[directory] = self._cycle
                try:
                    return os.open(name, flags, dir_fd=fd)
                except FileNotFoundError:
                    self._close(directory)  # gone, or made again under this path: a new directory
            if len(self._fds) >= self.limit:
                return None
            try:
                fd = open_long(directory, _DIR_FLAGS)
            except OSError:
                return None
            self._keep(directory, fd)
            return os.open(name, flags, dir_fd=fd)

    def stat(self, directory: str) -> os.stat_result | None:
        """fstat of the kept descriptor of `directory`, None when none is kept (no descriptor is
        opened for this).  The directory it names may since have been removed (fstat still
        answers for it: the caller's next read finds its files gone) or made again under this
        path (another inode: the caller compares with the id it expects)."""
        with self._lock:
            fd = self._fds.get(directory)
            return os.fstat(fd) if fd is not None else None
