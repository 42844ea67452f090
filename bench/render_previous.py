"""The text renderer as it was before issue 18's rewrite (exporters/prometheus/exposition.py as
of 0eb6cfb), kept as a reference: bench/core.py renders each batch with it and with the current
renderer side by side, and tests/test_prometheus_exporter.py checks that both write the same
bytes.  The agent never uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import accumulate
from typing import TypeVar

from kpod.exporters.prometheus.naming import family_name, label_name, prometheus_name

from kpod.model import Attributes, Batch, HistogramValue, Kind, MetricDef, Point, Resource

K = TypeVar("K")  # a renderer's key for a series' labels


def utf8_label_value(value: str) -> str:
    """`value` as valid UTF-8: values from pods may carry bytes that are not UTF-8 (decoded with
    surrogateescape); they are replaced so that every exposition stays valid UTF-8."""
    if value.isascii():
        return value
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates that no decoder produced
        return value.encode("utf-8", "replace").decode("utf-8")


def escape_label_value(value: str) -> str:
    value = utf8_label_value(value)
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


class _Series:
    """What the renderer remembers of one series between cycles."""

    __slots__ = ("bounds", "chunk", "template", "value")

    def __init__(self, value: float | HistogramValue, chunk: bytes, template: bytes, bounds: tuple[float, ...]):
        self.value = value
        self.chunk = chunk
        self.template = template
        self.bounds = bounds


class Renderer:
    """Renders batches.  Caches across cycles what rarely changes: label strings, each
    histogram's text template, and the text of series whose value did not change (on a real
    node most histograms, idle syscalls and quiet sockets, are unchanged from cycle to cycle).
    Caches hold only what the last cycle used."""

    def __init__(self) -> None:
        # id(resource) -> (resource, its label text, {attributes: the series' label text}); the
        # resource is kept so that the id stays unique.
        self._heads: dict[int, tuple[Resource, str, dict[Attributes, str]]] = {}
        self._tails: dict[Attributes, str] = {}
        self._les_cache: dict[tuple[float, ...], list[str]] = {}
        self._series: dict[MetricDef, dict[str, _Series]] = {}

    def _labels(self, point: Point) -> str:
        """The series' label text.  The same string object for the same resource and attributes
        every cycle: its hash is computed once, and dict lookups compare by identity first."""
        resource = point.resource
        attrs = point.attributes
        if resource is not None:
            cached = self._heads.get(id(resource))
            if cached is None or cached[0] is not resource:
                cached = self._heads[id(resource)] = (resource, _pairs(resource.labels), {})
            if not attrs:
                return cached[1]
            joined = cached[2].get(attrs)
            if joined is None:
                joined = cached[2][attrs] = self._join(cached[1], attrs)
            return joined
        cgroup = point.cgroup
        # No enrichment processor in the pipeline: name the cgroup so series stay apart.
        head = _pairs((("cgroup", cgroup.path or str(cgroup.id)),)) if cgroup is not None else ""
        return self._join(head, attrs) if attrs else head

    def _join(self, head: str, attrs: Attributes) -> str:
        tail = self._tails.get(attrs)
        if tail is None:
            tail = self._tails[attrs] = _pairs(attrs)
        return f"{head},{tail}" if head else tail

    def _les(self, bounds: tuple[float, ...]) -> list[str]:
        les = self._les_cache.get(bounds)
        if les is None:
            les = self._les_cache[bounds] = [format_value(float(b)) for b in bounds] + ["+Inf"]
        return les

    def _histogram_template(self, family: str, labels: str, bounds: tuple[float, ...]) -> bytes:
        """The whole text of one histogram series with %d holes for the cumulative counts and
        the count, and %b for the sum: one bytes-format call renders a series."""
        escaped = labels.replace("%", "%%")
        head = f"{family}_bucket{{{escaped}," if labels else f"{family}_bucket{{"
        suffix = f"{{{escaped}}}" if labels else ""
        lines = [f'{head}le="{le}"}} %d\n' for le in self._les(bounds)]
        lines.append(f"{family}_sum{suffix} %b\n{family}_count{suffix} %d\n")
        return "".join(lines).encode()

    def render(self, batch: Batch) -> tuple[bytes, bytes, int]:
        """Render a batch as text 0.0.4 and as OpenMetrics 1.0: both bodies and the number of
        series (a histogram counts once)."""
        rendered = self.render_parts(batch)
        return rendered.text(), rendered.openmetrics(), rendered.series

    def render_parts(self, batch: Batch) -> Rendered:
        """Render a batch's samples once (the two formats differ only in their HELP/TYPE lines);
        each body is joined when asked for: a cycle scraped in one format pays one join of a
        body that is megabytes long."""
        text: list[bytes] = []
        openmetrics: list[bytes] = []
        previous = self._series
        current: dict[MetricDef, dict[str, _Series]] = {}
        series = 0
        for metric, points in families(batch, self._labels).items():
            family = family_name(metric)
            sample = prometheus_name(metric)
            histogram = metric.kind is Kind.HISTOGRAM
            help_text = escape_help(metric.description)
            text.append(f"# HELP {sample} {help_text}\n# TYPE {sample} {metric.kind.value}\n".encode())
            openmetrics.append(f"# HELP {family} {help_text}\n# TYPE {family} {metric.kind.value}\n".encode())
            first = len(text)
            append = text.append
            known = previous.get(metric, {})
            kept = current[metric] = {}
            for labels, value in points.items():
                if isinstance(value, HistogramValue) is not histogram:
                    continue  # a point whose value does not fit its metric's kind
                entry = known.get(labels)
                if entry is None:
                    if histogram:
                        bounds = value.bounds  # type: ignore[union-attr]
                        entry = _Series(value, b"", self._histogram_template(family, labels, bounds), bounds)
                        entry.chunk = _fill(entry.template, value)  # type: ignore[arg-type]
                    else:
                        # The series' line up to its value, kept: a new value only appends.
                        line = f"{sample}{{{labels}}} " if labels else f"{sample} "
                        entry = _Series(value, b"", line.encode(), ())
                        entry.chunk = _line(entry.template, value)  # type: ignore[arg-type]
                elif entry.value != value:
                    entry.value = value
                    if histogram:
                        bounds = value.bounds  # type: ignore[union-attr]
                        if entry.bounds != bounds:
                            entry.template, entry.bounds = self._histogram_template(family, labels, bounds), bounds
                        entry.chunk = _fill(entry.template, value)  # type: ignore[arg-type]
                    else:
                        entry.chunk = _line(entry.template, value)  # type: ignore[arg-type]
                kept[labels] = entry
                append(entry.chunk)
            series += len(kept)
            openmetrics.extend(text[first:])
        openmetrics.append(b"# EOF\n")
        self._series = current
        if len(self._heads) > series // 4 + 256:
            # Resources of gone cgroups (and the ones k8sattributes replaces when pods change)
            # would otherwise pile up here, ~1 KiB each, until the clear below: measured as the
            # agent's RSS creeping by 4.47 MiB over 1500 pod churn cycles (docs/perf/readings/soak.md).  Keep
            # the heads of this batch's resources; one pass over the points, once in a while.
            used = {id(point.resource) for point in batch.points if point.resource is not None}
            self._heads = {key: entry for key, entry in self._heads.items() if key in used}
        if len(self._heads) > 4 * series + 1000 or len(self._tails) > 4 * series + 1000:
            self._heads.clear()  # resources of gone cgroups
            self._tails.clear()
        return Rendered(text, openmetrics, series)


class Rendered:
    """One batch's text and OpenMetrics bodies as lists of chunks, joined when first asked for."""

    __slots__ = ("_bodies", "_parts", "series")

    def __init__(self, text: list[bytes], openmetrics: list[bytes], series: int) -> None:
        self._parts = {"text": text, "openmetrics": openmetrics}
        self._bodies: dict[str, bytes] = {}
        self.series = series

    def _body(self, fmt: str) -> bytes:
        body = self._bodies.get(fmt)
        if body is None:
            body = self._bodies[fmt] = b"".join(self._parts.pop(fmt))
        return body

    def text(self) -> bytes:
        return self._body("text")

    def openmetrics(self) -> bytes:
        return self._body("openmetrics")


def _line(prefix: bytes, value: float) -> bytes:
    if type(value) is int:
        return b"%s%d\n" % (prefix, value)
    return b"%s%s\n" % (prefix, format_value(value).encode())


def _fill(template: bytes, value: HistogramValue) -> bytes:
    buckets = len(value.bounds) + 1
    counts = value.counts
    if len(counts) != buckets:  # tolerate a short or long count tuple: pad or cut
        counts = (tuple(counts) + (0,) * buckets)[:buckets]
    cumulative = tuple(accumulate(counts))
    return template % (*cumulative, format_value(value.sum).encode(), cumulative[-1])


def families(batch: Batch, labels_of: Callable[[Point], K]) -> dict[MetricDef, dict[K, float | HistogramValue]]:
    """Group points by metric and labels (a renderer's encoding of them: text, protobuf).

    The pipeline hands over one point per series (kpod.model.merge_duplicates adds up a pod's
    sandbox and pod-level cgroups, which share one label set).  Should a batch repeat a series
    anyway, only its first point is rendered: Prometheus rejects a scrape that repeats one.
    """
    grouped: dict[MetricDef, dict[K, float | HistogramValue]] = {}
    for point in batch.points:
        series = grouped.get(point.metric)
        if series is None:
            series = grouped[point.metric] = {}
        series.setdefault(labels_of(point), point.value)
    return grouped
