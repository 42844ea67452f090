"""The running pipeline: components built from the config, started in order, driven in cycles.

Start order is exporters, processors, receivers (so nothing is produced before it can be
consumed); shutdown is the reverse.  A receiver that fails to start or to collect is logged
once per distinct reason, counted in kpod_collection_errors_total{receiver}, retried with
backoff, and never stops the others.  Receivers collect concurrently, each in its own daemon
thread, so one that hangs past the cycle timeout is abandoned (and not started again until it
returns) instead of blocking the cycle or the agent's exit.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from kpod import __version__
from kpod.agentmetrics import bpf_map_fill, update_bpf_metrics, update_process_metrics
from kpod.component import Cgroups, ComponentUnavailable, Context, Exporter, Processor, Receiver
from kpod.config import AgentConfig, ComponentConfig
from kpod.model import Batch, Kind, MetricDef, merge_duplicates
from kpod.selfmetrics import SelfMetrics, parser_skips
from kpod.status import AgentStatus, ReceiverStatus

log = logging.getLogger("kpod.pipeline")

COLLECTION_ERRORS = "kpod.collection.errors"
COLLECTION_ERRORS_HELP = "Receiver start or collection failures, by receiver."
COLLECTION_DURATION = MetricDef(
    "kpod.collection.duration", Kind.GAUGE, "s", "Duration of the receiver's last collection.", ("receiver",)
)
SERIES = MetricDef("kpod.series", Kind.GAUGE, "1", "Series in the last collection cycle.")
PARSER_SKIPPED = "kpod.parser.skipped.lines"
PARSER_SKIPPED_HELP = "Lines of kernel, cgroup and /proc files the parsers skipped as malformed, by parser."
BUILD_INFO = MetricDef("kpod.build.info", Kind.GAUGE, "1", "Agent version.", ("version",))
CYCLES = MetricDef("kpod.collection.cycles", Kind.COUNTER, "1", "Collection cycles completed.")
LAST_CYCLE = MetricDef(
    "kpod.collection.last.cycle.timestamp", Kind.GAUGE, "s", "Unix time at which the last collection cycle completed."
)
PROCESSOR_ERRORS = MetricDef(
    "kpod.processor.errors", Kind.COUNTER, "1", "Cycles not exported because a processor failed.", ("processor",)
)

MAX_BACKOFF_CYCLES = 32


@dataclass
class _RunningReceiver:
    spec: ComponentConfig
    receiver: Receiver
    status: ReceiverStatus
    interval_s: float
    started: bool = False
    next_due: float = 0.0  # monotonic time of the next collection or start attempt
    busy: threading.Event = field(default_factory=threading.Event)
    last_batch: Batch | None = None
    last_error: str = ""

    @property
    def id(self) -> str:
        return self.spec.id


class Pipeline:
    def __init__(
        self,
        config: AgentConfig,
        cgroups: Cgroups,
        self_metrics: SelfMetrics | None = None,
        status: AgentStatus | None = None,
    ) -> None:
        self.config = config
        self.settings = config.kpod
        self.cgroups = cgroups
        self.self_metrics = self_metrics or SelfMetrics()
        self.status = status or AgentStatus(config.kpod.profile, config.kpod.poll_interval.seconds)
        self.exporters: list[Exporter] = [self._create(spec) for spec in config.exporters]  # type: ignore[misc]
        self.processors: list[Processor] = [self._create(spec) for spec in config.processors]  # type: ignore[misc]
        self.receivers: list[_RunningReceiver] = []
        for spec in config.receivers:
            receiver: Receiver = self._create(spec)  # type: ignore[assignment]
            status_entry = self.status.receivers.setdefault(spec.id, ReceiverStatus())
            status_entry.details_source = receiver.status  # routes, map errors: in /debug/status
            interval = spec.interval.seconds if spec.interval else self.settings.poll_interval.seconds
            self.receivers.append(_RunningReceiver(spec, receiver, status_entry, interval))
        self._started: list[Exporter | Processor] = []
        self._shut_down = False
        # The parsers count for the whole process; this pipeline reports what happens from now.
        self._parser_skips = parser_skips()
        self.status.discovery_failure_window_s = self.settings.discovery.failure_window.seconds
        # /debug/status: what a user pastes into a bug report, computed when it is read.
        self.status.sections.update(
            exporters=lambda: {e.id: e.status() for e in self.exporters},
            processors=lambda: {p.id: p.status() for p in self.processors},
            bpf_maps=bpf_map_fill,
            pods_known=self._pods_known,
        )
        self.self_metrics.declare_counter(COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, ("receiver",))
        for running in self.receivers:
            # Present from the start at 0, so rate() works from the first error on.
            self.self_metrics.inc(COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, (("receiver", running.id),), 0)

    def _pods_known(self) -> int | None:
        """The pods a processor knows (k8sattributes says so in its status), if any does."""
        for processor in self.processors:
            pods = processor.status().get("pods")
            if isinstance(pods, int):
                return pods
        return None

    def _create(self, spec: ComponentConfig) -> Receiver | Processor | Exporter:
        context = Context(
            id=spec.id,
            settings=self.settings,
            cgroups=self.cgroups,
            self_metrics=self.self_metrics,
            logger=logging.getLogger("kpod"),
            status=self.status,
        )
        return spec.factory.create(context, spec.config)  # type: ignore[return-value]

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start exporters, then processors, then receivers.

        An exporter or processor that cannot start is fatal (the agent would export nothing or
        export wrong labels): the ones already started are shut down and the error propagates.
        A receiver that cannot start is not: it is reported and retried.
        """
        try:
            for component in [*self.exporters, *self.processors]:
                component.start()
                self._started.append(component)
        except Exception:
            self.shutdown()
            raise
        self.self_metrics.set(BUILD_INFO.name, BUILD_INFO.description, 1, (("version", __version__),))
        self.cgroups.refresh()
        for running in self.receivers:
            self._start_receiver(running)

    def _start_receiver(self, running: _RunningReceiver) -> None:
        running.status.route = _safe_route(running.receiver)
        try:
            running.receiver.start()
        except ComponentUnavailable as error:
            self._receiver_failed(running, str(error), state="unavailable")
            return
        except Exception as error:  # a plugin's bug must not stop the agent
            self._receiver_failed(running, f"start failed: {type(error).__name__}: {error}", state="failing")
            return
        running.started = True
        running.status.state = "running"
        running.status.reason = ""
        running.status.route = _safe_route(running.receiver)
        running.status.consecutive_failures = 0
        running.next_due = 0.0
        log.info("receiver %s started (%s)", running.id, running.status.route or "no route info")

    def _receiver_failed(self, running: _RunningReceiver, reason: str, state: str) -> None:
        status = running.status
        status.consecutive_failures += 1
        status.state = state
        status.reason = reason
        if reason != running.last_error:
            log.warning("receiver %s: %s", running.id, reason)
            running.last_error = reason
        self.self_metrics.inc(COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, (("receiver", running.id),))
        backoff = min(2 ** (status.consecutive_failures - 1), MAX_BACKOFF_CYCLES)
        running.next_due = time.monotonic() + backoff * running.interval_s

    def shutdown(self) -> None:
        """Reverse order: receivers, processors, exporters.  Idempotent; safe before start."""
        if self._shut_down:
            return
        self._shut_down = True
        for running in reversed(self.receivers):
            _quietly(running.receiver.shutdown, running.id)
        for component in reversed(self._started):
            _quietly(component.shutdown, component.id)

    # ------------------------------------------------------------------ cycles

    def run_cycle(self, timeout_s: float | None = None) -> Batch:
        """Collect from every due receiver (concurrently), process, export.  Never overlaps
        a receiver's previous collection."""
        started = time.monotonic()
        if timeout_s is None:
            configured = self.settings.cycle_timeout.seconds
            timeout_s = configured or self.settings.poll_interval.seconds
        self.cgroups.refresh()
        threads: list[tuple[_RunningReceiver, threading.Thread, dict[str, object]]] = []
        for running in self.receivers:
            if started < running.next_due or running.busy.is_set():
                continue
            if not running.started:
                self._start_receiver(running)
                if not running.started:
                    continue
            outcome: dict[str, object] = {}
            running.busy.set()
            thread = threading.Thread(
                target=self._collect_one, args=(running, outcome), name=f"collect-{running.id}", daemon=True
            )
            thread.start()
            threads.append((running, thread, outcome))
        deadline = started + timeout_s
        for running, thread, _ in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                # Abandoned: it keeps `busy` set until it returns, so it never runs twice at once.
                self._receiver_failed(running, f"collection timed out after {timeout_s:g}s", "failing")
                running.last_batch = None

        # A receiver that was not due this cycle contributes its last batch; points of cgroups
        # that are gone since (not in this cycle's walk) leave the exposition now, not later.
        known = self.cgroups.known_ids()
        batch = Batch()
        for running in self.receivers:
            if running.started and running.last_batch is not None:
                batch.extend(p for p in running.last_batch.points if p.cgroup is None or p.cgroup.id in known)
        for processor in self.processors:
            if processor.mutates_data:
                batch = batch.copy()
            try:
                batch = processor.process(batch)
            except Exception as error:
                # Exporting half-processed points (say, without the pod filter) would be worse
                # than keeping last cycle's exposition: skip this cycle's export, say why.
                reason = f"{type(error).__name__}: {error}"
                log.warning("processor %s failed, cycle not exported: %s", processor.id, reason)
                self.self_metrics.inc(
                    PROCESSOR_ERRORS.name, PROCESSOR_ERRORS.description, (("processor", processor.id),)
                )
                return batch
        # One point per series (a pod's sandbox and pod-level cgroups share one label set): the
        # one place duplicates are merged, so that both exporters see the same series.
        batch.points = merge_duplicates(batch.points)
        self.self_metrics.set(SERIES.name, SERIES.description, len(batch))
        self.self_metrics.inc(CYCLES.name, CYCLES.description)
        self.self_metrics.set(LAST_CYCLE.name, LAST_CYCLE.description, time.time(), unit="s")
        for running in self.receivers:
            if running.started:
                self.self_metrics.set(
                    COLLECTION_DURATION.name,
                    COLLECTION_DURATION.description,
                    running.status.last_duration_s,
                    (("receiver", running.id),),
                    unit="s",
                )
        update_process_metrics(self.self_metrics)
        update_bpf_metrics(self.self_metrics, self.receivers)
        for parser, total in parser_skips().items():
            delta = total - self._parser_skips.get(parser, 0)
            if delta > 0:
                labels = (("parser", parser),)
                self.self_metrics.inc(PARSER_SKIPPED, PARSER_SKIPPED_HELP, labels, delta)
                self._parser_skips[parser] = total
        batch.extend(self.self_metrics.points())
        for index, exporter in enumerate(self.exporters):
            # Exporters that change points get their own copy; the last one may take the original.
            shared = not exporter.mutates_data or index == len(self.exporters) - 1
            try:
                exporter.export(batch if shared else batch.copy())
            except Exception as error:
                log.warning("exporter %s: %s: %s", exporter.id, type(error).__name__, error)
        self.status.cycle_done()
        return batch

    def _collect_one(self, running: _RunningReceiver, outcome: dict[str, object]) -> None:
        began = time.monotonic()
        try:
            batch = running.receiver.collect()
        except Exception as error:
            reason = f"collect failed: {type(error).__name__}: {error}"
            self._receiver_failed(running, reason, "failing")
            running.last_batch = None
        else:
            now = time.monotonic()
            running.last_batch = batch
            running.status.last_duration_s = now - began
            running.status.last_collect_unix = time.time()
            running.status.state = "running"
            running.status.reason = ""
            running.status.consecutive_failures = 0
            running.last_error = ""
            running.next_due = began + running.interval_s - 0.05 * running.interval_s
        finally:
            running.busy.clear()


def _safe_route(receiver: Receiver) -> str:
    try:
        return receiver.route()
    except Exception as error:
        return f"unknown ({type(error).__name__}: {error})"


def _quietly(action: object, component_id: str) -> None:
    try:
        action()  # type: ignore[operator]
    except Exception as error:
        log.warning("%s: shutdown failed: %s: %s", component_id, type(error).__name__, error)
