"""pressure: PSI stall time per cgroup, from cgroup2 cpu.pressure, memory.pressure, io.pressure.

Each file has a `some` line (time at least one task of the cgroup was stalled on the resource)
and, for memory and io always and for cpu since 5.13, a `full` line (time all non-idle tasks
were stalled at once).  Both are exported from the cumulative `total=` (microseconds), as
counters in seconds:

    kpod.pressure.{cpu,memory,io}.waiting.seconds{kind="some"|"full"}

One metric per resource with a `kind` attribute, rather than separate `full` metrics, because
some and full are the same measurement at two strictness levels and are graphed together; a
`full` series exists only where the kernel writes the line.  The avg10/60/300 figures are not
exported: a rate over the counter gives any window.

PSI lives on cgroup2 even on hybrid hosts (a controller-less cgroup2 still accounts pressure),
so there is no v1 route.  A kernel booted with psi=0 has no pressure files: the receiver is
unavailable.
"""

from __future__ import annotations

from kpod.cgroup.files import CgroupFileReceiver, ParseMemo, read_text
from kpod.cgroup.parsers import parse_pressure_totals
from kpod.component import ComponentUnavailable, Context, EmptyConfig, Factory
from kpod.model import Attributes, Batch, Kind, MetricDef, Point

_KIND = ("kind",)
CPU = MetricDef(
    "kpod.pressure.cpu.waiting.seconds",
    Kind.COUNTER,
    "s",
    "Time tasks were stalled waiting for CPU (PSI)",
    _KIND,
)
MEMORY = MetricDef(
    "kpod.pressure.memory.waiting.seconds",
    Kind.COUNTER,
    "s",
    "Time tasks were stalled waiting for memory (PSI)",
    _KIND,
)
IO = MetricDef(
    "kpod.pressure.io.waiting.seconds",
    Kind.COUNTER,
    "s",
    "Time tasks were stalled waiting for I/O (PSI)",
    _KIND,
)

_FILES = (("/cpu.pressure", CPU), ("/memory.pressure", MEMORY), ("/io.pressure", IO))
_KINDS = {"some": (("kind", "some"),), "full": (("kind", "full"),)}


def pressure_values(text: str) -> tuple[tuple[Attributes, float], ...]:
    """(kind attributes, total stall in seconds) of each line of a *.pressure file."""
    return tuple((_KINDS[kind], total_usec / 1e6) for kind, total_usec in parse_pressure_totals(text).items())


class PressureReceiver(CgroupFileReceiver):
    metrics = (CPU, MEMORY, IO)

    def __init__(self, context: Context, config: EmptyConfig) -> None:
        super().__init__(context, config)
        self._values = ParseMemo(pressure_values)  # an idle cgroup's files print the same bytes

    def preflight(self) -> str | None:
        if self.context.cgroups.ebpf_unattributable:  # the pods' tree is a v1 hierarchy
            return "PSI files are cgroup2's, and the pods are only in cgroup v1 hierarchies"
        # The root cgroup has cpu.pressure whenever PSI is on; with psi=0 it is absent or
        # fails with EOPNOTSUPP.
        try:
            read_text(self.context.cgroups.abspath("/") + "/cpu.pressure")
        except OSError as err:
            return f"PSI is not available ({err.strerror}); boot with psi=1 (CONFIG_PSI)"
        return None

    def route(self) -> str:
        return "cpu/memory/io.pressure (cgroup2 PSI)"

    def start(self) -> None:
        reason = self.preflight()
        if reason:
            raise ComponentUnavailable(reason)

    def collect(self) -> Batch:
        batch = Batch()
        add = batch.points.append  # about 6 points per cgroup: skip the method lookup
        cgroups = self.context.cgroups
        read = cgroups.reads.read_kept_bytes  # each file kept open, read again from its start
        values = self._values
        values.new_cycle()
        for ref in cgroups.workloads():
            directory = cgroups.abspath(ref.path)
            for name, metric in _FILES:
                path = directory + name
                try:
                    data = read(path)
                except OSError as err:
                    self._failed(err, path, directory)
                    continue
                for attributes, seconds in values(data):
                    add(Point(metric, ref, attributes, seconds))
        return batch


factory = Factory(
    type="pressure",
    kind="receiver",
    config_class=EmptyConfig,
    create=lambda context, config: PressureReceiver(context, config),
    description="PSI stall time (some/full) per cgroup for cpu, memory and io",
)
