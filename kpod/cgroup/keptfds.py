"""Descriptors kept open across cycles, by path, and swept when unused: what kpod.cgroup.dirs
(directories, for openat) and kpod.cgroup.kept (stat files, for pread) share.

At the start of each cycle (`new_cycle`) the descriptors no read used during the last
KEEP_CYCLES cycles are closed.  At most `limit` are kept (a share of RLIMIT_NOFILE); past it the
caller opens by path as without keeping.  Receivers run in threads and the pipeline sweeps at the
start of each cycle, so subclasses look a descriptor up, use it and close it under `_lock`: it is
never used after it was closed (its number could by then name another file).
"""

from __future__ import annotations

import contextlib
import os
import resource
import threading
import weakref

# A node's cgroups are a few thousand at most (about 1,500 files read at 110 pods, 3,400 at
# 250); past this, by path.
MAX_KEPT = 8192
# Cycles a descriptor stays open without a read (receivers slower than the poll interval read
# every few cycles: they open it again then, as without keeping).
KEEP_CYCLES = 2


def default_limit() -> int:
    """A quarter of the soft RLIMIT_NOFILE, at most MAX_KEPT: kept directories, kept files and
    kept mount tables (kpod.cgroup.mounttables) take up to a quarter each; BPF objects, sockets
    and the files being read need the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_KEPT
    return max(0, min(MAX_KEPT, soft // 4))


class KeptDescriptors:
    def __init__(self, limit: int | None = None) -> None:
        self.limit = default_limit() if limit is None else limit
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._used: dict[str, int] = {}  # path -> the cycle it was last used in
        self._cycle = 0
        # Closed with their owner too (one a test never shut down).
        weakref.finalize(self, _close_all, self._fds)

    @property
    def kept(self) -> int:
        return len(self._fds)

    def new_cycle(self) -> None:
        """A cycle begins: close the descriptors not used in the last KEEP_CYCLES cycles."""
        with self._lock:
            self._cycle += 1
            oldest = self._cycle - KEEP_CYCLES
            for path in [p for p, cycle in self._used.items() if cycle < oldest]:
                self._close(path)

    def close(self) -> None:
        with self._lock:
            _close_all(self._fds)
            self._used.clear()

    def _keep(self, path: str, fd: int) -> None:
        """Keep `fd` for `path`, used this cycle (under _lock)."""
        self._fds[path] = fd
        self._used[path] = self._cycle

    def _close(self, path: str) -> None:
        self._used.pop(path, None)
        fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)


def _close_all(fds: dict[str, int]) -> None:
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()
