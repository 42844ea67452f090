"""Pods' interface tables (/proc/<pid>/net/dev), kept open per network namespace.

Opening /proc/<pid>/net/dev is most of what reading it costs the kernel: the lookup of the
process's namespace, a seq_file and its buffer, freed again at close (measured on this host with
40 processes each in a namespace of its own: 14 us of CPU per openat through a kept
/proc/<pid>/net + read + close, 3 us per pread of a kept file).
An open net/dev belongs to the network namespace its process was in when it was opened (it
holds a reference to it: fs/proc/proc_net.c, seq_open_net), and a read at offset 0 prints that
namespace's table afresh (fs/seq_file.c).  So `NetDevFiles` keeps one open per namespace,
keyed by the namespace's inode: the caller names the namespace its process is in now (the
readlink of <proc_root>/<pid>/ns/net, done each collection as before), and a kept file of that
namespace reads what opening <proc_root>/<pid>/net/dev now would.  An inode names one
namespace while the namespace lives, and the kept file keeps it alive.

A file is opened for a namespace when none is kept, and kept only when the process is still in
that namespace after the open (a second readlink): a process that moved between the caller's
readlink and the open would otherwise leave another namespace's file under this one's inode.

What keeping a file costs: a descriptor and a page-sized seq_file buffer, and it keeps the
namespace (its loopback device, nothing the pod's CNI removes itself) until the collection after
no process of a pod was found in it, when it is closed.  At most `limit` files are kept (a share
of RLIMIT_NOFILE); past it, and every file when `proc_root` is not a procfs (a test's fixture
tree), a file is opened, read and closed each collection as without this.

One collection at a time (the receiver that owns it): `begin`, any number of `read`, `end`.
A descriptor is looked up, read and closed under `_lock`, as in kpod.cgroup.keptfds: `close` at
shutdown may run while a collection the pipeline abandoned still reads, and a number closed
under it could by then name another file.
"""

from __future__ import annotations

import os
import threading
import weakref

from kpod.cgroup.kept import read_on
from kpod.cgroup.keptfds import close_all, close_all_at_exit, default_limit
from kpod.cgroup.mounttables import on_procfs

_CHUNK = 65536
_PAGE = os.sysconf("SC_PAGE_SIZE")


def read_from_start(fd: int, max_record: int) -> str:
    """The whole file through `fd`, printed afresh from its start (pread at 0, then on from
    where the last read ended).  A first read shorter than a page less the longest record is
    the whole file (seq_file fills a page record by record), as kpod.cgroup.files.read_text."""
    data = os.pread(fd, _CHUNK, 0)
    if data and len(data) >= _PAGE - max_record:
        data = read_on(fd, data)
    return data.decode("utf-8", "surrogateescape")


def netns_inode(link: str) -> int:
    """The inode of the network namespace a /proc/<pid>/ns/net link names ("net:[4026531840]"):
    its readlink, half the cost of a stat through it (once per pod and cycle).  Raises OSError."""
    target = os.readlink(link)
    if target.startswith("net:[") and target.endswith("]") and target[5:-1].isdigit():
        return int(target[5:-1])
    return os.stat(link).st_ino


class NetDevFiles:
    def __init__(self, proc_root: str = "/proc", max_record: int = 512, limit: int | None = None) -> None:
        self.proc_root = proc_root.rstrip("/") or "/"
        self.max_record = max_record
        if limit is None:
            # A sixteenth of the soft RLIMIT_NOFILE (kpod.cgroup.keptfds gives a quarter each to
            # directories, stat files and mount tables): one per pod, a few hundred on a node.
            limit = default_limit() // 4 if on_procfs(self.proc_root) else 0
        self.limit = limit
        self._lock = threading.Lock()
        self._fds: dict[int, int] = {}  # namespace inode -> descriptor
        weakref.finalize(self, close_all_at_exit, self._lock, self._fds)
        self._used: set[int] = set()
        self.opened = 0  # files opened (kept or not) since start

    @property
    def kept(self) -> int:
        return len(self._fds)

    def begin(self) -> None:
        self._used = set()

    def read(self, netns: int, pid: int) -> str:
        """The net/dev of the namespace `netns`, which process `pid` is in (the caller's readlink
        of its ns/net this collection).  Raises OSError as opening and reading
        <proc_root>/<pid>/net/dev would."""
        self._used.add(netns)
        with self._lock:
            fd = self._fds.get(netns)
            if fd is not None:
                try:
                    return read_from_start(fd, self.max_record)
                except OSError:
                    self._close(netns)  # read it through the process, below
        fd = os.open(f"{self.proc_root}/{pid}/net/dev", os.O_RDONLY | os.O_CLOEXEC)
        self.opened += 1
        try:
            text = read_from_start(fd, self.max_record)
            if len(self._fds) < self.limit and self._still_in(pid, netns):
                with self._lock:
                    if netns not in self._fds:
                        self._fds[netns] = fd
                        fd = -1
        finally:
            if fd >= 0:
                os.close(fd)
        return text

    def _still_in(self, pid: int, netns: int) -> bool:
        """Whether process `pid` is (still) in the namespace `netns`."""
        try:
            return netns_inode(f"{self.proc_root}/{pid}/ns/net") == netns
        except OSError:
            return False  # gone since: the text read is this collection's, the file not kept

    def end(self) -> None:
        """The collection is over: close the files of namespaces it did not read (their pods
        are gone, or moved to the host's namespace)."""
        with self._lock:
            for netns in self._fds.keys() - self._used:
                self._close(netns)

    def close(self) -> None:
        with self._lock:
            close_all(self._fds, int)

    def _close(self, netns: int) -> None:
        """Close the kept file of `netns` (under _lock)."""
        fd = self._fds.pop(netns, None)
        if fd is not None:
            os.close(fd)
