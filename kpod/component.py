"""Component model, shaped like the OpenTelemetry Collector's.

A plugin is a `Factory`: a type name, a config dataclass (its defaults are the component's
default config; the config loader validates YAML against its fields), and `create`, which
builds the component from a `Context` and a validated config.  Factories are found through
the entry-point groups `kpod.receivers`, `kpod.processors` and `kpod.exporters`, built-in
ones included, so a third-party package adds a receiver the same way we do.

Lifecycle: `start` once, then `collect` / `process` / `export` per cycle, then `shutdown`.
`shutdown` must be idempotent and safe when `start` failed or never ran.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from kpod.model import Batch, CgroupRef, MetricDef

if TYPE_CHECKING:
    from kpod.selfmetrics import SelfMetrics
    from kpod.settings import KpodSettings
    from kpod.status import AgentStatus


class ComponentUnavailable(Exception):
    """A component cannot run on this node (no BTF, missing capability, no such file).

    The message is one line a user can act on; the agent logs it and runs on without it.
    """


class CgroupMountsView(Protocol):
    @property
    def unified(self) -> str | None: ...

    @property
    def v1(self) -> dict[str, str]: ...

    @property
    def layout(self) -> str: ...


class CycleReadsView(Protocol):
    def read_text(self, path: str, max_record: int = 0) -> str: ...

    def read(self, path: str, record: bool = False, max_record: int = 0) -> str: ...

    def read_kept(self, path: str) -> str: ...

    def read_kept_bytes(self, path: str) -> bytes: ...


class Cgroups(Protocol):
    """The cgroup index every component gets in its Context: kpod.cgroup.index.CgroupIndex,
    built by the agent.  The framework itself only begins cycles, refreshes it and asks which
    ids exist."""

    @property
    def root(self) -> str: ...

    @property
    def mounts(self) -> CgroupMountsView: ...

    @property
    def ebpf_unattributable(self) -> str:
        """Why eBPF events (cgroup2 ids) cannot be attributed to this tree's cgroups; "" if they can."""
        ...

    @property
    def reads(self) -> CycleReadsView: ...

    def new_cycle(self) -> None:
        """A cycle begins: files read once per cycle (reads) are read again from now."""
        ...

    def abspath(self, path: str) -> str: ...

    def refresh(self) -> None: ...

    def known_ids(self) -> set[int]: ...

    def walk_status(self) -> dict[str, Any]: ...

    def ref(self, cgroup_id: int) -> CgroupRef | None: ...

    def workloads(self) -> list[CgroupRef]: ...


@dataclass
class Context:
    """What the agent hands every component: settings and shared services."""

    id: str  # the component id, "type" or "type/name"
    settings: KpodSettings
    cgroups: Cgroups
    self_metrics: SelfMetrics
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("kpod"))
    # Readiness, cycle and receiver state, shared by the whole agent (None in unit tests).
    status: AgentStatus | None = None


class Component(ABC):  # noqa: B024 - the kinds below add the abstract methods
    def __init__(self, context: Context, config: Any) -> None:
        self.context = context
        self.config = config
        self.id = context.id
        self.log = context.logger.getChild(context.id)

    def start(self) -> None:  # noqa: B027 - optional hook
        """Acquire resources.  Raise ComponentUnavailable with a one-line reason if it can't run."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release everything `start` acquired.  Idempotent."""

    def status(self) -> dict[str, Any]:
        """Details for `kpod-metrics check` and /debug/status (routes, map fill levels...)."""
        return {}


class Receiver(Component):
    # The metrics this receiver can emit: drives docs and lets exporters pre-declare families.
    metrics: ClassVar[tuple[MetricDef, ...]] = ()

    @abstractmethod
    def collect(self) -> Batch:
        """Return a full snapshot of the current cumulative values and gauges."""

    def preflight(self) -> str | None:
        """Why this receiver cannot run here (one line), or None.  Must not change the system.

        `kpod-metrics check` calls it without starting the receiver.
        """
        return None

    def route(self) -> str:
        """How this receiver gets its data on this kernel (hooks or files), for `check`."""
        return ""


class Processor(Component):
    # True if `process` changes points in place: the pipeline then gives it a copy.
    mutates_data: ClassVar[bool] = False

    @abstractmethod
    def process(self, batch: Batch) -> Batch: ...


class Exporter(Component):
    mutates_data: ClassVar[bool] = False

    @abstractmethod
    def export(self, batch: Batch) -> None: ...


KIND_GROUPS = {
    "receiver": "kpod.receivers",
    "processor": "kpod.processors",
    "exporter": "kpod.exporters",
}


@dataclass(frozen=True)
class Factory:
    """Builds one type of component.  Exposed as an entry point: `type = "module:factory"`."""

    type: str
    kind: str  # "receiver" | "processor" | "exporter"
    config_class: type
    create: Callable[[Context, Any], Component]
    description: str = ""
    # eBPF receivers: left out of the profiles when `kpod.bpf.enabled` is false.
    requires_bpf: bool = False
    # For `kpod-metrics check`, optional: (KpodSettings, this component's config) -> [Finding].
    # It may ask a remote service once (the API server), and changes nothing.
    check: Callable[[Any, Any], list[Finding]] | None = None


@dataclass(frozen=True)
class Finding:
    """One line of `kpod-metrics check` about a component; a failure's text ends with its fix."""

    ok: bool
    text: str


@dataclass
class EmptyConfig:
    """Config for components that take no settings."""
