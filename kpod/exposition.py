"""Prometheus exposition, rendered once per collection cycle.

Pure functions over a Batch: the naming rule, label escaping, and the text (0.0.4) and
OpenMetrics (1.0) renderers.  The exporter keeps the rendered bytes (and their gzip) and
serves them, so a scrape never does collection or rendering work.

Naming rule, one for every metric: dots become underscores; a metric whose unit is seconds
ends in `_seconds`; a counter ends in `_total` (never doubled).  So kpod.cpu.runqueue.latency
(histogram, s) is kpod_cpu_runqueue_latency_seconds_bucket/_sum/_count, and
kpod.bpf.map.update.errors.total (counter) is kpod_bpf_map_update_errors_total.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from itertools import accumulate

from kpod.model import Attributes, Batch, HistogramValue, Kind, MetricDef, Point, Resource

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def family_name(metric: MetricDef) -> str:
    """The Prometheus name without the counter's `_total` (OpenMetrics' family name)."""
    name = _INVALID_NAME_CHARS.sub("_", metric.name.replace(".", "_"))
    if name.endswith("_total") and metric.kind is Kind.COUNTER:
        name = name[: -len("_total")]
    if metric.unit == "s" and not name.endswith("_seconds"):
        name += "_seconds"
    return name


def prometheus_name(metric: MetricDef) -> str:
    """The name of the metric's samples in the text format (counters end in _total)."""
    name = family_name(metric)
    return name + "_total" if metric.kind is Kind.COUNTER else name


def label_name(key: str) -> str:
    """A valid label name for an attribute key (k8s.pod.name -> k8s_pod_name)."""
    name = _INVALID_LABEL_CHARS.sub("_", key)
    return "_" + name if name[:1].isdigit() else name


def escape_label_value(value: str) -> str:
    if not value.isascii():
        # Values from pods may carry bytes that are not UTF-8 (decoded with surrogateescape):
        # replace them so the exposition stays valid UTF-8.
        try:
            value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        except UnicodeEncodeError:  # lone surrogates that no decoder produced
            value = value.encode("utf-8", "replace").decode("utf-8")
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if type(value) is int:
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _pairs(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{label_name(k)}="{escape_label_value(v)}"' for k, v in labels)


class Renderer:
    """Renders batches; caches label strings across cycles (labels of a series rarely change)."""

    MAX_CACHE = 200_000

    def __init__(self) -> None:
        self._resource_labels: dict[Resource | None, str] = {}
        self._attribute_labels: dict[Attributes, str] = {}
        self._bucket_bounds: dict[tuple[float, ...], list[str]] = {}
        # Series rendered last cycle: (metric, labels) -> (value, text); and bucket line
        # prefixes by (family, labels, bounds).  Both keep only what the last cycle used.
        self._rendered: dict[tuple[MetricDef, str], tuple[float | HistogramValue, bytes]] = {}
        self._prefixes: dict[tuple[str, str, tuple[float, ...]], list[str]] = {}
        self._next_prefixes: dict[tuple[str, str, tuple[float, ...]], list[str]] = {}

    def _labels(self, point: Point) -> str:
        resource = point.resource
        head = self._resource_labels.get(resource)
        if head is None:
            if resource is not None:
                head = _pairs(resource.labels)
            elif point.cgroup is not None:
                # No enrichment processor in the pipeline: name the cgroup so series stay apart.
                head = _pairs((("cgroup", point.cgroup.path or str(point.cgroup.id)),))
            else:
                head = ""
            if resource is not None:
                self._resource_labels[resource] = head
        attrs = point.attributes
        if not attrs:
            return head
        tail = self._attribute_labels.get(attrs)
        if tail is None:
            tail = _pairs(attrs)
            self._attribute_labels[attrs] = tail
        return f"{head},{tail}" if head else tail

    def _les(self, bounds: tuple[float, ...]) -> list[str]:
        les = self._bucket_bounds.get(bounds)
        if les is None:
            les = [format_value(float(b)) for b in bounds] + ["+Inf"]
            self._bucket_bounds[bounds] = les
        return les

    def trim(self) -> None:
        if len(self._resource_labels) + len(self._attribute_labels) > self.MAX_CACHE:
            self._resource_labels.clear()
            self._attribute_labels.clear()

    def _bucket_prefixes(self, family: str, labels: str, bounds: tuple[float, ...]) -> list[str]:
        key = (family, labels, bounds)
        prefixes = self._prefixes.get(key)
        if prefixes is None:
            head = f"{family}_bucket{{{labels}," if labels else f"{family}_bucket{{"
            prefixes = [f'{head}le="{le}"}} ' for le in self._les(bounds)]
        self._next_prefixes[key] = prefixes
        return prefixes

    def _histogram(self, family: str, labels: str, value: HistogramValue) -> bytes:
        prefixes = self._bucket_prefixes(family, labels, value.bounds)
        cumulative = list(accumulate(value.counts[: len(prefixes)]))
        cumulative += [cumulative[-1] if cumulative else 0] * (len(prefixes) - len(cumulative))
        suffix = f"{{{labels}}}" if labels else ""
        buckets = "\n".join([p + str(c) for p, c in zip(prefixes, cumulative, strict=True)])
        tail = f"\n{family}_sum{suffix} {format_value(value.sum)}\n{family}_count{suffix} {cumulative[-1]}\n"
        return (buckets + tail).encode()

    def render(self, batch: Batch) -> tuple[bytes, bytes, int]:
        """Render a batch as text 0.0.4 and as OpenMetrics 1.0 (samples are rendered once;
        only the HELP/TYPE lines differ).  Returns both bodies and the number of series
        (a histogram counts once).

        A series whose value did not change since the last render reuses its text: on a real
        node most histograms (idle syscalls, quiet sockets) are unchanged from cycle to cycle.
        """
        text: list[bytes] = []
        openmetrics: list[bytes] = []
        series = 0
        previous = self._rendered
        rendered: dict[tuple[MetricDef, str], tuple[float | HistogramValue, bytes]] = {}
        self._next_prefixes = {}
        for metric, points in _merged_families(batch, self._labels).items():
            family = family_name(metric)
            sample = prometheus_name(metric)
            kind = metric.kind
            help_text = escape_help(metric.description)
            body: list[bytes] = []
            append = body.append
            histogram = kind is Kind.HISTOGRAM
            for labels, value in points.items():
                if isinstance(value, HistogramValue) is not histogram:
                    continue  # a point whose value does not fit its metric's kind
                series += 1
                key = (metric, labels)
                cached = previous.get(key)
                if cached is not None and cached[0] == value:
                    chunk = cached[1]
                    if histogram:  # keep its bucket prefixes alive for the next cycle
                        self._bucket_prefixes(family, labels, value.bounds)  # type: ignore[union-attr]
                elif histogram:
                    chunk = self._histogram(family, labels, value)  # type: ignore[arg-type]
                elif labels:
                    chunk = f"{sample}{{{labels}}} {format_value(value)}\n".encode()  # type: ignore[arg-type]
                else:
                    chunk = f"{sample} {format_value(value)}\n".encode()  # type: ignore[arg-type]
                rendered[key] = (value, chunk)
                append(chunk)
            samples = b"".join(body)
            text.append(f"# HELP {sample} {help_text}\n# TYPE {sample} {kind.value}\n".encode())
            text.append(samples)
            openmetrics.append(f"# HELP {family} {help_text}\n# TYPE {family} {kind.value}\n".encode())
            openmetrics.append(samples)
        openmetrics.append(b"# EOF\n")
        self._rendered = rendered
        self._prefixes = self._next_prefixes
        self.trim()
        return b"".join(text), b"".join(openmetrics), series


def _merged_families(batch: Batch, labels_of: object) -> dict[MetricDef, dict[str, float | HistogramValue]]:
    """Group points by metric and label string.

    Two cgroups can carry the same labels (a pod's sandbox cgroup and its pod-level cgroup are
    both container=""); Prometheus rejects duplicate series, so counters and histograms of such
    cgroups are added up and the last gauge wins.
    """
    families: dict[MetricDef, dict[str, float | HistogramValue]] = {}
    labels_fn = labels_of  # a bound method; kept local for speed
    for point in batch.points:
        series = families.get(point.metric)
        if series is None:
            series = families[point.metric] = {}
        key = labels_fn(point)  # type: ignore[operator]
        previous = series.get(key)
        if previous is None or point.metric.kind is Kind.GAUGE:
            series[key] = point.value
        else:
            series[key] = _add(previous, point.value)
    return families


def _add(a: float | HistogramValue, b: float | HistogramValue) -> float | HistogramValue:
    if isinstance(a, HistogramValue) and isinstance(b, HistogramValue):
        if a.bounds != b.bounds:
            return a
        width = max(len(a.counts), len(b.counts))
        counts = tuple(
            (a.counts[i] if i < len(a.counts) else 0) + (b.counts[i] if i < len(b.counts) else 0)
            for i in range(width)
        )
        return HistogramValue(a.bounds, counts, a.sum + b.sum)
    if isinstance(a, HistogramValue) or isinstance(b, HistogramValue):
        return a
    return a + b
