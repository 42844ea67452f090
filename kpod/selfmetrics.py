"""The agent's own metrics (kpod_collection_errors_total{receiver}, kpod_series, ...).

Components count into one shared `SelfMetrics`; each cycle the pipeline appends its points
to the batch, so self-metrics travel through the exporters like any other point (with no
cgroup and no resource).  Names are the final Prometheus names: these are not the spec's
dotted kernel metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from kpod.model import Attributes, Kind, MetricDef, Point


@dataclass
class _Family:
    metric: MetricDef
    values: dict[Attributes, float]


class SelfMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._families: dict[str, _Family] = {}

    def _family(self, name: str, kind: Kind, unit: str, description: str, keys: tuple[str, ...]) -> _Family:
        family = self._families.get(name)
        if family is None:
            family = _Family(MetricDef(name, kind, unit, description, keys), {})
            self._families[name] = family
        return family

    def declare_counter(self, name: str, description: str, keys: tuple[str, ...] = (), unit: str = "1") -> None:
        with self._lock:
            self._family(name, Kind.COUNTER, unit, description, keys)

    def inc(self, name: str, description: str, labels: Attributes = (), amount: float = 1.0, unit: str = "1") -> None:
        with self._lock:
            family = self._family(name, Kind.COUNTER, unit, description, tuple(k for k, _ in labels))
            family.values[labels] = family.values.get(labels, 0.0) + amount

    def set(self, name: str, description: str, value: float, labels: Attributes = (), unit: str = "1") -> None:
        with self._lock:
            family = self._family(name, Kind.GAUGE, unit, description, tuple(k for k, _ in labels))
            family.values[labels] = value

    def set_counter(
        self, name: str, description: str, value: float, labels: Attributes = (), unit: str = "1"
    ) -> None:
        """Set a counter to a cumulative value read elsewhere (process CPU time from /proc)."""
        with self._lock:
            family = self._family(name, Kind.COUNTER, unit, description, tuple(k for k, _ in labels))
            family.values[labels] = value

    def forget(self, name: str, labels: Attributes) -> None:
        """Drop one series (a BPF program that was unloaded, an exporter that is gone)."""
        with self._lock:
            family = self._families.get(name)
            if family:
                family.values.pop(labels, None)

    def get(self, name: str, labels: Attributes = ()) -> float:
        with self._lock:
            family = self._families.get(name)
            return family.values.get(labels, 0.0) if family else 0.0

    def points(self) -> list[Point]:
        with self._lock:
            out: list[Point] = []
            for family in self._families.values():
                for labels, value in family.values.items():
                    out.append(Point(family.metric, None, labels, value))
            return out


# Lines of kernel, cgroup and /proc files the parsers skipped as malformed, by parser, since
# start; the pipeline exports the growth as kpod_parser_skipped_lines_total{parser}, so that a
# kernel whose format changed shows up as a rising counter instead of silently missing data.
# Updated from the receivers' threads without a lock: a dict increment under the GIL can at
# worst lose a concurrent increment, which a diagnostic counter can afford; a lock would cost
# every skip path more than it is worth.
_PARSER_SKIPS: dict[str, int] = {}


def count_parser_skip(parser: str, lines: int = 1) -> None:
    _PARSER_SKIPS[parser] = _PARSER_SKIPS.get(parser, 0) + lines


def parser_skips() -> dict[str, int]:
    """Lines skipped since start, by parser (a copy)."""
    return dict(_PARSER_SKIPS)


# Exporter self-metrics, shared by every exporter so that one dashboard covers them all.
# Dotted names: the Prometheus naming rule adds `_total` to the counters.
EXPORTER_SENT_POINTS = "kpod.exporter.sent.points"
EXPORTER_SENT_POINTS_HELP = "Points the exporter delivered (OTLP: acknowledged by the receiver; Prometheus: rendered)."
EXPORTER_FAILED_REQUESTS = "kpod.exporter.failed.requests"
EXPORTER_FAILED_REQUESTS_HELP = "Export requests that failed (every attempt, transient or permanent)."
EXPORTER_DROPPED_POINTS = "kpod.exporter.dropped.points"
EXPORTER_DROPPED_POINTS_HELP = (
    "Points that will never be delivered: queue full (oldest batch dropped), rejected by the receiver, or shutdown."
)
EXPORTER_QUEUE_BATCHES = "kpod.exporter.queue.batches"
EXPORTER_QUEUE_BATCHES_HELP = "Batches waiting in the exporter's queue (including one being retried)."


def declare_exporter_metrics(metrics: SelfMetrics, exporter_id: str) -> None:
    """Put the exporter's series at 0 from the start, so that rate() works from the first event."""
    labels = (("exporter", exporter_id),)
    for name, help_text in (
        (EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP),
        (EXPORTER_FAILED_REQUESTS, EXPORTER_FAILED_REQUESTS_HELP),
        (EXPORTER_DROPPED_POINTS, EXPORTER_DROPPED_POINTS_HELP),
    ):
        metrics.inc(name, help_text, labels, 0)
    metrics.set(EXPORTER_QUEUE_BATCHES, EXPORTER_QUEUE_BATCHES_HELP, 0, labels)
