"""Descriptors kept open across cycles, by path, and swept when unused: what kpod.cgroup.dirs
(directories, for openat) and kpod.cgroup.kept (stat files, for pread) share.

At the start of each cycle (`new_cycle`) the descriptors no read used during the last
KEEP_CYCLES cycles are closed.  At most `limit` are kept (a share of the soft RLIMIT_NOFILE, which
the agent raises at start: raise_nofile_limit); past it the caller opens by path as without
keeping.  Receivers run in threads and the pipeline sweeps at the start of each cycle, so
subclasses look a descriptor up, use it and close it under `_lock`: it is never used after it was
closed (its number could by then name another file).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import threading
import weakref
from collections.abc import Callable
from typing import TypeVar

# A node's cgroups are a few thousand at most (about 1,500 files read at 110 pods, 3,400 at
# 250); past this, by path.
MAX_KEPT = 8192
# The soft RLIMIT_NOFILE the agent raises itself to (raise_nofile_limit): where every kind of
# kept descriptor reaches its cap (a quarter each, see default_limit), a quarter (8192) left for
# BPF objects, sockets, the statfs worker's pipes and the files being read.  A higher soft limit
# would keep no more.  Nothing in the agent process select()s (FD_SETSIZE is 1024): it polls.
NOFILE_WANTED = 4 * MAX_KEPT
# Cycles a descriptor stays open without a read (receivers slower than the poll interval read
# every few cycles: they open it again then, as without keeping).
KEEP_CYCLES = 2

K = TypeVar("K")
V = TypeVar("V")


def default_limit(cap: int = MAX_KEPT) -> int:
    """A quarter of the soft RLIMIT_NOFILE, at most `cap`: kept directories, kept files and
    kept mount tables (kpod.cgroup.mounttables) take up to a quarter each; BPF objects, sockets
    and the files being read need the rest."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return cap
    return max(0, min(cap, soft // 4))


def raise_nofile_limit(wanted: int = NOFILE_WANTED) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to min(hard, `wanted`), never lower it: (old soft, new soft).

    Container runtimes often start a process with soft 1024 and a far higher hard limit (Go
    programs raise soft to hard themselves; Python does not), which would keep 256 descriptors
    of each kind and read the rest by path every cycle.  Raising the soft limit up to the hard
    one needs no privilege.  Raises OSError when setrlimit is refused (a seccomp filter, an
    LSM); the limit is then unchanged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(hard, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except ValueError as error:  # how Python reports EPERM: "not allowed to raise maximum limit"
            raise OSError(errno.EPERM, "setrlimit refused with EPERM (a seccomp filter or an LSM)") from error
        return soft, target
    return soft, soft


class KeptDescriptors:
    def __init__(self, limit: int | None = None) -> None:
        self.limit = default_limit() if limit is None else limit
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}
        self._used: dict[str, int] = {}  # path -> the cycle it was last used in
        self._cycle = 0
        # Closed with their owner too (one a test never shut down), or at the interpreter's exit,
        # when receiver threads that overran their collection may still be keeping files.
        weakref.finalize(self, close_all_at_exit, self._lock, self._fds)

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
            close_all(self._fds, int)
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


def close_all(kept: dict[K, V], fd_of: Callable[[V], int]) -> None:
    """Close and forget every descriptor of `kept` (fd_of(value) is its number).  One entry at a
    time (popitem is atomic): a thread that keeps another meanwhile, as at the interpreter's exit,
    cannot make this fail, and what it kept is closed too."""
    while kept:
        try:
            _, value = kept.popitem()
        except KeyError:
            return
        with contextlib.suppress(OSError):
            os.close(fd_of(value))


def close_all_at_exit(lock: threading.Lock, fds: dict[K, int]) -> None:
    """The finalizer: under the lock when it can be had within a second (a daemon thread stopped
    while holding it must not hang the exit), else without it."""
    locked = lock.acquire(timeout=1.0)
    try:
        close_all(fds, int)
    finally:
        if locked:
            lock.release()
