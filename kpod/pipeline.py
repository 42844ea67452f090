"""The running pipeline: components built from the config, started in order, driven in cycles.

Start order is exporters, processors, receivers (so nothing is produced before it can be
consumed); shutdown is the reverse.  Each cycle the receivers that are due collect (when, and
what happens when one fails or hangs, is kpod.scheduler's), the processors run in order, points
of one series are merged (kpod.model.merge_duplicates, through a SeriesMerger), the agent's own
metrics are added and every exporter gets the batch.
"""

from __future__ import annotations

import logging
import time

from kpod import __version__
from kpod.agentmetrics import bpf_map_fill, update_bpf_metrics, update_process_metrics
from kpod.component import Cgroups, Context, Exporter, Processor, Receiver
from kpod.config import AgentConfig, ComponentConfig
from kpod.model import Batch, Kind, MetricDef, SeriesMerger
from kpod.scheduler import ScheduledReceiver, Scheduler
from kpod.selfmetrics import SelfMetrics, parser_skips
from kpod.status import AgentStatus, ReceiverStatus

log = logging.getLogger("kpod.pipeline")

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
CGROUPS_UNREADABLE = MetricDef(
    "kpod.cgroups.unreadable", Kind.GAUGE, "1",
    "Cgroups the last walk of the tree could not list, by reason (errno name): their subtrees are in no receiver's "
    "data (examples in /debug/status).", ("reason",),
)  # fmt: skip
CGROUP_LONG_PATHS = MetricDef(
    "kpod.cgroup.long.paths", Kind.GAUGE, "1",
    "Cgroups whose path is past PATH_MAX (4096 bytes), walked and read through openat from a parent directory.",
)  # fmt: skip


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
        self.receivers: list[ScheduledReceiver] = []
        for spec in config.receivers:
            receiver: Receiver = self._create(spec)  # type: ignore[assignment]
            status_entry = self.status.receivers.setdefault(spec.id, ReceiverStatus())
            status_entry.details_source = receiver.status  # routes, map errors: in /debug/status
            interval = spec.interval.seconds if spec.interval else self.settings.poll_interval.seconds
            self.receivers.append(ScheduledReceiver(spec, receiver, status_entry, interval))
        # A gone cgroup's final counts must reach every receiver's batch at least once, and be
        # exported at least twice (a scrape between two cycles): keep it two slowest intervals.
        slowest = max((r.interval_s for r in self.receivers), default=self.settings.poll_interval.seconds)
        cgroups.gone_retention_s = max(self.settings.cgroup.gone_retention.seconds, 2 * slowest)
        self._started: list[Exporter | Processor] = []
        self._shut_down = False
        # The parsers count for the whole process; this pipeline reports what happens from now.
        self._parser_skips = parser_skips()
        self.status.discovery_failure_window_s = self.settings.discovery.failure_window.seconds
        # /debug/status: the tree the index walks, and why eBPF cannot attribute to it (one line).
        note = cgroups.ebpf_unattributable
        walked = f"{cgroups.mounts.layout}, walking {cgroups.root}"
        self.status.extra["cgroups"] = f"{walked}; {note}" if note else walked
        # /debug/status: what a user pastes into a bug report, computed when it is read.
        self.status.sections.update(
            exporters=lambda: {e.id: e.status() for e in self.exporters},
            processors=lambda: {p.id: p.status() for p in self.processors},
            bpf_maps=bpf_map_fill,
            pods_known=self.pods_known,
            cgroup_walk=self.cgroups.walk_status,
        )
        self._unreadable_reasons: set[str] = set()
        self._merge = SeriesMerger()
        self.scheduler = Scheduler(self.receivers, self.self_metrics)

    def pods_known(self) -> int | None:
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
        self.scheduler.start_all()

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
        """Collect from every due receiver (in a collecting thread, see kpod.scheduler), process, merge,
        export."""
        started = time.monotonic()
        if timeout_s is None:
            configured = self.settings.cycle_timeout.seconds
            timeout_s = configured or self.settings.poll_interval.seconds
        self.cgroups.new_cycle()
        self.cgroups.refresh()
        self._report_walk()
        self.scheduler.collect_due(started, timeout_s)

        # A receiver that was not due this cycle contributes its last batch; points of cgroups
        # that are gone since (not in this cycle's walk) leave the exposition now, not later.
        known = self.cgroups.known_ids()
        batch = Batch()
        for running in self.receivers:
            if running.started and running.last_batch is not None:
                # A list comprehension: a generator handed to extend() costs a resumption per point.
                batch.points += [p for p in running.last_batch.points if p.cgroup is None or p.cgroup.id in known]
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
        batch.points = self._merge(batch.points)
        self.self_metrics.set(SERIES.name, SERIES.description, len(batch))
        self.self_metrics.inc(CYCLES.name, CYCLES.description)
        self.self_metrics.set(LAST_CYCLE.name, LAST_CYCLE.description, time.time(), unit="s")
        self.scheduler.report_durations()
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


    def _report_walk(self) -> None:
        """The cgroup walk's own figures: what it could not list (by reason), what it reached
        only through openat (paths past PATH_MAX)."""
        walk = self.cgroups.walk_status()
        metrics = self.self_metrics
        metrics.set(CGROUP_LONG_PATHS.name, CGROUP_LONG_PATHS.description, float(walk.get("long_paths", 0)))
        unreadable: dict[str, int] = walk.get("unreadable", {})
        for reason in self._unreadable_reasons | set(unreadable):  # a reason that went away: 0, not stale
            count = float(unreadable.get(reason, 0))
            metrics.set(CGROUPS_UNREADABLE.name, CGROUPS_UNREADABLE.description, count, (("reason", reason),))
        self._unreadable_reasons |= set(unreadable)


def _quietly(action: object, component_id: str) -> None:
    try:
        action()  # type: ignore[operator]
    except Exception as error:
        log.warning("%s: shutdown failed: %s: %s", component_id, type(error).__name__, error)
