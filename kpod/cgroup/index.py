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

Walking costs a scandir per cgroup every cycle (most of it kernel time), though cgroups change
rarely.  So once a source says it reports every change (`CgroupEventSource.missed`, the
kernel's events through kpod.kernel.cgroupwatch), the index follows its events instead of
walking: a mkdir adds the cgroup (its path checked with one stat), an rmdir removes it.
Cgroups below a container have no events in Kubernetes modes (the kernel charges them to their
container), so each container is stat'ed per cycle and walked only when it has subdirectories
(kernfs counts them in st_nlink) or is not listable by all.  The stat is an fstat of the
receivers' kept descriptor of its directory (kpod.cgroup.dirs: no path lookup) when that names
the expected inode, else of its path; a container removed after the events were taken is then
noticed in the next refresh's events, as one removed a moment after its stat always was.  It
walks the whole tree again on any doubt: the first refresh after a source was added, events the
source lost (its ring buffer was full, or the kernel missed a pod-level cgroup), an event it
cannot place (a path outside the tree, a parent it does not know, a path naming another
directory: cgroup namespaces, truncated paths), no kubepods root yet, a miss in `ref()`
(rate-limited), and every FULL_WALK_INTERVAL_S anyway; what such a periodic walk finds
different from the events is counted (`walk_status()["drift"]`).

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
from dataclasses import dataclass, field
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
_LISTABLE = 0o555  # a directory's mode bits that let anyone list it (a chmod is no event)
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

    # Optional (a source without it is not followed, the index walks every refresh):
    # def missed(self) -> bool: whether a change may have gone unreported since the last call
    #     (called right after each drain); a source that has it reports every mkdir and rmdir
    #     of the cgroup2 hierarchy, paths relative to its root, except below containers when
    #     its attribute `reports_nested` is False.

    def refreshed(self, index: CgroupIndex) -> None:
        """Called after each walk, with the index up to date."""
        ...


@dataclass
class _Walked:
    """What one walk found: id -> entry, paths past PATH_MAX, unlistable directories by errno
    name and a few of them, the same for the part above containers (Kubernetes modes)."""

    found: dict[int, CgroupEntry] = field(default_factory=dict)
    long_paths: int = 0
    unreadable: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    top_long_paths: int = 0
    top_unreadable: Counter[str] = field(default_factory=Counter)
    top_examples: list[str] = field(default_factory=list)


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
    # Following events, walk the whole tree anyway this often: the safety net for a change no
    # event told (a bug, a kernel that drops one), and when listing rights change (no event).
    FULL_WALK_INTERVAL_S = 60.0

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
        self._event_prefix: str | None = None  # the root's path in the kernel's event paths
        self._followed: tuple[int, ...] = ()  # the sources the last walk was taken with
        self._full_walk_at = 0.0
        self._walks: Counter[str] = Counter()  # full walks by reason
        self._followed_refreshes = 0  # refreshes that followed events instead of walking
        self._drift = 0  # cgroups a periodic walk found different from what events said
        self._top_figures: dict[str, Any] = {"long_paths": 0, "unreadable": Counter(), "examples": []}
        self._containers: list[tuple[int, str]] | None = None  # (id, path) of live containers
        self._has_nested = False  # whether live cgroups below containers are known
        # Bumped whenever the live or gone sets change: kpod.kernel.cgroupwatch syncs its map
        # only then.
        self.generation = 0

    def new_cycle(self) -> None:
        self.reads.new_cycle()

    @property
    def root_level(self) -> int:
        """How deep this index's root is in the cgroup2 hierarchy: 0 when it is the mount point
        (a node), more for a sub-tree (tests' private trees).  The kernel's cgroup->level of a
        cgroup is this plus the depth of its path here."""
        if self._root_level is None:
            self._place_root()
        assert self._root_level is not None
        return self._root_level

    def _place_root(self) -> None:
        """Where the root sits in the cgroup2 hierarchy (as the kernel's paths name it, the
        cgroup2 mount taken as the hierarchy's root): its level, and the prefix of the events'
        paths below it (None: the root is not on the cgroup2 mount, events are not followed)."""
        self._root_level = 0
        unified = parse_mountinfo_cgroups(read_mountinfo()).unified
        mount, root = (unified or "").rstrip("/"), self.root.rstrip("/")
        if mount and root.startswith(mount + "/"):
            self._root_level = len([p for p in root[len(mount) :].split("/") if p])
            self._event_prefix = root[len(mount) :]
        elif unified and os.path.realpath(root or "/") == os.path.realpath(unified):
            self._event_prefix = ""

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

    def refresh(self, walk: bool = False) -> None:
        """Take the sources' events; follow them, or (`walk`, or on doubt, see the module doc)
        walk the tree and rebuild the map; tombstone what is gone."""
        with self._refresh_lock:
            sources = list(self._sources)
            events = [CgroupEvent(*event) for source in sources for event in source.drain()]
            reason = "asked" if walk else self._walk_reason(sources)
            found = None
            if reason is None:
                nested = all(getattr(source, "reports_nested", True) for source in sources)
                found = self._follow(events, check_containers=not nested)
                if found is None:
                    reason = "doubt"
                else:
                    self._followed_refreshes += 1
            if found is None:
                # What the events say, to count what the walk finds otherwise (a cgroup made
                # between the drain and the walk counts too: rare, and never less).
                expected = self._follow(events, check_containers=False) if reason == "periodic" else None
                found = self._walk()
                if expected is not None:
                    self._drift += _differences(expected, found, self.scope != "all")
                self._walks[reason or "asked"] += 1
                self._full_walk_at = time.monotonic()
                self._followed = tuple(id(source) for source in sources)
            self._update(found, events)
            for source in sources:
                source.refreshed(self)

    def _walk_reason(self, sources: list[CgroupEventSource]) -> str | None:
        """Why this refresh must walk the whole tree, or None when it can follow events."""
        if not sources or not all(hasattr(source, "missed") for source in sources):
            return "no events"
        # Each source is asked (its count of losses moves on), not only the first that missed.
        missed = [source.missed() for source in sources]  # type: ignore[attr-defined]
        if self._root_level is None:
            self._place_root()
        if self._event_prefix is None:
            return "no events"
        if tuple(id(source) for source in sources) != self._followed:
            return "new source"
        if any(missed):
            return "events missed"
        if time.monotonic() - self._full_walk_at >= self.FULL_WALK_INTERVAL_S:
            return "periodic"
        if self.scope != "all" and not any(e.ref.path.count("/") == 1 for e in self._by_id.values()):
            return "no kubepods root"  # its mkdir is an event only at level 1 (bpf/cgroups.bpf.c)
        return None

    def _index_path(self, kernel_path: str) -> str | None:
        """An event's path (relative to the cgroup2 root) relative to this index's root, or
        None when it is outside."""
        prefix = self._event_prefix
        if prefix is None:
            return None
        if not prefix:
            return kernel_path or "/"
        if kernel_path == prefix:
            return "/"
        if kernel_path.startswith(prefix + "/"):
            return kernel_path[len(prefix) :]
        return None

    def _follow(self, events: list[CgroupEvent], check_containers: bool) -> dict[int, CgroupEntry] | None:
        """The map after `events` (and, `check_containers`, after looking into containers for
        nested cgroups); None when something does not add up (the caller walks)."""
        found = self._by_id
        if events:
            found = self._apply(events)
            if found is None:
                return None
        if check_containers:
            return self._check_containers(found)
        if found is not self._by_id:
            with self._lock:
                self._walk_figures = {**self._walk_figures, "cgroups": len(found)}
        return found

    def _apply(self, events: list[CgroupEvent]) -> dict[int, CgroupEntry] | None:
        found = dict(self._by_id)
        by_path = {entry.ref.path: cgroup_id for cgroup_id, entry in found.items()}
        removed = {event.id for event in events if event.kind == "rmdir"}
        emptied: set[str] = set()
        for event in events:
            path = self._index_path(event.path)
            if path is None or path == "/":
                if self.scope == "all" and path is None:
                    continue  # a cgroup outside this index's tree
                return None
            if event.kind == "mkdir":
                if event.id in found or event.id in self._gone:
                    continue  # a walk saw it already
                if self.scope != "all" and kind_of_path(path) is None:
                    return None
                parent = path.rpartition("/")[0] or "/"
                parent_id = by_path.get(parent)
                if parent_id is None and not (self.scope != "all" and kind_of_path(path) == KUBEPODS):
                    return None
                if not self._is_there(path, event.id, event.id in removed):
                    return None
                found[event.id] = CgroupEntry(CgroupRef(event.id, path), is_leaf=True)
                by_path[path] = event.id
                if parent_id is not None:
                    parent_entry = found[parent_id]
                    if parent_entry.is_leaf:
                        found[parent_id] = CgroupEntry(parent_entry.ref, is_leaf=False)
            elif event.kind == "rmdir":
                entry = found.pop(event.id, None)
                if entry is None:
                    continue  # born and gone between two refreshes: _update tombstones it
                gone_path = entry.ref.path
                by_path.pop(gone_path, None)
                below = gone_path.rstrip("/") + "/"
                for cgroup_id in [i for i, e in found.items() if e.ref.path.startswith(below)]:
                    by_path.pop(found.pop(cgroup_id).ref.path, None)  # nested ones had no event
                emptied.add(gone_path.rpartition("/")[0] or "/")
        if emptied:
            parents = {path.rpartition("/")[0] or "/" for path in by_path}
            for path in emptied - parents:
                cgroup_id = by_path.get(path)
                if cgroup_id is not None and not found[cgroup_id].is_leaf:
                    found[cgroup_id] = CgroupEntry(found[cgroup_id].ref, is_leaf=True)
        return found

    def _is_there(self, path: str, cgroup_id: int, removed_since: bool) -> bool:
        """Whether `path` names the directory `cgroup_id` (or nothing, when its rmdir came
        too), listable as a walk would list it."""
        try:
            st = os.stat(self.abspath(path))
        except FileNotFoundError:
            return removed_since
        except OSError:
            return False  # past PATH_MAX, or not ours to look at: the walk knows what to do
        return st.st_ino == cgroup_id and st.st_mode & _LISTABLE == _LISTABLE

    def _check_containers(self, found: dict[int, CgroupEntry]) -> dict[int, CgroupEntry] | None:
        """Containers' nested cgroups (no events in Kubernetes modes): a container is walked
        when kernfs counts subdirectories in it (st_nlink > 2), it had nested cgroups, or it
        is not listable by all (the walk would then not list it either)."""
        if self._containers is None or found is not self._by_id:
            self._containers = [(i, e.ref.path) for i, e in found.items() if kind_of_path(e.ref.path) == CONTAINER]
        nested = [i for i, e in found.items() if kind_of_path(e.ref.path) == NESTED] if self._has_nested else []
        tops: list[tuple[str, int]] = []
        kept = self.reads.dirs.stat
        for cgroup_id, path in self._containers:
            try:
                # The receivers' kept descriptor of the directory first (no path lookup); one
                # that names another inode (the path was made again since) is not it.
                st = kept(self.abspath(path))
                if st is None or st.st_ino != cgroup_id:
                    st = os.stat(self.abspath(path))
            except FileNotFoundError:
                return None  # removed: its rmdir is on its way; the walk says it now (by path only)
            except OSError:
                tops.append((self.abspath(path), cgroup_id))
                continue
            if st.st_ino != cgroup_id:
                return None
            if st.st_nlink > 2 or st.st_mode & _LISTABLE != _LISTABLE:
                tops.append((self.abspath(path), cgroup_id))
        if not tops and not nested:
            self._set_figures(self._top_figures["long_paths"], Counter(self._top_figures["unreadable"]),
                              list(self._top_figures["examples"]), len(found))  # fmt: skip
            return found
        walked = self._walk_from(tops, found)
        out = {i: e for i, e in found.items() if i not in nested}
        for cgroup_id, _ in self._containers:
            out.pop(cgroup_id, None)
        for cgroup_id, _ in self._containers:
            entry = found[cgroup_id]
            if not any(top[1] == cgroup_id for top in tops):
                out[cgroup_id] = entry if entry.is_leaf else CgroupEntry(entry.ref, is_leaf=True)
        out.update(walked.found)
        self._has_nested = any(kind_of_path(e.ref.path) == NESTED for e in walked.found.values())
        top = self._top_figures
        self._set_figures(top["long_paths"] + walked.long_paths, Counter(top["unreadable"]) + walked.unreadable,
                          (list(top["examples"]) + walked.examples)[:_EXAMPLES], len(out))  # fmt: skip
        return out

    def _update(self, found: dict[int, CgroupEntry], events: list[CgroupEvent]) -> None:
        now = time.monotonic()
        with self._lock:
            gone = dict(self._gone)
            # What the previous walk saw and this one does not, and what was created and
            # removed in between (known only from the events), is gone, with its last path.
            vanished = {i: e.ref.path for i, e in self._by_id.items() if i not in found}
            for event in events:
                if event.id not in found and event.path:
                    vanished.setdefault(event.id, self._index_path(event.path) or event.path)
            for cgroup_id, path in vanished.items():
                if cgroup_id not in gone:
                    gone[cgroup_id] = Tombstone(CgroupRef(cgroup_id, path, gone=True), now)
            expired = [i for i, t in gone.items() if now - t.since >= self.gone_retention_s]
            for cgroup_id in expired:
                del gone[cgroup_id]
            if found is not self._by_id or len(gone) != len(self._gone) or gone.keys() != self._gone.keys():
                self.generation += 1
                self._containers = None
            self._by_id = found
            self._gone = gone
            self._walked_at = now

    def _walk(self) -> dict[int, CgroupEntry]:
        """id -> entry of every cgroup in scope.  Cgroups that vanish mid-walk are skipped; any
        other that cannot be listed is counted by reason (see the module doc)."""
        # (directory, its inode): a child's inode is its directory entry's d_ino, which kernfs
        # reports as the inode number (the cgroup id), so only the walk's roots need a stat.
        stack: list[tuple[str, int]] = []
        for top in self._walk_roots():
            try:
                stack.append((top, os.stat(top).st_ino))
            except OSError:
                continue
        walked = self._walk_from(stack, self._by_id)
        # What a walk found above containers stays true while events are followed (only
        # containers' subtrees are listed then).
        self._top_figures = {
            "long_paths": walked.top_long_paths, "unreadable": walked.top_unreadable, "examples": walked.top_examples
        }  # fmt: skip
        self._has_nested = any(kind_of_path(e.ref.path) == NESTED for e in walked.found.values())
        self._set_figures(walked.long_paths, walked.unreadable, walked.examples, len(walked.found))
        return walked.found

    def _walk_from(self, stack: list[tuple[str, int]], previous: dict[int, CgroupEntry]) -> _Walked:
        """Walk down from (directory, inode) pairs."""
        walked = _Walked()
        found = walked.found
        prefix_len = len(self.root) if self.root != "/" else 0
        scoped = self.scope != "all"
        while stack:
            directory, inode = stack.pop()
            relative = directory[prefix_len:] or "/"
            try:
                if len(directory) < PATH_LIMIT:
                    children = [(e.path, e.inode()) for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
                else:
                    walked.long_paths += 1
                    if scoped and kind_of_path(relative) not in (CONTAINER, NESTED):
                        walked.top_long_paths += 1
                    children = _list_long(directory)
            except FileNotFoundError:
                continue  # removed while we walked
            except OSError as error:
                reason = errno.errorcode.get(error.errno or 0, "unknown")
                walked.unreadable[reason] += 1
                if len(walked.examples) < _EXAMPLES:
                    walked.examples.append(_shown(relative))
                if scoped and kind_of_path(relative) not in (CONTAINER, NESTED):
                    walked.top_unreadable[reason] += 1
                    if len(walked.top_examples) < _EXAMPLES:
                        walked.top_examples.append(_shown(relative))
                continue
            leaf = not children
            entry = previous.get(inode)
            if entry is None or entry.is_leaf != leaf or entry.ref.path != relative:
                entry = CgroupEntry(CgroupRef(inode, relative), is_leaf=leaf)
            found[inode] = entry  # the same objects as last walk while nothing changed
            stack.extend(children)
        return walked

    def _set_figures(self, long_paths: int, unreadable: Counter[str], examples: list[str], cgroups: int) -> None:
        if unreadable and unreadable != Counter(self._walk_figures["unreadable"]):
            log.warning("cgroups the walk cannot list (their subtrees are not reported): %s; e.g. %s",
                        dict(unreadable), examples[0])  # fmt: skip
        with self._lock:
            self._walk_figures = {"cgroups": cgroups, "long_paths": long_paths, "unreadable": dict(unreadable),
                                  "unreadable_examples": examples}  # fmt: skip

    def walk_status(self) -> dict[str, Any]:
        """The last walk: cgroups found, how many had paths past PATH_MAX (read through openat),
        how many could not be listed by reason (errno name), and a few of those."""
        with self._lock:
            out = dict(self._walk_figures)
        out["walks"] = dict(self._walks)
        out["followed"] = self._followed_refreshes
        out["drift"] = self._drift
        return out

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
            self.refresh(walk=True)
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


def _differences(followed: dict[int, CgroupEntry], walked: dict[int, CgroupEntry], pods_only: bool) -> int:
    """Cgroups two maps disagree on: in one only, or with another path or leafness.  In
    Kubernetes modes containers' subtrees are left out (looked into every cycle, not followed)."""

    def followed_part(entries: dict[int, CgroupEntry]) -> dict[int, tuple[str, bool]]:
        out = {}
        for cgroup_id, entry in entries.items():
            kind = kind_of_path(entry.ref.path)
            if pods_only and kind == NESTED:
                continue
            out[cgroup_id] = (entry.ref.path, entry.is_leaf or (pods_only and kind == CONTAINER))
        return out

    a, b = followed_part(followed), followed_part(walked)
    return len(a.keys() ^ b.keys()) + sum(1 for i in a.keys() & b.keys() if a[i] != b[i])
