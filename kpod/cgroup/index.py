"""Which cgroup an id means, also after it is gone.

`CgroupIndex` walks the cgroup2 tree once per cycle (os.scandir, no /proc scan) and answers
id -> path: a cgroup2 id is the inode number of the cgroup's directory, which is what
`bpf_get_current_cgroup_id()` and `kn->id` return in the kernel.  Where the tree is mounted is
kpod.cgroup.mounts' business.

A walk sees only what exists at that moment; the kernel's counts of a container outlive its
cgroup.  So the index also takes events (`CgroupEventSource`, e.g. the kernel's cgroup_mkdir
and cgroup_rmdir, kpod.kernel.cgroupwatch) before each walk, and keeps every cgroup that is
gone as a tombstone with the path it had, for `gone_retention_s`: a container created and
removed between two walks is known by its path, and the final counts of a removed one are
still exported under its labels.  `ref()` answers for tombstones with `CgroupRef.gone` set;
`known_ids()` includes them; `workloads()` (cgroup files to read) does not.

Nothing under the root is skipped without a word: a directory that vanishes mid-walk is the
normal end of a cgroup, any other failure to list one is counted by reason (its errno) in
`walk_status()`, which the pipeline exports (kpod_cgroups_unreadable{reason}) and shows in
/debug/status.  A chain nested past PATH_MAX is walked (and its files read) through openat from
a parent directory (kpod.cgroup.paths), and counted too (kpod_cgroup_long_paths).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from kpod.cgroup.files import CycleReads
from kpod.cgroup.mounts import KUBEPODS_TOPS, CgroupMounts, parse_mountinfo_cgroups, read_mountinfo
from kpod.cgroup.paths import PATH_LIMIT, open_long
from kpod.model import CgroupRef

log = logging.getLogger("kpod.cgroups")


# What a cgroup is in a Kubernetes tree, by its place (see kinds_of_path); mirrors enum
# kpod_cgroup_kind in bpf/kpod.bpf.h.
KUBEPODS, QOS, POD, CONTAINER, NESTED = "kubepods", "qos", "pod", "container", "nested"
QOS_NAMES = frozenset(("kubepods-burstable.slice", "kubepods-besteffort.slice", "burstable", "besteffort"))


def kind_of_path(path: str) -> str | None:
    """Where a cgroup sits below the kubepods root, from its path alone (relative to the
    cgroup2 root), or None outside it.  The rule the kernel applies at mkdir
    (bpf/cgroups.bpf.c): the kubepods root is a top-level cgroup; its children are QoS
    cgroups (by name) or pods; a QoS cgroup's children are pods; a pod's children are
    containers (the sandbox and CRI-O's conmon among them); anything deeper is nested in its
    container."""
    parts = [part for part in path.split("/") if part]
    if not parts or parts[0] not in KUBEPODS_TOPS:
        return None
    if len(parts) == 1:
        return KUBEPODS
    pod_at = 2 if parts[1] in QOS_NAMES else 1
    if len(parts) == 2 and pod_at == 2:
        return QOS
    depth = len(parts) - pod_at  # 1: the pod, 2: a container, more: nested
    return POD if depth == 1 else CONTAINER if depth == 2 else NESTED


_EXAMPLES = 5  # unreadable cgroups named in walk_status(), at most
_SHOWN = 200  # characters of such a path shown (its end: the deepest names tell most)


@dataclass(frozen=True, slots=True)
class CgroupEntry:
    ref: CgroupRef
    is_leaf: bool


class CgroupEvent(NamedTuple):
    """A cgroup the kernel created ("mkdir") or removed ("rmdir"); `path` relative to the
    cgroup2 root.  Sources may hand plain (kind, id, path) tuples."""

    kind: str
    id: int
    path: str


class CgroupEventSource(Protocol):
    """Something that knows cgroup births and deaths between walks (kpod.kernel.cgroupwatch)."""

    def drain(self) -> list[tuple[str, int, str]]:
        """The events since the last call, oldest first: (kind, id, path)."""
        ...

    def refreshed(self, index: CgroupIndex) -> None:
        """Called after each walk, with the index up to date."""
        ...


@dataclass(frozen=True, slots=True)
class Tombstone:
    ref: CgroupRef  # gone=True
    since: float  # monotonic time it was found gone


class CgroupIndex:
    """An id -> path map of a cgroup2 tree, refreshed by walking it.

    `scope` limits the walk: "kubepods" walks only the pod subtrees (on a node that is all the
    agent reports), "all" walks the whole tree (local mode on any Linux host).
    Thread-safe: receivers collect concurrently.
    """

    # Do not walk again for an unknown id more often than this (an id of a cgroup that is
    # already gone would otherwise trigger a walk per lookup).
    MISS_REFRESH_INTERVAL_S = 1.0
    DEFAULT_GONE_RETENTION_S = 120.0

    def __init__(
        self,
        root: str,
        scope: str = "all",
        mounts: CgroupMounts | None = None,
        ebpf_unattributable: str = "",
        gone_retention_s: float = DEFAULT_GONE_RETENTION_S,
    ) -> None:
        self.root = root.rstrip("/") or "/"
        self.scope = scope
        self.mounts = mounts or CgroupMounts(unified=root)
        # Why eBPF cgroup ids name none of this tree's cgroups ("" when the tree is cgroup2's):
        # kpod.cgroup.mounts.choose_hierarchy.
        self.ebpf_unattributable = ebpf_unattributable
        # How long a gone cgroup stays known (kpod.cgroup.gone_retention; the pipeline raises
        # it to two intervals of its slowest receiver, so every receiver reads it at least once).
        self.gone_retention_s = gone_retention_s
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()  # one walk (and one drain of the sources) at a time
        self._by_id: dict[int, CgroupEntry] = {}
        self._gone: dict[int, Tombstone] = {}
        self._sources: list[CgroupEventSource] = []
        self._walked_at = 0.0
        self._walk_figures: dict[str, Any] = {
            "cgroups": 0, "long_paths": 0, "unreadable": {}, "unreadable_examples": []
        }  # fmt: skip
        self.reads = CycleReads()  # files several receivers read in one cycle
        self._root_level: int | None = None

    def new_cycle(self) -> None:
        self.reads.new_cycle()

    @property
    def root_level(self) -> int:
        """How deep this index's root is in the cgroup2 hierarchy: 0 when it is the mount point
        (a node), more for a sub-tree (tests' private trees).  The kernel's cgroup->level of a
        cgroup is this plus the depth of its path here."""
        if self._root_level is None:
            self._root_level = 0
            unified = parse_mountinfo_cgroups(read_mountinfo()).unified
            mount, root = (unified or "").rstrip("/"), self.root.rstrip("/")
            if mount and root.startswith(mount + "/"):
                self._root_level = len([p for p in root[len(mount) :].split("/") if p])
        return self._root_level

    def level_of(self, cgroup_id: int) -> int | None:
        """The kernel's level of a known cgroup (the cgroup2 root is 0)."""
        ref = self.ref(cgroup_id)
        if ref is None:
            return None
        return self.root_level + len([p for p in ref.path.split("/") if p])

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

    def add_source(self, source: CgroupEventSource) -> None:
        with self._lock:
            self._sources.append(source)

    def remove_source(self, source: CgroupEventSource) -> None:
        with self._lock:
            self._sources = [s for s in self._sources if s is not source]

    def refresh(self) -> None:
        """Take the sources' events, walk the tree, rebuild the map; tombstone what is gone."""
        with self._refresh_lock:
            sources = list(self._sources)
            events = [CgroupEvent(*event) for source in sources for event in source.drain()]
            found = self._walk()
            self._update(found, events)
            for source in sources:
                source.refreshed(self)

    def _update(self, found: dict[int, CgroupEntry], events: list[CgroupEvent]) -> None:
        now = time.monotonic()
        with self._lock:
            gone = dict(self._gone)
            # What the previous walk saw and this one does not, and what was created and
            # removed in between (known only from the events), is gone, with its last path.
            vanished = {i: e.ref.path for i, e in self._by_id.items() if i not in found}
            for event in events:
                if event.id not in found and event.path:
                    vanished.setdefault(event.id, event.path)
            for cgroup_id, path in vanished.items():
                if cgroup_id not in gone:
                    gone[cgroup_id] = Tombstone(CgroupRef(cgroup_id, path, gone=True), now)
            expired = [i for i, t in gone.items() if now - t.since >= self.gone_retention_s]
            for cgroup_id in expired:
                del gone[cgroup_id]
            self._by_id = found
            self._gone = gone
            self._walked_at = now

    def _walk(self) -> dict[int, CgroupEntry]:
        """id -> entry of every cgroup in scope.  Cgroups that vanish mid-walk are skipped; any
        other that cannot be listed is counted by reason (see the module doc)."""
        found: dict[int, CgroupEntry] = {}
        previous = self._by_id
        prefix_len = len(self.root) if self.root != "/" else 0
        # (directory, its inode): a child's inode is its directory entry's d_ino, which kernfs
        # reports as the inode number (the cgroup id), so only the walk's roots need a stat.
        stack: list[tuple[str, int]] = []
        for top in self._walk_roots():
            try:
                stack.append((top, os.stat(top).st_ino))
            except OSError:
                continue
        unreadable: Counter[str] = Counter()
        examples: list[str] = []
        long_paths = 0
        while stack:
            directory, inode = stack.pop()
            try:
                if len(directory) < PATH_LIMIT:
                    children = [(e.path, e.inode()) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
                else:
                    long_paths += 1
                    children = _list_long(directory)
            except FileNotFoundError:
                continue  # removed while we walked
            except OSError as error:
                unreadable[errno.errorcode.get(error.errno or 0, "unknown")] += 1
                if len(examples) < _EXAMPLES:
                    examples.append(_shown(directory[prefix_len:]))
                continue
            relative = directory[prefix_len:] or "/"
            leaf = not children
            entry = previous.get(inode)
            if entry is None or entry.is_leaf != leaf or entry.ref.path != relative:
                entry = CgroupEntry(CgroupRef(inode, relative), is_leaf=leaf)
            found[inode] = entry  # the same objects as last walk while nothing changed
            stack.extend(children)
        if unreadable and unreadable != Counter(self._walk_figures["unreadable"]):
            log.warning("cgroups the walk cannot list (their subtrees are not reported): %s; e.g. %s",
                        dict(unreadable), examples[0])  # fmt: skip
        with self._lock:
            self._walk_figures = {"cgroups": len(found), "long_paths": long_paths, "unreadable": dict(unreadable),
                                  "unreadable_examples": examples}  # fmt: skip
        return found

    def walk_status(self) -> dict[str, Any]:
        """The last walk: cgroups found, how many had paths past PATH_MAX (read through openat),
        how many could not be listed by reason (errno name), and a few of those."""
        with self._lock:
            return dict(self._walk_figures)

    def path_of(self, cgroup_id: int) -> str | None:
        """The path of a cgroup id (also of a gone one), walking again (rate-limited) when the
        id is unknown."""
        ref = self.ref(cgroup_id)
        return ref.path if ref is not None else None

    def ref(self, cgroup_id: int) -> CgroupRef | None:
        """The cgroup, live or gone (`gone` set), or None if the index does not know the id."""
        entry = self._by_id.get(cgroup_id)
        if entry is not None:
            return entry.ref
        tombstone = self._gone.get(cgroup_id)
        if tombstone is not None:
            return tombstone.ref
        if time.monotonic() - self._walked_at >= self.MISS_REFRESH_INTERVAL_S:
            self.refresh()
            entry = self._by_id.get(cgroup_id)
            if entry is not None:
                return entry.ref
            tombstone = self._gone.get(cgroup_id)
            return tombstone.ref if tombstone is not None else None
        return None

    def known_ids(self) -> set[int]:
        """Live and gone (still retained) cgroups."""
        return set(self._by_id) | set(self._gone)

    def live_ids(self) -> set[int]:
        return set(self._by_id)

    def gone(self) -> list[CgroupRef]:
        """The retained tombstones."""
        return [t.ref for t in self._gone.values()]

    def kinds(self) -> dict[int, str]:
        """Live cgroups of the Kubernetes tree by kind (kind_of_path), nested ones left out."""
        out: dict[int, str] = {}
        for cgroup_id, entry in self._by_id.items():
            kind = kind_of_path(entry.ref.path)
            if kind is not None and kind != NESTED:
                out[cgroup_id] = kind
        return out

    def charge_targets(self) -> list[CgroupRef]:
        """The live cgroups kernel counters are charged to: containers in a Kubernetes tree
        ("kubepods" scope: the kernel folds nested cgroups into their container), every leaf
        otherwise (local mode counts every cgroup as itself)."""
        if self.scope == "all":
            return self.workloads()
        return [e.ref for e in self._by_id.values() if kind_of_path(e.ref.path) == CONTAINER]

    def workloads(self) -> list[CgroupRef]:
        """The cgroups whose files the cgroup receivers read: the leaves of the tree.

        Leaves, because cgroup2 counters are hierarchical: reporting a pod's cgroup and its
        containers' would count everything twice in any sum.  The root counts only when it is a
        leaf itself (a host with no cgroups below the root: its processes are the workload).
        """
        return [e.ref for e in self._by_id.values() if e.is_leaf]


def _list_long(directory: str) -> list[tuple[str, int]]:
    """(path, inode) of the child directories of a cgroup whose path is past PATH_MAX."""
    fd = open_long(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with os.scandir(fd) as entries:
            return [(f"{directory}/{e.name}", e.inode()) for e in entries if e.is_dir(follow_symlinks=False)]
    finally:
        os.close(fd)


def _shown(path: str) -> str:
    return path if len(path) <= _SHOWN else "..." + path[-_SHOWN:]
