"""Which cgroup an id means.

`CgroupIndex` walks the cgroup2 tree once per cycle (os.scandir, no /proc scan) and answers
id -> path: a cgroup2 id is the inode number of the cgroup's directory, which is what
`bpf_get_current_cgroup_id()` and `kn->id` return in the kernel.  Where the tree is mounted is
kpod.cgroup.mounts' business.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from kpod.cgroup.files import CycleReads
from kpod.cgroup.mounts import KUBEPODS_TOPS, CgroupMounts
from kpod.model import CgroupRef

log = logging.getLogger("kpod.cgroups")


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    ref: CgroupRef
    is_leaf: bool


class CgroupIndex:
    """An id -> path map of a cgroup2 tree, refreshed by walking it.

    `scope` limits the walk: "kubepods" walks only the pod subtrees (on a node that is all the
    agent reports), "all" walks the whole tree (local mode on any Linux host).
    Thread-safe: receivers collect concurrently.
    """

    # Do not walk again for an unknown id more often than this (an id of a cgroup that is
    # already gone would otherwise trigger a walk per lookup).
    MISS_REFRESH_INTERVAL_S = 1.0

    def __init__(self, root: str, scope: str = "all", mounts: CgroupMounts | None = None,
                 ebpf_unattributable: str = "") -> None:  # fmt: skip
        self.root = root.rstrip("/") or "/"
        self.scope = scope
        self.mounts = mounts or CgroupMounts(unified=root)
        # Why eBPF cgroup ids name none of this tree's cgroups ("" when the tree is cgroup2's):
        # kpod.cgroup.mounts.choose_hierarchy.
        self.ebpf_unattributable = ebpf_unattributable
        self._lock = threading.Lock()
        self._by_id: dict[int, CgroupEntry] = {}
        self._walked_at = 0.0
        self.reads = CycleReads()  # files several receivers read in one cycle

    def new_cycle(self) -> None:
        self.reads.new_cycle()

    def abspath(self, path: str) -> str:
        return self.root if path == "/" else self.root + path

    def _walk_roots(self) -> Iterable[str]:
        if self.scope == "all":
            yield self.root
            return
        for top in KUBEPODS_TOPS:
            candidate = os.path.join(self.root, top)
            if os.path.isdir(candidate):
                yield candidate

    def refresh(self) -> None:
        """Walk the tree and rebuild the map.  Cgroups that vanish mid-walk are skipped."""
        found: dict[int, CgroupEntry] = {}
        prefix_len = len(self.root) if self.root != "/" else 0
        stack = list(self._walk_roots())
        while stack:
            directory = stack.pop()
            try:
                inode = os.stat(directory).st_ino
                children = [e.path for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue  # removed while we walked
            relative = directory[prefix_len:] or "/"
            found[inode] = CgroupEntry(CgroupRef(inode, relative), is_leaf=not children)
            stack.extend(children)
        with self._lock:
            self._by_id = found
            self._walked_at = time.monotonic()

    def path_of(self, cgroup_id: int) -> str | None:
        """The path of a cgroup id, walking again (rate-limited) when the id is unknown."""
        entry = self._by_id.get(cgroup_id)
        if entry is None and time.monotonic() - self._walked_at >= self.MISS_REFRESH_INTERVAL_S:
            self.refresh()
            entry = self._by_id.get(cgroup_id)
        return entry.ref.path if entry else None

    def ref(self, cgroup_id: int) -> CgroupRef | None:
        path = self.path_of(cgroup_id)
        return CgroupRef(cgroup_id, path) if path is not None else None

    def known_ids(self) -> set[int]:
        return set(self._by_id)

    def workloads(self) -> list[CgroupRef]:
        """The cgroups whose files the cgroup receivers read: the leaves of the tree.

        Leaves, because cgroup2 counters are hierarchical: reporting a pod's cgroup and its
        containers' would count everything twice in any sum.  The root counts only when it is a
        leaf itself (a host with no cgroups below the root: its processes are the workload).
        """
        return [e.ref for e in self._by_id.values() if e.is_leaf]
