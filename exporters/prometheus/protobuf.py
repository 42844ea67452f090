"""The Prometheus protobuf exposition, rendered once per collection cycle.

A pure renderer over a Batch, like exposition.py: a sequence of varint-delimited
`io.prometheus.client.MetricFamily` messages (Prometheus' client_model metrics.proto, proto2),
content type PROTOBUF_CONTENT_TYPE.  It is the only exposition that carries native histograms,
and the one Prometheus asks for first when native histograms are on (2.40-3.7:
`--enable-feature=native-histograms`; 3.8+: `scrape_native_histograms: true`).

The messages are written byte by byte here rather than through generated classes: the protobuf
runtime is only a dependency of the OTLP exporter, the message is small and fixed, and a
series whose value did not change is reused as bytes from the previous cycle.  Tests decode the
output with classes protoc generates from metrics.proto (tests/proto/), never with this module.

Histograms: the kernel buckets at powers of two seconds (bpf/kpod.bpf.h), so each bucket is
exactly one native schema-0 bucket, (2^(i-1), 2^i]: the first bucket (up to the first bound) is
the zero bucket with that bound as zero_threshold, and the +Inf bucket (above the last finite
bound) is counted in the native bucket just above it, the one place native buckets say less
than the classic ones (docs/METRICS.md).  A histogram whose bounds are not consecutive powers of
two has no native form and keeps its classic buckets whatever the setting.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate
from struct import Struct

from kpod.exporters.prometheus.exposition import families, utf8_label_value
from kpod.exporters.prometheus.naming import label_name, prometheus_name
from kpod.exporters.protowire import SMALL, field, varint, zigzag

from kpod.model import Batch, HistogramValue, Kind, MetricDef, Point, Resource, base2_exponent

PROTOBUF_CONTENT_TYPE = (
    "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"
)

# The `histograms` setting: which buckets a histogram carries in this exposition.
CLASSIC, NATIVE, BOTH = "classic", "native", "both"

# MetricType enum of metrics.proto.
_TYPES = {Kind.COUNTER: 0, Kind.GAUGE: 1, Kind.HISTOGRAM: 4}
_pack_double = Struct("<d").pack
_small = SMALL


def _field_bytes(number: int, data: bytes) -> bytes:
    """A length-delimited field."""
    return field(number << 3 | 2, data)


def _label_pairs(labels: Iterable[tuple[str, str]]) -> bytes:
    """Metric.label (field 1) for each pair: LabelPair {name = 1, value = 2}."""
    out = []
    for key, value in labels:
        pair = _field_bytes(1, label_name(key).encode()) + _field_bytes(2, utf8_label_value(value).encode())
        out.append(_field_bytes(1, pair))
    return b"".join(out)


def native_indexes(bounds: tuple[float, ...]) -> int | None:
    """The schema-0 index of the first finite bucket after the zero bucket, (bounds[0],
    bounds[1]], when the bounds are consecutive powers of two (kpod.model.base2_exponent);
    bucket k >= 1 is index first + k - 1.  None when the histogram has no native form."""
    exponent = base2_exponent(bounds)
    return None if exponent is None else exponent + 1


# Classic buckets are the bulk of a histogram (one Bucket message per bound) and Python is slow
# at varints, so all of a histogram's Bucket messages are made at once, with integer arithmetic
# over the whole run: each cumulative count is written as a varint of a fixed width (protobuf
# decoders take varints longer than needed: the value is what counts, up to 10 bytes), so the
# counts can be packed into fixed slots and spread into 7-bit groups by a few big-integer ANDs,
# shifts and ORs, whatever the number of buckets.  4-byte varints hold counts below 2^28,
# 8-byte ones below 2^56; larger ones (never seen) take the slow path.


class _ClassicLayout:
    """What every histogram with these bounds shares: the fixed bytes, the packing, the masks,
    for varints of `width` bytes."""

    __slots__ = ("fixed", "limit", "masks", "pack", "size")

    def __init__(self, bounds: tuple[float, ...], width: int) -> None:
        count_at = 3  # tag, length, tag, then the count
        bucket = count_at + width + 9  # ..., tag, double
        fixed = bytearray()
        for bound in bounds:
            varint_bytes = b"\x80" * (width - 1) + b"\x00"
            fixed += bytes((0x1A, bucket - 2, 0x08)) + varint_bytes + b"\x11" + _pack_double(bound)
        self.fixed = int.from_bytes(fixed, "little")
        self.size = len(fixed)
        self.limit = 1 << (7 * width)
        slot = f"{count_at}x{'I' if width == 4 else 'Q'}{bucket - count_at - width}x"
        self.pack = Struct("<" + slot * len(bounds)).pack
        # Group k (bits 7k..7k+6 of a count) moves up by k bits, into byte k of its varint.
        self.masks = []
        for k in range(width):
            mask = 0
            for slot in range(len(bounds)):
                mask |= 0x7F << (7 * k + 8 * (slot * bucket + count_at))
            self.masks.append(mask)

    def buckets(self, cumulative: Iterable[int]) -> bytes:
        """The Bucket messages of cumulative counts in [0, limit)."""
        packed = int.from_bytes(self.pack(*cumulative), "little")
        masks = self.masks
        if len(masks) == 4:  # unrolled: the common case, counts below 2^28
            out = self.fixed | packed & masks[0] | (packed & masks[1]) << 1
            out |= (packed & masks[2]) << 2 | (packed & masks[3]) << 3
        else:
            out = self.fixed
            for k, mask in enumerate(masks):
                out |= (packed & mask) << k
        return out.to_bytes(self.size, "little")


def _classic_slow(bounds: tuple[float, ...], cumulative: Iterable[int]) -> bytes:
    parts = []
    for bound, count in zip(bounds, cumulative, strict=False):
        bucket = b"\x08" + varint(count) + b"\x11" + _pack_double(bound)
        parts.append(b"\x1a" + varint(len(bucket)) + bucket)
    return b"".join(parts)


def _native(first: int, counts: tuple[int, ...], low: int, high: int) -> bytes:
    """positive_span (12) and positive_delta (13, packed) of native buckets: counts[k] is index
    first + k - 1.  One span from the first non-empty bucket (low) to the last (high - 1), the
    empty ones between them as zero counts (kernel histograms are rarely sparse inside their
    range, and a zero delta costs one byte where a new span costs four)."""
    if low >= high:
        return b""
    small = _small
    deltas = []
    previous = 0
    for k in range(low, high):
        count = counts[k]
        delta = count - previous
        previous = count
        zig = delta << 1 if delta >= 0 else (-delta << 1) - 1
        deltas.append(small[zig] if zig < 0x4000 else varint(zig))
    packed = b"".join(deltas)
    span = b"\x08" + varint(zigzag(first + low - 1)) + b"\x10" + varint(high - low)
    return b"\x62" + small[len(span)] + span + b"\x6a" + varint(len(packed)) + packed


def histogram_message(
    value: HistogramValue, mode: str, first: int | None, layouts: tuple[_ClassicLayout, _ClassicLayout] | None = None
) -> bytes:
    """The Histogram message of one series (without its field tag); `first` is
    native_indexes(value.bounds), `layouts` the bounds' 4- and 8-byte _ClassicLayouts (made
    here if None).  Written with as few Python containers as it can: a render makes thousands of
    these, and every container allocated brings the next garbage collection closer."""
    bounds = value.bounds
    counts = value.counts
    buckets = len(bounds) + 1
    if len(counts) != buckets:  # tolerate a short or long count tuple: pad or cut
        counts = (tuple(counts) + (0,) * buckets)[:buckets]
    total = sum(counts)
    head = b"\x08" + varint(total) + b"\x11" + _pack_double(value.sum)
    if mode == CLASSIC:
        first = None
    classic = b""
    if (mode != NATIVE or first is None) and bounds:
        # Classic buckets, cumulative, inclusive upper bounds; the +Inf bucket is sample_count.
        if layouts is None:
            layouts = (_ClassicLayout(bounds, 4), _ClassicLayout(bounds, 8))
        layout = layouts[0] if total < layouts[0].limit else layouts[1]
        if total < layout.limit and min(counts) >= 0:  # every cumulative count fits the varints
            classic = layout.buckets(accumulate(counts[:-1]))
        else:
            classic = _classic_slow(bounds, accumulate(counts))
    if first is None:
        return head + classic
    # schema 0, zero_threshold, zero_count, then the positive buckets: counts[1:-1] are indexes
    # first.., and the +Inf bucket's count goes into the index just above them.
    low, high = 1, buckets
    while low < high and not counts[low]:
        low += 1
    while high > low and not counts[high - 1]:
        high -= 1
    native = b"\x28\x00\x31" + _pack_double(bounds[0]) + b"\x38" + varint(counts[0])
    return head + classic + native + _native(first, counts, low, high)


class _Entry:
    """A series' last value and its Metric field."""

    __slots__ = ("chunk", "value")

    def __init__(self, value: float | HistogramValue, chunk: bytes) -> None:
        self.value = value
        self.chunk = chunk


class ProtobufRenderer:
    """Renders batches as the protobuf exposition.  Caches, as the text renderer does, each
    resource's encoded labels and the bytes of series whose value did not change; the caches
    hold only what the last cycle used."""

    def __init__(self, histograms: str = BOTH) -> None:
        if histograms not in (CLASSIC, NATIVE, BOTH):
            raise ValueError(f"histograms: expected classic, native or both, got {histograms!r}")
        self.histograms = histograms
        # id(resource) -> (resource, its encoded labels, {attributes: the series' labels})
        self._heads: dict[int, tuple[Resource, bytes, dict[tuple[tuple[str, str], ...], bytes]]] = {}
        self._tails: dict[tuple[tuple[str, str], ...], bytes] = {}
        self._families: dict[MetricDef, bytes] = {}
        self._series: dict[MetricDef, dict[bytes, _Entry]] = {}
        # id(bounds) -> (bounds, native_indexes(bounds), 4- and 8-byte _ClassicLayouts); bounds
        # are shared tuples (one per receiver), so this holds a handful of entries.
        self._layouts: dict[int, tuple[tuple[float, ...], int | None, tuple[_ClassicLayout, _ClassicLayout]]] = {}

    def _layout(
        self, bounds: tuple[float, ...]
    ) -> tuple[tuple[float, ...], int | None, tuple[_ClassicLayout, _ClassicLayout]]:
        cached = self._layouts.get(id(bounds))
        if cached is None or cached[0] is not bounds:
            if len(self._layouts) > 64:
                self._layouts.clear()
            layouts = (_ClassicLayout(bounds, 4), _ClassicLayout(bounds, 8))
            cached = self._layouts[id(bounds)] = (bounds, native_indexes(bounds), layouts)
        return cached

    def _labels(self, point: Point) -> bytes:
        """The series' encoded labels: the same bytes object for the same resource and
        attributes every cycle (see the text Renderer)."""
        resource = point.resource
        attrs = point.attributes
        if resource is not None:
            cached = self._heads.get(id(resource))
            if cached is None or cached[0] is not resource:
                cached = self._heads[id(resource)] = (resource, _label_pairs(resource.labels), {})
            if not attrs:
                return cached[1]
            joined = cached[2].get(attrs)
            if joined is None:
                joined = cached[2][attrs] = cached[1] + self._tail(attrs)
            return joined
        cgroup = point.cgroup
        # No enrichment processor in the pipeline: name the cgroup so series stay apart.
        head = _label_pairs((("cgroup", cgroup.path or str(cgroup.id)),)) if cgroup is not None else b""
        return head + self._tail(attrs) if attrs else head

    def _tail(self, attrs: tuple[tuple[str, str], ...]) -> bytes:
        tail = self._tails.get(attrs)
        if tail is None:
            tail = self._tails[attrs] = _label_pairs(attrs)
        return tail

    def _family_head(self, metric: MetricDef) -> bytes:
        head = self._families.get(metric)
        if head is None:
            head = (
                _field_bytes(1, prometheus_name(metric).encode())
                + _field_bytes(2, metric.description.encode("utf-8", "replace"))
                + b"\x18"
                + varint(_TYPES[metric.kind])
            )
            self._families[metric] = head
        return head

    def render(self, batch: Batch) -> tuple[bytes, int]:
        """The delimited MetricFamily messages of a batch and the number of series."""
        out: list[bytes] = []
        previous = self._series
        current: dict[MetricDef, dict[bytes, _Entry]] = {}
        mode = self.histograms
        series = 0
        for metric, points in families(batch, self._labels).items():
            kind = metric.kind
            if kind not in _TYPES:
                continue
            histogram = kind is Kind.HISTOGRAM
            # Counter (3) or Gauge (2), each {value (1): double}: a fixed 11 bytes after the labels.
            scalar_tag = b"\x1a\x09\x09" if kind is Kind.COUNTER else b"\x12\x09\x09"
            known = previous.get(metric, {})
            kept: dict[bytes, _Entry] = {}
            chunks: list[bytes] = []
            for labels, value in points.items():
                if isinstance(value, HistogramValue) is not histogram:
                    continue  # a point whose value does not fit its metric's kind
                entry = known.get(labels)
                if entry is None or entry.value != value:
                    if histogram:
                        _, first, layouts = self._layout(value.bounds)  # type: ignore[union-attr]
                        body = histogram_message(value, mode, first, layouts)  # type: ignore[arg-type]
                        metric_bytes = labels + b"\x3a" + varint(len(body)) + body
                        chunk = b"\x22" + varint(len(metric_bytes)) + metric_bytes
                    else:
                        # A scalar Metric has a fixed length: 11 bytes after its labels.
                        chunk = b"\x22" + varint(len(labels) + 11) + labels + scalar_tag + _pack_double(value)  # type: ignore[arg-type]
                    if entry is None:
                        entry = _Entry(value, chunk)
                    else:  # changed in place: no allocation per changed series
                        entry.value, entry.chunk = value, chunk
                kept[labels] = entry
                chunks.append(entry.chunk)
            if not chunks:
                continue
            current[metric] = kept
            series += len(kept)
            body = self._family_head(metric) + b"".join(chunks)
            out.append(varint(len(body)) + body)
        self._series = current
        # Resources of gone cgroups must not pile up here (see the text Renderer).
        if len(self._heads) > series // 4 + 256:
            used = {id(point.resource) for point in batch.points if point.resource is not None}
            self._heads = {key: entry for key, entry in self._heads.items() if key in used}
        if len(self._tails) > 4 * series + 1000:
            self._tails.clear()
        return b"".join(out), series
