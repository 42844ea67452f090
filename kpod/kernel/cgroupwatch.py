"""The kernel's view of cgroups coming and going, shared by every eBPF receiver.

bpf/cgroups.bpf.c hooks cgroup_mkdir and cgroup_rmdir.  This module loads it once per cgroup
index (the first eBPF receiver to start does, the last one to shut down closes it) and:

- drains its ring buffer into the index at the start of every refresh (`CgroupEventSource`), so
  the index knows cgroups that were created and removed between two cycles, with their paths,
  and follows them instead of walking while nothing was missed (`missed`: records the ring
  buffer dropped, kpod_watched inserts that failed, entries the last sync had to add);
- owns the maps every other object charges through (`kpod_watched`, `kpod_watch_cfg`, see
  kpod_charge() in bpf/kpod.bpf.h): `shared_maps()` gives their fds, which the loader makes
  each object reuse before it loads (bpf_map__reuse_fd);
- in Kubernetes modes (the index's "kubepods" scope) turns the filter on and keeps
  kpod_watched equal to the index after each walk: entries for live kubepods/QoS/pod/container
  cgroups the kernel missed are added (created before we attached, or an insert that failed),
  entries of cgroups that are neither live nor retained as gone are deleted.  The kernel adds
  new ones itself at mkdir; userspace only catches up, and only when the index changed.

Without this object (it fails to load, or kpod.bpf is off) receivers run as in local mode:
every cgroup counts as itself, and gone cgroups are known from the walks alone.

`CgroupBpfReceiver` is the receiver base that does this: every receiver whose maps are per
cgroup subclasses it.  The index is used through its methods only (the kernel layer imports
nothing of kpod.cgroup): scope, refresh, add_source/remove_source, kinds, known_ids, level_of.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import threading
from dataclasses import dataclass
from typing import Any

from kpod.kernel import btflayout, libbpf
from kpod.kernel.ebpf import BpfReceiver, LoadedObject, ProgramSpec, load_object

log = logging.getLogger("kpod.cgroupwatch")

OBJECT = "cgroups"
WATCHED_MAP = "kpod_watched"
CFG_MAP = "kpod_watch_cfg"
EVENTS_MAP = "cgroup_events"
SHARED_MAPS = (WATCHED_MAP, CFG_MAP)
# kpod_watched holds the kubepods root, QoS cgroups, pods and containers: room for four per
# entry of a per-cgroup map (not preallocated: memory follows the cgroups that exist).
WATCHED_PER_ENTRY = 4
EVENT_STRUCT = "cgroup_event"
# The error counters (cgroups_errors in bpf/cgroups.bpf.c) that mean an event was not sent:
# a record the full ring buffer dropped, a watched cgroup whose entry could not be inserted
# (its children are then neither classified nor reported).
LOSSES = ("cgroup_events", "kpod_watched")

PROGRAMS = (
    ProgramSpec("cgroup_mkdir", feeds=("cgroup births",), tp_args=("struct cgroup *",)),
    ProgramSpec("cgroup_rmdir", feeds=("cgroup deaths",), tp_args=("struct cgroup *",)),
)

# The index's kinds (kpod.cgroup.index.kind_of_path) -> enum kpod_cgroup_kind constants (their
# values read from the object's BTF).
KUBEPODS, QOS, POD, CONTAINER = "kubepods", "qos", "pod", "container"
KIND_CONSTANTS = {KUBEPODS: "KPOD_CG_KUBEPODS", QOS: "KPOD_CG_QOS", POD: "KPOD_CG_POD", CONTAINER: "KPOD_CG_CONTAINER"}
# An event as the index takes it: (kind "mkdir" | "rmdir", cgroup id, path).
Event = tuple[str, int, str]
EVENT_CONSTANTS = {"KPOD_CGROUP_MKDIR": "mkdir", "KPOD_CGROUP_RMDIR": "rmdir"}
_ZERO = b"\0\0\0\0"


class Layouts:
    """What Python needs of bpf/cgroups.bpf.c's types, from the object's BTF."""

    def __init__(self, loaded: LoadedObject) -> None:
        btf = btflayout.Btf(loaded.obj.btf_ptr)
        kinds = btf.enum("kpod_cgroup_kind")
        events = btf.enum("kpod_cgroup_event")
        self.kind_values = {kind: kinds[name] for kind, name in KIND_CONSTANTS.items()}
        self.event_names = {events[name]: kind for name, kind in EVENT_CONSTANTS.items()}
        self.watched = loaded.layouts[WATCHED_MAP]
        self.cfg = loaded.layouts[CFG_MAP]
        for layout, fields in ((self.watched, ("charge", "kind", "level")), (self.cfg, ("filter", "kubepods_id"))):
            missing = set(fields) - set(layout.value_fields())
            if missing:  # the C structs changed without this file: fail at start, not mid-cycle
                raise btflayout.LayoutError(f"map {layout.map_name}: no member {', '.join(sorted(missing))}")
        self.event = btf.ctype(btf.find(EVENT_STRUCT, btflayout.KIND_STRUCT))
        self.path_offset = self.event.path.offset

    def decode_event(self, raw: bytes) -> Event | None:
        """A ring-buffer record (the header, then path_len bytes of path) as a CgroupEvent;
        None for a record that is not one."""
        if len(raw) < self.path_offset:
            return None
        header = self.event.from_buffer_copy(raw[: self.path_offset].ljust(ctypes.sizeof(self.event), b"\0"))
        kind = self.event_names.get(int(header.event))
        if kind is None:
            return None
        path = raw[self.path_offset : self.path_offset + int(header.path_len)].decode("utf-8", "surrogateescape")
        return (kind, int(header.id), path)

    def key(self, cgroup_id: int) -> bytes:
        key = self.watched.key_type()
        key.cgroup_id = cgroup_id
        return bytes(key)

    def key_id(self, raw: bytes) -> int:
        return int(self.watched.key(raw).cgroup_id)

    def watch_entry(self, cgroup_id: int, kind: str, level: int) -> bytes:
        """The kpod_watched value of a cgroup of `kind`: pods and containers are charged to
        themselves, the kubepods root and QoS cgroups to nobody."""
        value = self.watched.value_type()
        value.charge = cgroup_id if kind in (POD, CONTAINER) else 0
        value.kind = self.kind_values[kind]
        value.level = level
        return bytes(value)

    def cfg_value(self, filtering: bool, kubepods_level: int, kubepods_id: int) -> bytes:
        value = self.cfg.value_type()
        value.filter = 1 if filtering else 0
        value.kubepods_level = kubepods_level
        value.kubepods_id = kubepods_id
        return bytes(value)


@dataclass
class WatchStats:
    events: int = 0
    decode_errors: int = 0
    added: int = 0
    deleted: int = 0
    add_errors: int = 0


class CgroupWatch:
    """The loaded cgroups object for one index (use `acquire` / `release`)."""

    def __init__(self, index: Any, bpf_settings: Any) -> None:
        self.index = index  # a kpod.cgroup.index.CgroupIndex
        self.settings = bpf_settings
        self.filtering = index.scope != "all"
        self.loaded: LoadedObject | None = None
        self.layouts: Layouts | None = None
        self._ring: libbpf.RingBuffer | None = None
        self._pending: list[Event] = []
        self.stats = WatchStats()
        # Kubernetes modes: no events below containers (bpf/cgroups.bpf.c), the index looks.
        self.reports_nested = not self.filtering
        self._losses = 0
        self._synced_generation: int | None = None
        self._sync_added = False  # the last sync added entries the kernel had missed

    # -- lifecycle --

    def start(self) -> None:
        """Load and attach; then walk, and (Kubernetes modes) fill kpod_watched from the walk.

        The mkdir hook is attached before the walk: a cgroup made in between is either seen by
        the walk or classified by the kernel (its parent being in the map by then, or made by
        the fill below, which only adds what is missing).
        """
        self.loaded = load_object(
            OBJECT,
            PROGRAMS,
            {s.program for s in PROGRAMS},
            self.settings.map_max_entries,
            self.settings.program_dir,
            before_attach=self._configure,
            map_sizes={WATCHED_MAP: WATCHED_PER_ENTRY * self.settings.map_max_entries},
        )
        try:
            self.layouts = Layouts(self.loaded)
            self._ring = libbpf.RingBuffer(self.loaded.obj.maps[EVENTS_MAP].fd, self._on_record)
            self.index.add_source(self)
            self.index.refresh()
        except BaseException:
            self.close()
            raise

    def _configure(self, obj: libbpf.BpfObject) -> None:
        """Before attach: the filter flag (the kubepods root follows with the first sync)."""
        layout = btflayout.map_layouts(obj)[CFG_MAP]
        value = layout.value_type()
        value.filter = 1 if self.filtering else 0
        obj.maps[CFG_MAP].update(_ZERO, bytes(value))

    def close(self) -> None:
        self.index.remove_source(self)
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None

    def shared_maps(self) -> dict[str, int]:
        """Map name -> fd, for every other object to reuse."""
        if self.loaded is None:
            return {}
        return {name: self.loaded.obj.maps[name].fd for name in SHARED_MAPS}

    # -- CgroupEventSource --

    def _on_record(self, raw: bytes) -> None:
        assert self.layouts is not None
        event = self.layouts.decode_event(raw)
        if event is None:
            self.stats.decode_errors += 1
        else:
            self._pending.append(event)

    def drain(self) -> list[Event]:
        if self._ring is None or self.loaded is None:
            return []
        with self.loaded.reading() as alive:
            if not alive:
                return []
            self._ring.consume()
        events, self._pending = self._pending, []
        self.stats.events += len(events)
        return events

    def missed(self) -> bool:
        """Whether a cgroup may have come or gone unreported since the last call: records
        dropped or entries not inserted (the kernel's counts), or entries the last sync added
        (the kernel classifies a cgroup by its parent's entry: children of one it missed
        were not reported either)."""
        if self._ring is None or self.loaded is None:
            return True
        with self.loaded.reading() as alive:
            if not alive:
                return True
            counts = self.loaded.error_counts()
        losses = sum(counts.get(name, 0) for name in LOSSES)
        missed = losses != self._losses or self._sync_added
        self._losses, self._sync_added = losses, False
        return missed

    def refreshed(self, index: Any) -> None:
        if self.filtering and getattr(index, "generation", None) != self._synced_generation:
            added = self.stats.added
            self.sync(index)
            self._sync_added = self.stats.added != added
            self._synced_generation = getattr(index, "generation", None)

    # -- kpod_watched --

    def sync(self, index: Any) -> None:
        """Make kpod_watched hold what the index knows: add live pod-level cgroups the kernel
        has no entry for, delete entries of cgroups neither live nor retained as gone, and
        point kpod_watch_cfg at the kubepods root."""
        if self.loaded is None or self.layouts is None:
            return
        layouts = self.layouts
        with self.loaded.reading() as alive:
            if not alive:
                return
            watched = self.loaded.obj.maps[WATCHED_MAP]
            kinds = index.kinds()
            present = {layouts.key_id(k) for k, _ in watched.lookup_batch()}
            keep = index.known_ids()
            stale = [layouts.key(i) for i in present if i not in keep]
            if stale:
                self.stats.deleted += watched.delete_batch(stale)
            for cgroup_id, kind in kinds.items():
                if cgroup_id in present:
                    continue
                level = index.level_of(cgroup_id) or 0
                try:
                    watched.update(
                        layouts.key(cgroup_id), layouts.watch_entry(cgroup_id, kind, level), libbpf.BPF_NOEXIST
                    )
                    self.stats.added += 1
                except libbpf.LibbpfError as exc:
                    if exc.errno != errno.EEXIST:  # EEXIST: the kernel added it meanwhile
                        self.stats.add_errors += 1
            roots = [i for i, k in kinds.items() if k == KUBEPODS]
            cfg = self.loaded.obj.maps[CFG_MAP]
            raw = cfg.lookup(_ZERO)
            current = int(layouts.cfg.value(raw).kubepods_id) if raw else 0
            if roots and current not in roots:
                level = index.level_of(roots[0]) or 1
                cfg.update(_ZERO, layouts.cfg_value(True, level, roots[0]))

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"filtering": self.filtering, "loaded": self.loaded is not None}
        out.update(vars(self.stats))
        if self.loaded is not None:
            out["kernel_errors"] = self.loaded.error_counts()
        return out


# --- one watch per index, shared by the receivers --------------------------------------------

_lock = threading.Lock()
_watches: dict[int, tuple[CgroupWatch, int]] = {}
_failed: dict[int, str] = {}


def acquire(index: Any, bpf_settings: Any) -> CgroupWatch | None:
    """The index's watch, started on first use; None if it cannot run here (logged once per
    reason: receivers then count every cgroup as itself)."""
    key = id(index)
    with _lock:
        held = _watches.get(key)
        if held is not None:
            _watches[key] = (held[0], held[1] + 1)
            return held[0]
        watch = CgroupWatch(index, bpf_settings)
        try:
            watch.start()
        except (libbpf.LibbpfError, btflayout.LayoutError, OSError, ValueError) as exc:
            reason = str(exc)
            if _failed.get(key) != reason:
                log.warning(
                    "cgroup events unavailable (%s): gone cgroups are known from walks only,"
                    " and every cgroup counts as itself",
                    reason,
                )
                _failed[key] = reason
            return None
        _failed.pop(key, None)
        _watches[key] = (watch, 1)
        return watch


def release(watch: CgroupWatch) -> None:
    key = id(watch.index)
    with _lock:
        held = _watches.get(key)
        if held is None or held[0] is not watch:
            return
        if held[1] > 1:
            _watches[key] = (watch, held[1] - 1)
            return
        del _watches[key]
    watch.close()


class CgroupBpfReceiver(BpfReceiver):
    """A BpfReceiver whose maps are per cgroup: it loads with the shared cgroup watch of its
    context's index (started by the first such receiver, closed with the last one), so its
    handlers charge through kpod_watched and its gone cgroups are known from the kernel."""

    def __init__(self, context: Any, config: Any) -> None:
        super().__init__(context, config)
        self.watch: CgroupWatch | None = None

    def acquire_shared_maps(self) -> dict[str, int]:
        if self.watch is None and self.context.cgroups is not None:
            self.watch = acquire(self.context.cgroups, self._bpf_settings)
        return self.watch.shared_maps() if self.watch is not None else {}

    def release_shared_maps(self) -> None:
        if self.watch is not None:
            release(self.watch)
            self.watch = None
