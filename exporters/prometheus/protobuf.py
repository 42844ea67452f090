"""The Prometheus protobuf exposition, rendered once per collection cycle.

A pure renderer over a Batch, like exposition.py: a sequence of varint-delimited
`io.prometheus.client.MetricFamily` messages (Prometheus' client_model metrics.proto, proto2),
content type PROTOBUF_CONTENT_TYPE.  It is the only exposition that carries native histograms,
and the one Prometheus asks for first when native histograms are on (2.40-3.7:
`--enable-feature=native-histograms`; 3.8+: `scrape_native_histograms: true`).

The messages are written byte by byte here rather than through generated classes: the protobuf
runtime is only a dependency of the OTLP exporter, the message is small and fixed, a counter or
gauge family is one struct pack() of its kept layout, a histogram family is encoded all at once
(histogram_block.py), and a histogram series whose value did not change is reused as bytes from
the previous cycle.  Tests decode the output with classes protoc generates from metrics.proto
(tests/proto/), never with this module.

Histograms: the kernel buckets at powers of two seconds (bpf/kpod.bpf.h), so each bucket is
exactly one native schema-0 bucket, (2^(i-1), 2^i]: the first bucket (up to the first bound) is
the zero bucket with that bound as zero_threshold, and the +Inf bucket (above the last finite
bound) is counted in the native bucket just above it, the one place native buckets say less
than the classic ones (docs/METRICS.md).  A histogram whose bounds are not consecutive powers of
two has no native form and keeps its classic buckets whatever the setting.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import accumulate, chain, compress, repeat
from operator import add, and_, attrgetter, eq, is_, not_
from struct import Struct

from kpod.exporters.prometheus.exposition import PROTOBUF_CONTENT_TYPE as PROTOBUF_CONTENT_TYPE
from kpod.exporters.prometheus.exposition import utf8_label_value
from kpod.exporters.prometheus.histogram_block import PIECES, BlockLayout
from kpod.exporters.prometheus.labels import Grouping, LabelCache
from kpod.exporters.prometheus.naming import label_name, prometheus_name
from kpod.exporters.protowire import field, varint, zigzag

from kpod.model import Batch, HistogramValue, Kind, MetricDef, base2_exponent

# The `histograms` setting: which buckets a histogram carries in this exposition.
CLASSIC, NATIVE, BOTH = "classic", "native", "both"

# MetricType enum of metrics.proto.
_TYPES = {Kind.COUNTER: 0, Kind.GAUGE: 1, Kind.HISTOGRAM: 4}
_pack_double = Struct("<d").pack
_bounds = attrgetter("bounds")
_counts = attrgetter("counts")
_sum = attrgetter("sum")


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


def histogram_message(value: HistogramValue, mode: str, first: int | None) -> bytes:
    """The Histogram message of one series (without its field tag), every varint minimal and the
    fields in the order of metrics.proto; `first` is native_indexes(value.bounds).  The
    reference encoding: the renderer writes whole families at once (histogram_block.py) and
    falls back to this for what its layouts do not hold (counts of 2^55 and more, a family of
    mixed bounds); tests decode both with the official classes and compare."""
    bounds = value.bounds
    counts = value.counts
    buckets = len(bounds) + 1
    if len(counts) != buckets:  # tolerate a short or long count tuple: pad or cut
        counts = (tuple(counts) + (0,) * buckets)[:buckets]
    head = b"\x08" + varint(sum(counts)) + b"\x11" + _pack_double(value.sum)
    if mode == CLASSIC:
        first = None
    classic = []
    if mode != NATIVE or first is None:
        # Classic buckets, cumulative, inclusive upper bounds; the +Inf bucket is sample_count.
        for bound, count in zip(bounds, accumulate(counts), strict=False):
            bucket = b"\x08" + varint(count) + b"\x11" + _pack_double(bound)
            classic.append(b"\x1a" + varint(len(bucket)) + bucket)
    if first is None:
        return head + b"".join(classic)
    # schema 0, zero_threshold, zero_count, then the positive buckets: counts[1:-1] are indexes
    # first.., and the +Inf bucket's count goes into the index just above them.  One span from
    # the first non-empty bucket to the last, the empty ones between them as zero deltas
    # (kernel histograms are rarely sparse inside their range, and a zero delta costs one byte
    # where a new span costs four).
    native = b"\x28\x00\x31" + _pack_double(bounds[0]) + b"\x38" + varint(counts[0])
    low, high = 1, buckets
    while low < high and not counts[low]:
        low += 1
    while high > low and not counts[high - 1]:
        high -= 1
    if low < high:
        window = counts[low:high]
        below = (0, *window[:-1])
        deltas = b"".join(varint(zigzag(count - before)) for count, before in zip(window, below, strict=True))
        span = b"\x08" + varint(zigzag(first + low - 1)) + b"\x10" + varint(high - low)
        native += b"\x62" + varint(len(span)) + span + b"\x6a" + varint(len(deltas)) + deltas
    return head + b"".join(classic) + native


class _Histograms:
    """What the renderer keeps of a histogram family between cycles: its series' labels and
    values, in order, their Metric fields (PIECES pieces per series) and the concatenation of
    those (`body`)."""

    __slots__ = ("body", "labels", "pieces", "values")

    def __init__(self, labels: list[bytes], values: list[HistogramValue]) -> None:
        self.labels = labels
        self.values = values
        self.pieces: list[bytes] = []
        self.body = b""


class _Scalars:
    """What the renderer keeps of a counter or gauge family between cycles: its series' labels,
    in order, each series' Metric field up to its value (`prefixes`: a scalar Metric is its
    labels and an 11-byte Counter or Gauge of one double), and one Struct that writes them all
    with the values between them, so that a family is one pack() call."""

    __slots__ = ("labels", "pack", "pieces")

    def __init__(self, labels: list[bytes], pieces: dict[bytes, bytes]) -> None:
        self.labels = labels
        self.pieces = pieces
        lengths = list(map(len, pieces.values()))
        if lengths and max(lengths) < len(_FORMATS):
            self.pack = Struct("<" + "".join(map(_FORMATS.__getitem__, lengths))).pack
        else:
            self.pack = Struct("<" + "".join(f"{length}sd" for length in lengths)).pack

    @staticmethod
    def rebuilt(previous: _Scalars | None, labels: list[bytes], tag: bytes) -> _Scalars:
        """The family of these series, reusing the pieces of those it had: this runs over every
        series of every family each time a pod comes or goes, so the lookups are done in C and
        only the new series go through Python."""
        known = previous.pieces if previous is not None else {}
        found = list(map(known.get, labels))
        for index in compress(range(len(labels)), map(is_, found, repeat(None))):
            found[index] = _scalar_prefix(labels[index], tag)
        return _Scalars(labels, dict(zip(labels, found, strict=True)))  # type: ignore[arg-type]


_FORMATS = [f"{length}sd" for length in range(1024)]  # struct formats of a piece and its value


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
        self._grouping = Grouping(self._labels)
        self._heads: dict[MetricDef, bytes] = {}
        self._scalars: dict[MetricDef, _Scalars] = {}
        self._histograms: dict[MetricDef, _Histograms] = {}
        # (id(bounds), varint width) -> its BlockLayout; bounds are shared tuples (one per
        # receiver), so this holds a handful of entries.
        self._layouts: dict[tuple[int, int], BlockLayout] = {}

    def _layout(self, bounds: tuple[float, ...], width: int) -> BlockLayout:
        layout = self._layouts.get((id(bounds), width))
        if layout is None or layout.bounds is not bounds:
            if len(self._layouts) > 64:
                self._layouts.clear()
            first = native_indexes(bounds) if self.histograms != CLASSIC else None
            classic = self.histograms != NATIVE or first is None
            layout = self._layouts[(id(bounds), width)] = BlockLayout(bounds, first, classic, width)
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
        histograms: dict[MetricDef, _Histograms] = {}
        # Histogram families to encode anew, all of those of the same bounds at once (a node's
        # run-queue, RTT and syscall latencies): (where their MetricFamily goes in out, its head)
        pending: list[tuple[int, bytes, _Histograms]] = []
        series = 0
        for metric, (labels, values) in self._grouping(batch).items():
            kind = metric.kind
            if kind not in _TYPES:
                continue
            if kind is Kind.HISTOGRAM:
                histogram_family, body, count = self._histogram_family(labels, values, previous_histograms.get(metric))
                if histogram_family is not None:
                    histograms[metric] = histogram_family
                if body is None:
                    series += count
                    pending.append((len(out), self._family_head(metric), histogram_family))  # type: ignore[arg-type]
                    out += (b"", b"")
                    continue
            else:
                # Counter (3) or Gauge (2), each {value (1): double}.
                tag = b"\x1a\x09\x09" if kind is Kind.COUNTER else b"\x12\x09\x09"
                family, body, count = self._scalar_family(labels, values, previous_scalars.get(metric), tag)
                if family is not None:
                    scalars[metric] = family
            if not count:
                continue
            series += count
            head = self._family_head(metric)
            out += (varint(len(head) + len(body)) + head, body)  # the body is copied once, by the join
        by_bounds: dict[int, list[tuple[int, bytes, _Histograms]]] = {}
        for one in pending:
            by_bounds.setdefault(id(one[2].values[0].bounds), []).append(one)
        for families in by_bounds.values():
            labels = [series for _, _, family in families for series in family.labels]
            values = [value for _, _, family in families for value in family.values]
            pieces = self._encode(labels, values, True)
            start = 0
            for at, head, family in families:
                end = start + PIECES * len(family.values)
                family.pieces = pieces[start:end]
                family.body = body = b"".join(family.pieces)
                out[at : at + 2] = (varint(len(head) + len(body)) + head, body)
                start = end
        self._scalars, self._histograms = scalars, histograms
        self._labels.prune(batch, series)
        return b"".join(out), series

    @staticmethod
    def _scalar_family(
        labels: list[bytes], values: tuple[float | HistogramValue, ...], previous: _Scalars | None, tag: bytes
    ) -> tuple[_Scalars | None, bytes, int]:
        """A counter or gauge family's Metric fields (its series' labels and values), what to
        keep of it and its number of series.  Values that are histograms are left out, and such a
        family is encoded series by series and not kept."""
        if set(map(type, values)) <= _PACKED_TYPES:
            if previous is None or previous.labels != labels:  # identity first: labels.py
                previous = _Scalars.rebuilt(previous, labels, tag)
            numbers = chain.from_iterable(zip(previous.pieces.values(), values, strict=True))
            return previous, previous.pack(*numbers), len(values)
        chunks = [
            _scalar_prefix(series, tag) + _pack_double(value)  # type: ignore[arg-type]
            for series, value in zip(labels, values, strict=True)
            if not isinstance(value, HistogramValue)
        ]
        return None, b"".join(chunks), len(chunks)

    def _histogram_family(
        self, labels: list[bytes], given: tuple[float | HistogramValue, ...], previous: _Histograms | None
    ) -> tuple[_Histograms | None, bytes | None, int]:
        """A histogram family's Metric fields, what to keep of it and its number of series.
        Series whose value did not change keep their bytes (on a real node most kernel
        histograms do not change from one cycle to the next): when at most half of them
        changed, only those are encoded again.  A family to encode anew has no Metric fields
        yet (None): render() encodes it with the others of its bounds.  Values that are not
        histograms are left out, and such a family is encoded series by series and not kept."""
        values: list[HistogramValue] = list(given)  # type: ignore[arg-type]
        if set(map(type, values)) != {HistogramValue}:
            chunks = [
                self._one(series, value)
                for series, value in zip(labels, values, strict=True)
                if isinstance(value, HistogramValue)
            ]
            return None, b"".join(chunks), len(chunks)
        if previous is not None and previous.labels == labels:  # identity first: labels.py
            # Compared in C: sums, then (unless more than half of them changed) counts and bounds.
            last = previous.values
            previous.values = values
            same = list(map(eq, map(_sum, last), map(_sum, values)))
            if 2 * sum(same) >= len(values):
                same = list(map(and_, same, map(eq, map(_counts, last), map(_counts, values))))
                same = list(map(and_, same, map(eq, map(_bounds, last), map(_bounds, values))))
                changed = len(values) - sum(same)
                if not changed:
                    return previous, previous.body, len(values)
                if 2 * changed <= len(values):
                    indexes = list(compress(range(len(values)), map(not_, same)))
                    pieces = previous.pieces
                    encoded = self._encode([labels[i] for i in indexes], [values[i] for i in indexes], False)
                    for new, index in enumerate(indexes):
                        pieces[PIECES * index : PIECES * index + PIECES] = encoded[PIECES * new : PIECES * new + PIECES]
                    previous.body = b"".join(pieces)
                    return previous, previous.body, len(values)
        return _Histograms(labels, values), None, len(values)

    def _encode(self, labels: list[bytes], values: list[HistogramValue], whole: bool) -> list[bytes]:
        """The Metric fields of these histogram series, PIECES pieces per series: all at once
        (histogram_block.py) when they share bounds and their counts fit 8-byte varints, else
        one by one."""
        bounds = values[0].bounds
        if len(bounds) >= 1 and len(set(map(id, map(_bounds, values)))) == 1:
            for width in (4, 8):
                pieces = self._layout(bounds, width).encode(labels, values, whole)
                if pieces is not None:
                    return pieces
        pieces = [b""] * (PIECES * len(values))
        pieces[0::PIECES] = map(self._one, labels, values)
        return pieces

    def _one(self, labels: bytes, value: HistogramValue) -> bytes:
        first = native_indexes(value.bounds) if self.histograms != CLASSIC else None
        body = histogram_message(value, self.histograms, first)
        metric = labels + b"\x3a" + varint(len(body)) + body
        return b"\x22" + varint(len(metric)) + metric
