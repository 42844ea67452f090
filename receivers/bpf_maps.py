"""Diagnostics of every BPF map kpod has loaded: fill level, capacity, failed inserts.

Reads the shared registry (kpod.kernel.ebpf.REGISTRY), so it covers the maps of every eBPF receiver
in the process without knowing them.  Entry counts are real (the keys are counted); update
errors are counted by the programs themselves, in each object's `<prefix>_errors` map.

Entries and capacity are reported for hash maps only: their fill level says how close the map is
to losing data (an insert into a full hash map fails).  Arrays (the `*_errors` counters, the
syscall filter, .rodata/.bss) preallocate every slot, so "entries = capacity" would read as full
while nothing can be lost; local storage has no capacity at all.
"""

from __future__ import annotations

from kpod.component import ComponentUnavailable, EmptyConfig, Factory, Receiver
from kpod.kernel.ebpf import REGISTRY, LoadedObject, bpf_preflight
from kpod.kernel.libbpf import LibbpfError
from kpod.model import Batch, Kind, MetricDef, Point, attributes

MAP_ENTRIES = MetricDef(
    "kpod.bpf.map.entries", Kind.GAUGE, "1", "Entries currently in the BPF hash map (arrays are not reported)", ("map",)
)
MAP_CAPACITY = MetricDef(
    "kpod.bpf.map.capacity", Kind.GAUGE, "1", "Maximum entries of the BPF hash map (arrays are not reported)", ("map",)
)
MAP_UPDATE_ERRORS = MetricDef(
    "kpod.bpf.map.update.errors.total",
    Kind.COUNTER,
    "1",
    "Inserts into the BPF map that failed in the kernel (map full, no memory)",
    ("map",),
)


class BpfMapsReceiver(Receiver):
    metrics = (MAP_ENTRIES, MAP_CAPACITY, MAP_UPDATE_ERRORS)

    def preflight(self) -> str | None:
        if not self.context.settings.bpf.enabled:
            return "eBPF is disabled (kpod.bpf.enabled: false)"
        return self.context.cgroups.ebpf_unattributable or bpf_preflight()

    def route(self) -> str:
        reason = self.preflight()
        return f"unavailable: {reason}" if reason else "maps of the loaded eBPF receivers (bpf syscalls)"

    def start(self) -> None:
        # Where no eBPF receiver can load (capabilities, seccomp, BTF), say so like them rather
        # than run and report nothing.
        reason = self.preflight()
        if reason:
            raise ComponentUnavailable(reason)

    def collect(self) -> Batch:
        batch = Batch()
        for loaded in REGISTRY.objects():
            with loaded.reading() as alive:
                if not alive:
                    continue  # shut down since we listed it: simply gone
                try:
                    self._collect_object(loaded, batch)
                except LibbpfError as exc:
                    self.log.warning("%s: reading its maps failed: %s", loaded.name, exc)
        return batch

    def _collect_object(self, loaded: LoadedObject, batch: Batch) -> None:
        start = loaded.loaded_at_ns
        errors = loaded.error_counts()
        for name, bpf_map in loaded.own_maps().items():
            if "." in name:
                continue  # libbpf's own maps (<object>.rodata: read-only flags), not ours
            attrs = attributes(map=name)
            try:
                entries = bpf_map.count()  # None: the map cannot fill (arrays, local storage)
                capacity = bpf_map.max_entries
            except (LibbpfError, ValueError) as exc:
                self.log.debug("%s/%s: skipped: %s", loaded.name, name, exc)
                continue
            if entries is not None:
                batch.add(Point(MAP_ENTRIES, None, attrs, float(entries), None, start))
                batch.add(Point(MAP_CAPACITY, None, attrs, float(capacity), None, start))
            if name in errors:
                batch.add(Point(MAP_UPDATE_ERRORS, None, attrs, float(errors[name]), None, start))

    def status(self) -> dict[str, object]:
        return {"objects": [o.name for o in REGISTRY.objects()]}


factory = Factory(
    "bpf_maps",
    "receiver",
    EmptyConfig,
    BpfMapsReceiver,
    "eBPF map diagnostics: entries, capacity and in-kernel update errors per map",
    requires_bpf=True,
)
