"""The layer every eBPF receiver stands on: load an object, pick hooks, read maps, clean up.

How to add a program (net.bpf.c, syscall.bpf.c, ...)
----------------------------------------------------
1. C: `bpf/<name>.bpf.c` including "kpod.bpf.h".  Per-cgroup maps are hashes keyed by a struct
   with a `cgroup_id` member (`struct kpod_cgroup_key`, or your own struct adding e.g. a
   syscall number); histograms are `struct kpod_hist` filled with `kpod_hist_add()` (nanoseconds
   in, slots at powers of two seconds: native histogram buckets).  Define the error map with
   `KPOD_ERRORS_MAP(<prefix>_errors, struct <prefix>_errors_value)`, one __u64 member per map
   named exactly like the map, and insert with `kpod_lookup_or_init()` / `kpod_counter_add()`
   so failed inserts are counted in the kernel.  Keep map names <= 15 characters and unique
   across objects (they are the `map` label).  Per-task scratch state (start timestamps) is
   cheapest in task-local storage (BPF_MAP_TYPE_TASK_STORAGE, freed when the task exits); in
   tp_btf programs read typed pointers directly (task->pid), not with BPF_CORE_READ, which
   costs a helper call per field.  `make bpf` builds `bpf/<name>.bpf.o`.
2. Python: a receiver subclassing `BpfReceiver` with
       object_name = "<name>"
       program_specs = (ProgramSpec("func_name", feeds=("kpod.x.y",)), ...)
   Mark programs `optional=True` when the receiver is still useful without them, and list
   alternatives for one metric in priority order (a tp_btf program and a tracepoint fallback):
   the first whose hook exists on this kernel is loaded, the others get autoload off
   (bpf_program__set_autoload).  A tp_btf program that reads typed arguments gives
   `tp_args=("struct task_struct *", ...)`: kernels whose tracepoint passes other types skip it
   for the next alternative.  A program that fails to verify or attach is dropped if optional.
   Perf-event programs give `perf_event=(type, config)` and are attached to one event per
   online CPU.  `enabled_programs()` lets config switch programs off; `before_attach(obj)`
   fills maps the programs read before any of them runs.
3. `collect()` reads maps with `self.read_cgroup_map(map_name)`, which returns
   (CgroupRef, value) for live cgroups and batch-deletes entries of cgroups that are gone, and
   turns `struct kpod_hist` values into `HistogramValue` with `self.histogram(value)`.
   `BpfReceiver.collect()` adds per-program kernel cost (bpf_stats) for you.
4. Register the factory in pyproject.toml under [project.entry-points."kpod.receivers"].
   Every loaded object is in `REGISTRY`, so the bpf_maps receiver reports its maps with no
   extra code; tests/test_bpf_layout.py checks its map structs against the BTF automatically.
5. Test against the kernel with tests/kernel_util.py (cgroup trees with guaranteed cleanup,
   workloads that wait for "go" until moved into their cgroup) and add the hot handlers to
   bench/bpf_cost.py.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kpod.component import ComponentUnavailable, Receiver
from kpod.kernel import btflayout, libbpf, probes
from kpod.kernel.bpfinfo import ProgramStats, program_stats
from kpod.kernel.btflayout import LayoutError, MapLayout
from kpod.kernel.objects import object_path
from kpod.kernel.preflight import BTF_PATH, TRACEFS_PATHS, effective_capabilities, seccomp_mode
from kpod.model import Batch, CgroupRef, HistogramValue, Kind, MetricDef, Point, attributes

log = logging.getLogger("kpod.ebpf")

BPF_STATS_SYSCTL = "/proc/sys/kernel/bpf_stats_enabled"
KPROBE_PMU_TYPE = "/sys/bus/event_source/devices/kprobe/type"
CGROUP_KEY_FIELD = "cgroup_id"
# Maps every object has (bpf/kpod.bpf.h) but bpf/cgroups.bpf.o owns: the others reuse its
# (kpod.kernel.cgroupwatch), so they are one kernel map, reported once, under their owner.
SHARED_MAPS = ("kpod_watched", "kpod_watch_cfg")

PROGRAM_RUN_SECONDS = MetricDef(
    "kpod.bpf.program.run.seconds",
    Kind.COUNTER,
    "s",
    "Kernel time spent running this BPF program (needs sysctl kernel.bpf_stats_enabled=1)",
    ("program",),
)
PROGRAM_RUNS = MetricDef(
    "kpod.bpf.program.runs",
    Kind.COUNTER,
    "1",
    "Times this BPF program ran (needs sysctl kernel.bpf_stats_enabled=1)",
    ("program",),
)


# --- can eBPF run here? --------------------------------------------------------------------

# The capabilities each syscall needs for what the agent does with it (tracing programs, and
# software perf events on every task of a CPU); CAP_SYS_ADMIN covers both.
SYSCALL_CAPABILITIES = {"bpf": ("CAP_BPF", "CAP_PERFMON"), "perf_event_open": ("CAP_PERFMON",)}
PERF_COUNT_SW_DUMMY = 9


@dataclass(frozen=True)
class SyscallProbe:
    """What happened when this process made the two syscalls the eBPF receivers need, and
    what tells a seccomp filter's refusal from a missing capability: the capabilities held and
    the Seccomp: mode of /proc/self/status.  An errno of 0 means the call worked."""

    bpf_errno: int
    perf_errno: int
    seccomp: int | None
    capabilities: frozenset[str]

    def refusal(self, syscall: str) -> str | None:
        """Why `syscall` ("bpf" or "perf_event_open") is refused here, in one line, or None."""
        err = self.bpf_errno if syscall == "bpf" else self.perf_errno
        if not err:
            return None
        code = errno.errorcode.get(err, str(err))
        needed = SYSCALL_CAPABILITIES[syscall]
        missing = [cap for cap in needed if cap not in self.capabilities]
        if missing and "CAP_SYS_ADMIN" not in self.capabilities:
            return f"{syscall}() refused ({code}): this process lacks {' and '.join(missing)}"
        if self.seccomp == 2:
            held = "CAP_SYS_ADMIN" if missing else "+".join(needed)
            return (
                f"{syscall}() blocked by seccomp ({code} under a seccomp filter, although {held} is held):"
                " the runtime's default profile allows it only with CAP_SYS_ADMIN; use the chart's Localhost profile"
                " files/seccomp/kpod-metrics.json or seccompProfile Unconfined (docs/CAPABILITIES.md)"
            )
        held = "CAP_SYS_ADMIN" if missing else "+".join(needed)
        return f"{syscall}() refused ({code}) with {held} held and no seccomp filter: an LSM or lockdown"

    def summary(self) -> str:
        """One line for `check`: the seccomp mode and what each syscall did."""
        from kpod.kernel.preflight import SECCOMP_MODES

        mode = "not reported" if self.seccomp is None else SECCOMP_MODES.get(self.seccomp, str(self.seccomp))
        parts = []
        for syscall in SYSCALL_CAPABILITIES:
            reason = self.refusal(syscall)
            if reason is None:
                parts.append(f"{syscall}() allowed")
            elif "blocked by seccomp" in reason:
                err = self.bpf_errno if syscall == "bpf" else self.perf_errno
                parts.append(f"{syscall}() BLOCKED by the filter ({errno.errorcode.get(err, err)})")
            else:
                parts.append(reason)
        return f"{mode}: {'; '.join(parts)}"


_probe: SyscallProbe | None = None
_probe_lock = threading.Lock()


def syscall_probe() -> SyscallProbe:
    """Load (and close) a trivial tracepoint program and open (and close) a software perf event
    on one CPU for every task.  Done once per process: neither a seccomp filter nor the
    capabilities of a running process can come back."""
    global _probe
    with _probe_lock:
        if _probe is None:
            bpf_errno = perf_errno = 0
            try:
                libbpf.load_trivial_program()
            except libbpf.LibbpfError as exc:
                bpf_errno = exc.errno or errno.EPERM
            try:
                os.close(libbpf.perf_event_open(libbpf.PERF_TYPE_SOFTWARE, PERF_COUNT_SW_DUMMY,
                                                libbpf.online_cpus()[0], sample_period=0))  # fmt: skip
            except (libbpf.LibbpfError, OSError, IndexError) as exc:
                perf_errno = getattr(exc, "errno", 0) or errno.EPERM
            _probe = SyscallProbe(bpf_errno, perf_errno, seccomp_mode(), frozenset(effective_capabilities()))
        return _probe


def bpf_preflight(object_path: str | None = None) -> str | None:
    """Why BPF programs cannot be loaded here (one line), or None.

    Loads nothing of the agent's: a missing capability, BTF or object is found by looking; a
    refusal by a seccomp filter (or an LSM) only by asking, with a trivial program (syscall_probe).
    """
    caps = effective_capabilities()
    if "CAP_SYS_ADMIN" not in caps and not {"CAP_BPF", "CAP_PERFMON"} <= caps:
        return "needs root or CAP_BPF+CAP_PERFMON to load tracing BPF programs"
    if not os.path.exists(BTF_PATH):
        return f"kernel has no BTF ({BTF_PATH} missing): CO-RE programs cannot be relocated"
    try:
        libbpf.lib()
    except libbpf.LibbpfError as exc:
        return str(exc)
    if object_path is not None and not os.path.exists(object_path):
        return f"{object_path} not found (build it with `make bpf`)"
    return syscall_probe().refusal("bpf")


def bpf_stats_enabled() -> bool:
    """kernel.bpf_stats_enabled, read afresh: every eBPF receiver asks each collection.
    Plain os calls: a text-mode open() costs three times as much for the two bytes."""
    try:
        fd = os.open(BPF_STATS_SYSCTL, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return os.read(fd, 16).strip() == b"1"
    except OSError:
        return False
    finally:
        os.close(fd)


def hook_unavailable(section: str) -> str | None:
    """Why the hook a program's section names is missing on this kernel, or None.

    tp_btf/raw_tp need the kernel's BTF typedef of the tracepoint; tracepoint/ needs tracefs
    (which we never mount ourselves); perf_event is checked when the events are opened.
    """
    kind, _, target = section.partition("/")
    if kind in ("tp_btf", "raw_tp", "raw_tracepoint"):
        if btflayout.tracepoint_params(target) is None:
            return f"kernel has no {kind}/{target}"
        return None
    if kind in ("tracepoint", "tp"):
        if not any(os.path.isdir(os.path.join(root, "events", target)) for root in TRACEFS_PATHS):
            return f"no tracefs event {target} (tracefs not mounted or tracepoint missing)"
        return None
    if kind in ("fentry", "fexit", "fmod_ret"):
        if not btflayout.vmlinux().find(target, btflayout.KIND_FUNC):
            return f"kernel BTF has no function {target}"
        # Loading proves nothing: arm64 before 6.4 verifies the program and refuses to attach
        # it (no trampoline); some kernels refuse fentry with EPERM.  A probe attaches one.
        return probes.trampoline_attach(target)
    if kind in ("kprobe", "kretprobe"):
        # libbpf attaches through the kprobe PMU, or legacy tracefs kprobe_events.
        if not os.path.exists(KPROBE_PMU_TYPE) and not any(
            os.path.exists(os.path.join(root, "kprobe_events")) for root in TRACEFS_PATHS
        ):
            return "kernel has no kprobes (no kprobe PMU, no kprobe_events)"
        # A function gone from this kernel (tcp_sendpage since 6.5) is absent from its BTF too.
        if not btflayout.vmlinux().find(target, btflayout.KIND_FUNC):
            return f"kernel has no function {target}"
        return None
    return None


# --- program specs and loaded objects --------------------------------------------------------


@dataclass(frozen=True)
class ProgramSpec:
    """One BPF program of an object and what it feeds.

    Programs with the same `feeds` are alternatives in the order listed.  `optional`: the
    receiver runs without it (its metrics are then absent).  `perf_event`: (type, config) of a
    perf event opened on every online CPU with sample_period 1.  `tp_args`: the leading
    argument types a tp_btf/raw_tp program reads, as the kernel's BTF spells them
    ("struct task_struct *"); a kernel whose tracepoint has other arguments (a tracepoint whose
    prototype changed between versions) does not get the program.  `with_program`: this
    program completes the routes of these others: it runs exactly when one of them does, and
    if it cannot, they do not either (list it after them, before their fallbacks).
    """

    program: str
    feeds: tuple[str, ...]
    optional: bool = False
    perf_event: tuple[int, int] | None = None
    tp_args: tuple[str, ...] = ()
    with_programs: tuple[str, ...] = ()


def tp_args_mismatch(section: str, expected: tuple[str, ...]) -> str | None:
    """Why a typed tracepoint's arguments differ from what the program reads, or None."""
    if not expected:
        return None
    kind, _, target = section.partition("/")
    params = btflayout.tracepoint_params(target)
    if params is None:
        return f"kernel has no {kind}/{target}"
    if tuple(params[: len(expected)]) != expected:
        return f"{kind}/{target} passes ({', '.join(params)}) on this kernel, not ({', '.join(expected)})"
    return None


@dataclass
class Route:
    program: str
    hook: str  # the section, e.g. "tp_btf/sched_switch", or "perf_event PAGE_FAULTS_MAJ"
    feeds: tuple[str, ...]
    active: bool
    reason: str = ""  # why not active


def describe_routes(routes: list[Route]) -> str:
    """The routes as `check` prints them: "metrics <- hook" per route, and why a route is off.

    Alternative programs on the same hook (tcp_probe and tcp_probe_read both attach to
    tp_btf/tcp_probe) are one route to the reader: the hook is listed once, active if one of
    them is; when none is, each program's reason is kept.
    """
    groups: dict[tuple[tuple[str, ...], str], list[Route]] = {}
    for route in routes:
        groups.setdefault((route.feeds, route.hook), []).append(route)
    parts = []
    for (feeds, hook), alternatives in groups.items():
        metrics = ",".join(feeds)
        if any(r.active for r in alternatives):
            parts.append(f"{metrics} <- {hook}")
        elif len(alternatives) == 1:
            parts.append(f"{metrics} <- {hook}: off ({alternatives[0].reason})")
        else:
            reasons = "; ".join(f"{r.program}: {r.reason}" for r in alternatives)
            parts.append(f"{metrics} <- {hook}: off ({reasons})")
    return "; ".join(parts)


_FAILED_PROG = re.compile(r"prog '([^']+)': (?:BPF program load failed|failed to load|failed to find)")


class LoadedObject:
    """A loaded, attached BPF object plus what Python knows about its maps."""

    def __init__(
        self,
        name: str,
        obj: libbpf.BpfObject,
        layouts: dict[str, MapLayout],
        routes: list[Route],
        reused: frozenset[str] = frozenset(),
    ) -> None:
        self.name = name
        self.obj = obj
        # Maps this object shares with the one that owns them (not its own to report).
        self.reused = reused
        self.layouts = layouts
        self.routes = routes
        self.loaded_at_ns = time.time_ns()
        self.error_map = next((m for m in obj.maps if m.endswith("_errors")), None)
        btf = btflayout.Btf(obj.btf_ptr)
        hist = btf.enum("kpod_hist_layout")
        self.hist_zero_shift: int = hist.get("KPOD_HIST_ZERO_SHIFT", 0)
        self.hist_slots: int = hist.get("KPOD_HIST_SLOTS", 0)
        self._lock = threading.RLock()  # close() from inside reading() (a failed start) is fine

    @property
    def closed(self) -> bool:
        return self.obj.closed

    def map_names(self) -> list[str]:
        """The maps this object owns (shared ones it reuses are its owner's)."""
        return [n for n in self.obj.maps if n not in self.reused]

    def own_maps(self) -> dict[str, libbpf.Map]:
        return {n: m for n, m in self.obj.maps.items() if n not in self.reused}

    def error_counts(self) -> dict[str, int]:
        """Failed inserts per map, as the kernel counted them."""
        if not self.error_map:
            return {}
        raw = self.obj.maps[self.error_map].lookup(b"\0\0\0\0")
        if raw is None:
            return {}
        layout = self.layouts[self.error_map]
        value = layout.value(raw)
        return {name: int(getattr(value, name)) for name in layout.value_fields()}

    def program_stats(self) -> dict[str, ProgramStats]:
        out: dict[str, ProgramStats] = {}
        for route in self.routes:
            if route.active:
                out[route.program] = program_stats(self.obj.programs[route.program])
        return out

    @contextlib.contextmanager
    def reading(self) -> Iterator[bool]:
        """Hold off close() while reading maps; yields False if the object is already closed.

        A collection abandoned by a cycle timeout may still be reading when shutdown runs:
        libbpf's map and program structs must not be freed under it.
        """
        with self._lock:
            yield not self.obj.closed

    def close(self) -> None:
        with self._lock:
            self.obj.close()
        REGISTRY.remove(self)


class BpfRegistry:
    """Every BPF object kpod has loaded in this process (the bpf_maps receiver reads it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._objects: list[LoadedObject] = []

    def add(self, loaded: LoadedObject) -> None:
        with self._lock:
            taken = {m for o in self._objects for m in o.map_names()}
            clash = taken.intersection(loaded.map_names())
            if clash:
                # Map names are the `map` label; two objects with one name would merge series.
                log.warning("%s: map names %s already used by another loaded object", loaded.name, sorted(clash))
            self._objects.append(loaded)

    def remove(self, loaded: LoadedObject) -> None:
        with self._lock:
            self._objects = [o for o in self._objects if o is not loaded]

    def objects(self) -> list[LoadedObject]:
        with self._lock:
            return list(self._objects)

    def program_states(self, receivers: Iterable[Any]) -> tuple[int, dict[str, bool]]:
        """(programs attached, {program: failed?}) over the loaded objects and the eBPF receivers
        that could not start (`receivers`: the pipeline's, objects with .receiver and .status):
        what kpod_bpf_programs_loaded and kpod_bpf_programs_failed{program} report."""
        loaded = 0
        states: dict[str, bool] = {}
        for obj in self.objects():
            for route in obj.routes:
                if route.active:
                    loaded += 1
                    states[route.program] = False
                elif route.reason not in _NOT_FAILURES and not route.reason.startswith(_IDLE_COMPANION):
                    states.setdefault(route.program, True)
        for running in receivers:
            specs = getattr(running.receiver, "program_specs", ())
            not_loaded = getattr(running.receiver, "loaded", None) is None
            if specs and not_loaded and running.status.state in ("unavailable", "failing"):
                for spec in specs:
                    if not spec.optional:
                        states.setdefault(spec.program, True)
        return loaded, states

    def map_fill(self) -> list[dict[str, Any]]:
        """Fill level of every loaded map, for /debug/status (entries are counted: it walks the
        keys, fine for a debug page, not for every scrape).  Only hash maps have one: `fill` is
        None for the others, with the reason (arrays never run out of room)."""
        out: list[dict[str, Any]] = []
        for obj in self.objects():
            try:
                errors = obj.error_counts()
                maps = list(obj.own_maps().items())
            except (libbpf.LibbpfError, ValueError):  # closed by its receiver meanwhile
                continue
            for name, bpf_map in maps:
                try:
                    entries = bpf_map.count()
                    capacity = bpf_map.max_entries
                except (libbpf.LibbpfError, ValueError):
                    continue
                entry: dict[str, Any] = {
                    "object": obj.name, "map": name, "type": bpf_map.type_name, "capacity": capacity
                }
                if entries is not None:
                    entry["entries"] = entries
                    entry["fill"] = round(entries / capacity, 4) if capacity else 0.0
                else:  # an array or local storage: nothing to run out of
                    entry["fill"] = None
                    entry["no_fill_reason"] = bpf_map.fill_reason
                if name in errors:
                    entry["update_errors"] = errors[name]
                out.append(entry)
        return out


# Route reasons that are choices, not failures.
_NOT_FAILURES = ("disabled by config", "an earlier alternative is used")
_IDLE_COMPANION = "runs only with "  # ProgramSpec.with_programs whose partners are not in use

REGISTRY = BpfRegistry()


# kpod.bpf.force_routes: diagnostic switches that make the loader take an older route on a
# kernel that has the newer one, so that the fallbacks are exercised where they can be tested.
FORCE_KPROBE = "kprobe"  # fentry/fexit programs are skipped: their kprobe alternatives run
FORCE_TID_HASH = "tid_hash"  # per-task stamps in a hash keyed by tid instead of task storage
FORCE_SOCK_CGROUP_VAL = "sock_cgroup_val"  # the socket's cgroup read as before 5.15 (tagged u64)


def _plan(
    obj: libbpf.BpfObject, specs: Iterable[ProgramSpec], enabled: set[str], force_routes: frozenset[str] = frozenset()
) -> list[Route]:
    """Choose which programs to load: the first available alternative per fed metric set."""
    routes: list[Route] = []
    satisfied: set[tuple[str, ...]] = set()
    for spec in specs:
        program = obj.programs.get(spec.program)
        if program is None:
            raise LayoutError(f"{obj.path}: no program {spec.program}")
        hook = program.section
        if spec.perf_event is not None:
            hook = f"perf_event type={spec.perf_event[0]} config={spec.perf_event[1]}"
        if spec.with_programs:
            partner = next((r for r in routes if r.program in spec.with_programs and r.active), None)
            if partner is None:
                names = " or ".join(spec.with_programs)
                routes.append(Route(spec.program, hook, spec.feeds, False, f"runs only with {names}"))
                continue
            reason = (
                ("disabled by config" if spec.program not in enabled else None)
                or hook_unavailable(program.section)
                or tp_args_mismatch(program.section, spec.tp_args)
            )
            routes.append(Route(spec.program, hook, spec.feeds, reason is None, reason or ""))
            if reason is not None:  # half a route is no route: the partner goes too
                partner.active = False
                partner.reason = f"{spec.program}: {reason}"
                satisfied.discard(partner.feeds)
            continue
        if spec.program not in enabled:
            routes.append(Route(spec.program, hook, spec.feeds, False, "disabled by config"))
        elif FORCE_KPROBE in force_routes and hook.split("/")[0] in ("fentry", "fexit"):
            routes.append(Route(spec.program, hook, spec.feeds, False, "kpod.bpf.force_routes: kprobe"))
        elif spec.feeds in satisfied:
            routes.append(Route(spec.program, hook, spec.feeds, False, "an earlier alternative is used"))
        else:
            reason = hook_unavailable(program.section) or tp_args_mismatch(program.section, spec.tp_args)
            routes.append(Route(spec.program, hook, spec.feeds, reason is None, reason or ""))
            if reason is None:
                satisfied.add(spec.feeds)
    return routes


def plan_routes(
    name: str, program_dir: str, specs: Iterable[ProgramSpec], enabled: set[str],
    force_routes: frozenset[str] = frozenset(),
) -> list[Route]:  # fmt: skip
    """The routes a receiver would use on this kernel, without loading anything (for `check`)."""
    with libbpf.BpfObject.open(object_path(name, program_dir)) as obj:
        return _plan(obj, specs, enabled, force_routes)


def load_object(
    name: str,
    specs: tuple[ProgramSpec, ...],
    enabled: set[str],
    max_entries: int,
    program_dir: str = "",
    before_attach: Callable[[libbpf.BpfObject], None] | None = None,
    before_load: Callable[[libbpf.BpfObject], None] | None = None,
    force_routes: frozenset[str] = frozenset(),
    shared_maps: dict[str, int] | None = None,
    map_sizes: dict[str, int] | None = None,
) -> LoadedObject:
    """Open, size, load and attach `<name>.bpf.o`, and register it.

    `before_load(obj)` runs on the opened object, before load: the place to set read-only
    flags and retype maps for a fallback route (set_rodata, Map.retype).

    `before_attach(obj)` runs after load and before any program is attached: the place to
    fill maps the programs read (a filter) so that no event is seen with them empty.
    `shared_maps` (name -> fd): maps of another loaded object this one uses instead of
    creating its own (bpf_map__reuse_fd; kpod.kernel.cgroupwatch owns kpod_watched).
    `map_sizes` (name -> max_entries) overrides the size of those maps.

    Per-cgroup maps (key has `cgroup_id`) get `max_entries`.  A program that fails to verify
    or attach is dropped if it is optional (its route says why); a required one fails the
    whole load with LibbpfError.  Nothing stays loaded on failure.
    """
    path = object_path(name, program_dir)
    by_name = {s.program: s for s in specs}
    dropped: dict[str, str] = {}
    for _attempt in range(len(specs) + 1):
        obj = libbpf.BpfObject.open(path)
        try:
            layouts = btflayout.map_layouts(obj)
            reused = frozenset(n for n in (shared_maps or {}) if n in obj.maps)
            for map_name, layout in layouts.items():
                if layout.has_key_field(CGROUP_KEY_FIELD) and map_name not in reused:
                    obj.maps[map_name].set_max_entries(max_entries)
            for map_name, size in (map_sizes or {}).items():
                obj.maps[map_name].set_max_entries(size)
            for map_name in reused:
                obj.maps[map_name].reuse_fd((shared_maps or {})[map_name])
            if before_load is not None:
                before_load(obj)
            routes = _plan(obj, specs, enabled - set(dropped), force_routes)
            for route in routes:
                if route.program in dropped:
                    route.reason = dropped[route.program]
            active = {r.program for r in routes if r.active}
            for prog_name, program in obj.programs.items():
                program.set_autoload(prog_name in active)
            missing = [r for r in routes if not r.active and not by_name[r.program].optional]
            missing = [r for r in missing if not any(o.active and o.feeds == r.feeds for o in routes)]
            if missing:
                raise libbpf.LibbpfError(
                    errno.ENOENT, f"{name}: required program {missing[0].program}: {missing[0].reason}"
                )
            try:
                obj.load()
            except libbpf.LibbpfError as exc:
                failed = {m.group(1) for line in exc.log_lines for m in _FAILED_PROG.finditer(line)}
                optional_failed = {p for p in failed if p in by_name and by_name[p].optional}
                if not failed or failed - optional_failed:
                    raise
                for prog_name in optional_failed:
                    dropped[prog_name] = f"failed to load: {exc.strerror}"
                    log.warning(
                        "%s: optional program %s did not load (%s); going on without it", name, prog_name, exc.strerror
                    )
                obj.close()
                continue
            if before_attach is not None:
                before_attach(obj)
            failed = _attach_all(obj, routes, by_name)
            retry = {p: reason for p, reason in failed.items() if _has_untried_alternative(p, routes, dropped)}
            if retry:
                # Verified but refused at attach (fexit where the architecture has no
                # trampoline): load again without it, so that the next alternative is used.
                dropped.update(retry)
                obj.close()
                continue
            loaded = LoadedObject(name, obj, layouts, routes, reused)
            REGISTRY.add(loaded)
            return loaded
        except BaseException:
            obj.close()
            raise
    raise libbpf.LibbpfError(errno.EINVAL, f"{name}: gave up loading after dropping programs")


def _attach_all(obj: libbpf.BpfObject, routes: list[Route], by_name: dict[str, ProgramSpec]) -> dict[str, str]:
    """Attach every active program; returns {program: reason} for optional ones that failed.

    A failed optional program is detached again and its route marked off; the caller decides
    whether a later alternative deserves a new load.
    """
    failed: dict[str, str] = {}
    for route in routes:
        if not route.active:
            continue
        spec = by_name[route.program]
        program = obj.programs[route.program]
        before = len(obj.links)
        try:
            if spec.perf_event is not None:
                _attach_perf_per_cpu(program, *spec.perf_event)
            else:
                program.attach()
        except libbpf.LibbpfError as exc:
            if not spec.optional:
                raise
            for link in obj.links[before:]:
                link.destroy()
            del obj.links[before:]
            route.active = False
            refused = syscall_probe().refusal("perf_event_open") if spec.perf_event is not None else None
            route.reason = refused or f"attach failed: {exc.strerror}"
            failed[route.program] = route.reason
            log.warning("%s: optional program %s not attached: %s", obj.name, route.program, exc)
    return failed


def _has_untried_alternative(program: str, routes: list[Route], dropped: dict[str, str]) -> bool:
    """Whether a later program feeding the same metrics could still be loaded instead."""
    feeds = next(r.feeds for r in routes if r.program == program)
    later = False
    for route in routes:
        if route.program == program:
            later = True
        elif later and route.feeds == feeds and route.program not in dropped and route.reason != "disabled by config":
            return True
    return False


def _attach_perf_per_cpu(program: libbpf.Program, type_: int, config: int) -> None:
    for cpu in libbpf.online_cpus():
        fd = libbpf.perf_event_open(type_, config, cpu, sample_period=1)
        try:
            program.attach_perf_event(fd)
        except BaseException:
            os.close(fd)
            raise


# --- read-only flags and per-task stamps -------------------------------------------------------

TID_HASH_ENTRIES = 32768  # threads with a stamp at once (waiting to run, or inside a tracked syscall)


def set_rodata(obj: libbpf.BpfObject, variable: str, value: int) -> None:
    """Before load: a `const volatile` global of the object (its .rodata), e.g. a route flag."""
    offsets = btflayout.Btf(obj.btf_ptr).section_variables(".rodata")
    if variable not in offsets:
        raise LayoutError(f"{obj.path}: no read-only variable {variable}")
    offset, size = offsets[variable]
    rodata = next(m for n, m in obj.maps.items() if n.endswith(".rodata"))
    data = rodata.initial_value()
    data[offset : offset + size] = value.to_bytes(size, sys.byteorder)


def task_stamps_route(force_routes: frozenset[str], program_dir: str = "") -> tuple[bool, str]:
    """(use task storage?, what to say): task-local storage where the probe allows it, else
    (kernels before 5.13, or forced) a hash keyed by thread id."""
    if FORCE_TID_HASH in force_routes:
        return False, "tid hash (kpod.bpf.force_routes: tid_hash)"
    reason = probes.task_storage_in_tracing(program_dir)
    if reason:
        return False, f"tid hash ({reason})"
    return True, "task storage"


def use_task_stamps(obj: libbpf.BpfObject, map_name: str, task_storage: bool) -> None:
    """Before load: keep `map_name` as task storage, or make it the tid hash (kpod.bpf.h)."""
    if task_storage:
        return
    set_rodata(obj, "kpod_task_storage", 0)
    obj.maps[map_name].retype(libbpf.BPF_MAP_TYPE_HASH, TID_HASH_ENTRIES)


# --- histograms ----------------------------------------------------------------------------


def hist_bounds(zero_shift: int, slots: int) -> tuple[float, ...]:
    """Explicit upper bounds, in seconds, of the kernel's histogram slots (see kpod.bpf.h).

    Slot k < slots - 1 holds values up to 2^(k - zero_shift) s (slot 0 is the zero bucket, from
    0); the last slot is the +inf bucket.  Powers of two are exact floats: no rounding reaches
    the `le` labels, and each bound is a native-histogram (schema 0) bucket boundary.
    """
    return tuple(math.ldexp(1.0, k - zero_shift) for k in range(slots - 1))


# --- the receiver base ---------------------------------------------------------------------


@dataclass
class _MapState:
    """What read_cgroup_map keeps per map: its readers (built once from the layout) and the
    cgroup ids seen unresolved in the previous cycle (deleted if still unresolved now)."""

    cgroup_of: Callable[[bytes], int]  # a raw key's cgroup id
    value_of: Callable[[bytes], Any]  # a raw value as an int or the BTF-derived struct
    pending: set[int] = field(default_factory=set)


class BpfReceiver(Receiver):
    """A receiver backed by one BPF object.  Subclasses set object_name and program_specs."""

    object_name: ClassVar[str] = ""
    program_specs: ClassVar[tuple[ProgramSpec, ...]] = ()

    def __init__(self, context: Any, config: Any) -> None:
        super().__init__(context, config)
        self.loaded: LoadedObject | None = None
        self._map_state: dict[str, _MapState] = {}
        self._bounds: tuple[float, ...] | None = None
        self._slots_unpack: Callable[[Any], tuple[int, ...]] | None = None
        self._vmlinux_released = False
        # choices() as decided when the object was loaded (see started_choices()).
        self._started_choices: dict[str, str] | None = None

    # -- configuration hooks for subclasses --

    def enabled_programs(self) -> set[str]:
        return {s.program for s in self.program_specs}

    def before_attach(self, obj: libbpf.BpfObject) -> None:
        """Subclasses: fill maps after load, before the programs run (see load_object)."""

    def before_load(self, obj: libbpf.BpfObject) -> None:
        """Subclasses: set read-only flags and retype maps for their chosen route (see load_object)."""

    def choices(self) -> dict[str, str]:
        """Subclasses: routes chosen by data layout rather than by program, e.g.
        {"stamps": "tid hash (kernel refuses task-local storage ...)"}, for check and the log."""
        return {}

    def started_choices(self) -> dict[str, str]:
        """choices() of the running object, as they were made at its start.  They cannot change
        while it runs, and asking choices() again after the first collection would parse the
        kernel's BTF again (several subclasses read it), which release_vmlinux() dropped: about
        6 MiB kept for the agent's life and a parse per /debug/status request."""
        if self._started_choices is None:
            self._started_choices = self.choices()
        return self._started_choices

    @property
    def force_routes(self) -> frozenset[str]:
        return frozenset(self._bpf_settings.force_routes)

    # -- lifecycle --

    @property
    def _bpf_settings(self) -> Any:
        return self.context.settings.bpf

    def _object_path(self) -> str:
        return object_path(self.object_name, self._bpf_settings.program_dir)

    def preflight(self) -> str | None:
        if not self._bpf_settings.enabled:
            return "eBPF is disabled (kpod.bpf.enabled: false)"
        # Nothing to load where no event could be told apart from the host's.
        return self.context.cgroups.ebpf_unattributable or bpf_preflight(self._object_path())

    def start(self) -> None:
        reason = self.preflight()
        if reason:
            raise ComponentUnavailable(reason)
        # Loading parses the kernel's BTF again: the first collection after it drops it again
        # (a receiver started again after a failure would otherwise keep it).
        self._vmlinux_released = False
        shared = self.acquire_shared_maps()
        try:
            self.loaded = load_object(
                self.object_name,
                self.program_specs,
                self.enabled_programs(),
                self._bpf_settings.map_max_entries,
                self._bpf_settings.program_dir,
                before_attach=self.before_attach,
                before_load=self.before_load,
                force_routes=self.force_routes,
                shared_maps=shared,
            )
        except (libbpf.LibbpfError, LayoutError) as exc:
            self.release_shared_maps()
            detail = next((ln for ln in reversed(getattr(exc, "log_lines", [])) if ln.strip()), "")
            raise ComponentUnavailable(f"{self.object_name}.bpf.o: {exc}" + (f" ({detail})" if detail else "")) from exc
        for route in self.loaded.routes:
            state = "on" if route.active else f"off ({route.reason})"
            self.log.info("%s: %s -> %s", route.program, route.hook, state)
        self._started_choices = None
        for what, chosen in self.started_choices().items():
            self.log.info("%s: %s", what, chosen)
        if not any(r.active for r in self.loaded.routes):
            reasons = "; ".join(f"{r.program}: {r.reason}" for r in self.loaded.routes)
            self.shutdown()
            raise ComponentUnavailable(f"{self.object_name}: no program can run ({reasons})")

    def shutdown(self) -> None:
        if self.loaded is not None:
            self.loaded.close()
            self.loaded = None
        self.release_shared_maps()

    def acquire_shared_maps(self) -> dict[str, int]:
        """Maps of another object this one reuses (name -> fd), taken before each load:
        kpod.kernel.cgroupwatch.CgroupBpfReceiver shares the cgroup watch's."""
        return {}

    def release_shared_maps(self) -> None:
        """Give back what acquire_shared_maps took (at shutdown, or when the load failed)."""

    def routes(self) -> list[Route]:
        if self.loaded is not None:
            return self.loaded.routes
        if self.preflight():
            return []
        return plan_routes(
            self.object_name, self._bpf_settings.program_dir, self.program_specs, self.enabled_programs(),
            self.force_routes,
        )  # fmt: skip

    def route(self) -> str:
        reason = self.preflight()
        if reason:
            return f"unavailable: {reason}"
        chosen = self.started_choices() if self.loaded is not None else self.choices()
        choices = [f"{what}: {choice}" for what, choice in chosen.items()]
        return "; ".join([describe_routes(self.routes()), *choices])

    def status(self) -> dict[str, Any]:
        if self.loaded is None:
            return {"loaded": False}
        return {
            "loaded": True,
            "routes": {r.program: (r.hook if r.active else f"off: {r.reason}") for r in self.loaded.routes},
            **({"choices": self.started_choices()} if self.started_choices() else {}),
            "map_update_errors": self.loaded.error_counts(),
        }

    # -- collection --

    def collect(self) -> Batch:
        batch = Batch()
        if self.loaded is None:
            return batch
        if not self._vmlinux_released:
            # Every receiver has started by the first cycle: the kernel's parsed BTF (~6 MiB)
            # is no longer needed; the bpf_prog_info layout built from it stays cached.
            btflayout.vmlinux_struct("bpf_prog_info")
            btflayout.release_vmlinux()
            self._vmlinux_released = True
        loaded = self.loaded
        with loaded.reading() as alive:
            if alive:
                self.collect_maps(batch)
                batch.extend(self.program_cost_points())
        return batch

    def collect_maps(self, batch: Batch) -> None:
        """Subclasses: add the points of their maps."""
        raise NotImplementedError

    def feeds_active(self, metric_name: str) -> bool:
        return self.loaded is not None and any(r.active and metric_name in r.feeds for r in self.loaded.routes)

    def read_cgroup_map(self, map_name: str) -> list[tuple[CgroupRef, Any]]:
        """(cgroup, value) of every entry the index knows, live or gone; the entries of
        cgroups it no longer knows are deleted.

        A removed cgroup stays known for the index's gone_retention (`CgroupRef.gone` set):
        its final counts keep being reported under the labels it had.  An id that does not
        resolve is deleted only when it did not resolve in the previous cycle either: a cgroup
        created after the index's last walk gets one cycle to appear instead of having its
        counter reset.  Scalar values come back as int, structs as the BTF-derived ctypes
        struct.
        """
        assert self.loaded is not None
        bpf_map = self.loaded.obj.maps[map_name]
        state = self._map_state.get(map_name)
        if state is None:
            layout = self.loaded.layouts[map_name]
            state = self._map_state[map_name] = _MapState(
                layout.key_field_reader(CGROUP_KEY_FIELD), layout.value_reader()
            )
        cgroup_of, value_of, ref_of = state.cgroup_of, state.value_of, self.context.cgroups.ref
        out: list[tuple[CgroupRef, Any]] = []
        unresolved: set[int] = set()
        stale: list[bytes] = []
        for raw_key, raw_value in bpf_map.lookup_batch():
            cgroup_id = cgroup_of(raw_key)
            ref = ref_of(cgroup_id)
            if ref is None:
                unresolved.add(cgroup_id)
                if cgroup_id in state.pending:
                    stale.append(raw_key)
                continue
            out.append((ref, value_of(raw_value)))
        if stale:
            try:
                deleted = bpf_map.delete_batch(stale)
                self.log.debug("%s: deleted %d entries of gone cgroups", map_name, deleted)
            except libbpf.LibbpfError as exc:
                self.log.warning("%s: deleting entries of gone cgroups failed: %s", map_name, exc)
        state.pending = unresolved - {cgroup_of(k) for k in stale}
        return out

    def histogram(self, hist: Any) -> HistogramValue:
        """A `struct kpod_hist` (nanoseconds) as an explicit-bucket histogram in seconds."""
        assert self.loaded is not None
        bounds = self._bounds
        if bounds is None:
            bounds = self._bounds = hist_bounds(self.loaded.hist_zero_shift, self.loaded.hist_slots)
        slots = hist.slots
        unpack = self._slots_unpack
        if unpack is None:
            # The slots' bytes as ints in one struct call (indexing the ctypes array builds an
            # int per slot through ctypes: 5x slower, for every cgroup's histogram each cycle).
            array = type(slots)
            unpack = self._slots_unpack = struct.Struct(f"{array._length_}{array._type_._type_}").unpack_from
        return HistogramValue(bounds, unpack(slots), int(hist.sum) * 1e-9)

    def program_cost_points(self) -> list[Point]:
        """kpod.bpf.program.run.seconds / .runs per program, when kernel.bpf_stats_enabled=1."""
        if self.loaded is None or not bpf_stats_enabled():
            return []
        points: list[Point] = []
        start = self.loaded.loaded_at_ns
        for program, stats in self.loaded.program_stats().items():
            attrs = attributes(program=program)
            points.append(Point(PROGRAM_RUN_SECONDS, None, attrs, stats.run_time_ns / 1e9, None, start))
            points.append(Point(PROGRAM_RUNS, None, attrs, float(stats.run_cnt), None, start))
        return points

    def point(self, metric: MetricDef, ref: CgroupRef, value: float | HistogramValue) -> Point:
        start = self.loaded.loaded_at_ns if self.loaded else 0
        return Point(metric, ref, (), value, None, start)
