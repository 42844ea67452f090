"""The Prometheus protobuf exposition, rendered once per collection cycle.

A pure renderer over a Batch, like exposition.py: a sequence of varint-delimited
`io.prometheus.client.MetricFamily` messages (Prometheus' client_model metrics.proto, proto2),
content type PROTOBUF_CONTENT_TYPE.  It is the only exposition that carries native histograms,
and the one Prometheus asks for first when native histograms are on (2.40-3.7:
`--enable-feature=native-histograms`; 3.8+: `scrape_native_histograms: true`).

The messages are written byte by byte here rather than through generated classes: the protobuf
runtime is only a dependency of the OTLP exporter, the message is small and fixed, a counter or
gauge family is one struct pack() of its kept layout, and a histogram series whose value did not
change is reused as bytes from the previous cycle.  Tests decode the
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
from itertools import accumulate, chain
from operator import add
from struct import Struct

from kpod.exporters.prometheus.exposition import utf8_label_value
from kpod.exporters.prometheus.labels import LabelCache, group
from kpod.exporters.prometheus.naming import label_name, prometheus_name
from kpod.exporters.protowire import SMALL, field, varint, zigzag

from kpod.model import Batch, HistogramValue, Kind, MetricDef, base2_exponent

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
    """A histogram series' last value and its Metric field."""

    __slots__ = ("chunk", "value")

    def __init__(self, value: HistogramValue, chunk: bytes) -> None:
        self.value = value
        self.chunk = chunk


class _Scalars:
    """What the renderer keeps of a counter or gauge family between cycles: its series' labels,
    in order, each series' Metric field up to its value (`prefixes`: a scalar Metric is its
    labels and an 11-byte Counter or Gauge of one double), and one Struct that writes them all
    with the values between them, so that a family is one pack() call."""

    __slots__ = ("labels", "pack", "pieces")

    def __init__(self, labels: list[bytes], pieces: dict[bytes, bytes]) -> None:
        self.labels = labels
        self.pieces = pieces
        self.pack = Struct("<" + "".join(f"{len(piece)}sd" for piece in pieces.values())).pack

    @staticmethod
    def rebuilt(previous: _Scalars | None, labels: list[bytes], tag: bytes) -> _Scalars:
        known = previous.pieces if previous is not None else {}
        pieces = {}
        for series in labels:
            piece = known.get(series)
            pieces[series] = piece if piece is not None else _scalar_prefix(series, tag)
        return _Scalars(labels, pieces)


def _scalar_prefix(labels: bytes, tag: bytes) -> bytes:
    # A scalar Metric has a fixed length: 11 bytes after its labels.
    return b"\x22" + varint(len(labels) + 11) + labels + tag


_PACKED_TYPES = {int, float}  # what struct's "d" takes as Python does float()


class ProtobufRenderer:
    """Renders batches as the protobuf exposition.  Caches, as the text renderer does, each
    series' encoded labels (labels.py), a counter or gauge family's layout and the bytes of
    histogram series whose value did not change; the caches hold only what the last cycle
    used."""

    def __init__(self, histograms: str = BOTH) -> None:
        if histograms not in (CLASSIC, NATIVE, BOTH):
            raise ValueError(f"histograms: expected classic, native or both, got {histograms!r}")
        self.histograms = histograms
        self._labels = LabelCache(_label_pairs, add)
        self._heads: dict[MetricDef, bytes] = {}
        self._scalars: dict[MetricDef, _Scalars] = {}
        self._histograms: dict[MetricDef, dict[bytes, _Entry]] = {}
        # id(bounds) -> its _Layout; bounds are shared tuples (one per receiver), so this holds a
        # handful of entries.
        self._layouts: dict[int, _Layout] = {}

    def _layout(self, bounds: tuple[float, ...]) -> _Layout:
        layout = self._layouts.get(id(bounds))
        if layout is None or layout.bounds is not bounds:
            if len(self._layouts) > 64:
                self._layouts.clear()
            layout = self._layouts[id(bounds)] = _Layout(bounds)
        return layout

    def _family_head(self, metric: MetricDef) -> bytes:
        head = self._heads.get(metric)
        if head is None:
            head = (
                _field_bytes(1, prometheus_name(metric).encode())
                + _field_bytes(2, metric.description.encode("utf-8", "replace"))
                + b"\x18"
                + varint(_TYPES[metric.kind])
            )
            self._heads[metric] = head
        return head

    def render(self, batch: Batch) -> tuple[bytes, int]:
        """The delimited MetricFamily messages of a batch and the number of series."""
        out: list[bytes] = []
        previous_scalars, previous_histograms = self._scalars, self._histograms
        scalars: dict[MetricDef, _Scalars] = {}
        histograms: dict[MetricDef, dict[bytes, _Entry]] = {}
        series = 0
        for metric, points in group(batch, self._labels).items():
            kind = metric.kind
            if kind not in _TYPES:
                continue
            if kind is Kind.HISTOGRAM:
                kept = histograms[metric] = {}
                body = self._histogram_family(points, previous_histograms.get(metric, {}), kept)
                count = len(kept)
            else:
                # Counter (3) or Gauge (2), each {value (1): double}.
                tag = b"\x1a\x09\x09" if kind is Kind.COUNTER else b"\x12\x09\x09"
                family, body, count = self._scalar_family(points, previous_scalars.get(metric), tag)
                if family is not None:
                    scalars[metric] = family
            if not count:
                continue
            series += count
            body = self._family_head(metric) + body
            out.append(varint(len(body)) + body)
        self._scalars, self._histograms = scalars, histograms
        self._labels.prune(batch, series)
        return b"".join(out), series

    @staticmethod
    def _scalar_family(
        points: dict[bytes, float | HistogramValue], previous: _Scalars | None, tag: bytes
    ) -> tuple[_Scalars | None, bytes, int]:
        """A counter or gauge family's Metric fields, what to keep of it and its number of
        series.  Values that are histograms are left out, and such a family is encoded series by
        series and not kept."""
        values = tuple(points.values())
        if set(map(type, values)) <= _PACKED_TYPES:
            labels = list(points)
            if previous is None or previous.labels != labels:  # identity first: labels.py
                previous = _Scalars.rebuilt(previous, labels, tag)
            numbers = chain.from_iterable(zip(previous.pieces.values(), values, strict=True))
            return previous, previous.pack(*numbers), len(values)
        chunks = [
            _scalar_prefix(series, tag) + _pack_double(value)  # type: ignore[arg-type]
            for series, value in points.items()
            if not isinstance(value, HistogramValue)
        ]
        return None, b"".join(chunks), len(chunks)

    def _histogram_family(
        self, points: dict[bytes, float | HistogramValue], known: dict[bytes, _Entry], kept: dict[bytes, _Entry]
    ) -> bytes:
        """A histogram family's Metric fields: each series' kept bytes if its value did not
        change (kernel histograms are sparse: most of them do not change from one cycle to the
        next on a real node), else its message anew.  Values that are not histograms are left
        out.  The common case (counts below 2^28, one count per bucket) is written out here; the
        rest goes through histogram_message()."""
        mode = self.histograms
        classic_wanted = mode != NATIVE
        chunks = []
        append = chunks.append
        known_get = known.get
        layout: _Layout | None = None
        for labels, value in points.items():
            entry = known_get(labels)
            if value.__class__ is not HistogramValue and not isinstance(value, HistogramValue):
                continue  # a point whose value does not fit its metric's kind
            bounds, counts = value.bounds, value.counts  # type: ignore[union-attr]
            if entry is not None:
                last = entry.value
                if last.counts == counts and last.sum == value.sum and last.bounds == bounds:  # type: ignore[union-attr]
                    kept[labels] = entry
                    append(entry.chunk)
                    continue
            if layout is None or layout.bounds is not bounds:
                layout = self._layout(bounds)
            total = sum(counts)
            first = layout.first if mode != CLASSIC else None
            if len(counts) != layout.buckets or total >= _LIMIT_4 or not bounds or min(counts) < 0:
                body = histogram_message(value, mode, first, layout.classic)  # type: ignore[arg-type]
            else:
                body = _histogram_common(layout, counts, total, value.sum, classic_wanted or first is None, first)  # type: ignore[union-attr]
            metric_bytes = labels + b"\x3a" + varint(len(body)) + body
            chunk = b"\x22" + varint(len(metric_bytes)) + metric_bytes
            if entry is None:
                kept[labels] = _Entry(value, chunk)  # type: ignore[arg-type]
            else:  # changed in place: no allocation per changed series
                entry.value, entry.chunk = value, chunk  # type: ignore[assignment]
                kept[labels] = entry
            append(chunk)
        return b"".join(chunks)


def _histogram_common(
    layout: _Layout, counts: tuple[int, ...], total: int, total_sum: float, classic: bool, first: int | None
) -> bytes:
    """histogram_message() of the common case: one count per bucket, none negative, the total
    below 2^28 (the 4-byte _ClassicLayout), classic buckets if `classic`, native ones if `first`
    is not None."""
    parts = [b"\x08", varint(total), b"\x11", _pack_double(total_sum)]
    if classic:
        parts.append(layout.classic[0].buckets(accumulate(counts[:-1])))
    if first is not None:
        parts += (layout.native_head, varint(counts[0]))
        low, high = 1, len(counts)
        while low < high and not counts[low]:
            low += 1
        while high > low and not counts[high - 1]:
            high -= 1
        if low < high:
            packed = _deltas(counts[low:high])
            parts += (layout.spans[low * (layout.buckets + 1) + high], b"\x6a", varint(len(packed)), packed)
    return b"".join(parts)


def _deltas(window: tuple[int, ...]) -> bytes:
    """The packed positive_delta varints of non-negative bucket counts (the first one's delta is
    from 0)."""
    pairs = zip(window, chain(_ZERO, window), strict=False)
    if max(window) < _ZIGZAG_OFFSET:  # every delta has its varint in _ZIGZAG
        zigzags = _ZIGZAG
        return b"".join([zigzags[count - before + _ZIGZAG_OFFSET] for count, before in pairs])
    return b"".join([varint(zigzag(count - before)) for count, before in pairs])


_LIMIT_4 = 1 << 28  # counts that fit 4-byte varints (_ClassicLayout)
_ZIGZAG_OFFSET = 1 << 13
# varint(zigzag(d)) of -2^13 <= d < 2^13 at index d + 2^13: the native deltas of counts below 2^13.
_ZIGZAG = [varint(zigzag(d - _ZIGZAG_OFFSET)) for d in range(2 * _ZIGZAG_OFFSET)]
_ZERO = (0,)


class _Layout:
    """What every histogram with these bounds shares: its number of buckets, its native form
    (native_indexes(); None if it has none), its classic buckets' 4- and 8-byte _ClassicLayouts,
    the bytes of its native fields up to the zero count, and the positive_span field of every
    window of non-empty buckets [low, high), at low * (buckets + 1) + high."""

    __slots__ = ("bounds", "buckets", "classic", "first", "native_head", "spans")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.buckets = len(bounds) + 1
        self.first = native_indexes(bounds)
        self.classic = (_ClassicLayout(bounds, 4), _ClassicLayout(bounds, 8))
        self.native_head = b""
        self.spans: list[bytes] = []
        if self.first is not None:
            # schema 0, zero_threshold, then the zero_count's tag.
            self.native_head = b"\x28\x00\x31" + _pack_double(bounds[0]) + b"\x38"
            for low in range(self.buckets):
                for high in range(self.buckets + 1):
                    span = b"\x08" + varint(zigzag(self.first + low - 1)) + b"\x10" + varint(max(high - low, 0))
                    self.spans.append(b"\x62" + _small[len(span)] + span)
