"""Points -> ExportMetricsServiceRequest bytes, written directly, gzipped for the queue.

The request is encoded here field by field (opentelemetry-proto's metrics.proto, proto3): no
SDK data classes, no message objects.  Most of a request is fixed-width (timestamps and values
are fixed64/double, explicit-bucket counts and bounds are packed fixed64/double), so a data point
is a few struct packs; what repeats (a resource, a point's attributes, a metric's name and unit,
a bounds array) is encoded once and reused.  Tests decode the requests with the official
opentelemetry-proto classes, at a real OTLP receiver (tests/otlp_receiver.py).

Histograms (`histograms` setting): `explicit` (default) sends an explicit-bucket Histogram with
the kernel's bounds; `exponential` sends an ExponentialHistogram of scale 0 (base 2), whose
buckets are exactly the kernel's: the first bucket is the zero bucket (zero_threshold = the
first bound), and the +Inf bucket goes to the bucket above the last bound (docs/METRICS.md).
A histogram whose bounds are not consecutive powers of two is always sent explicit.
"""

from __future__ import annotations

import gzip
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import add, attrgetter, itemgetter
from struct import Struct

from kpod.exporters.protowire import SMALL, field, varint, zigzag
from kpod.exporters.varint_slots import WIDTHS, Slots

from kpod import __version__
from kpod.model import Attributes, Batch, HistogramValue, Kind, MetricDef, Resource, base2_exponent

SCOPE_NAME = "kpod-metrics"
# A Collector's default gRPC receive limit is 4 MiB; keep a margin for framing and metadata.
MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
# Held requests are compressed fast (the sender thread's CPU), not small: level 1.
QUEUE_GZIP_LEVEL = 1
EXPLICIT, EXPONENTIAL = "explicit", "exponential"
CUMULATIVE = 2  # AggregationTemporality

_u64 = Struct("<Q").pack
_i64 = Struct("<q").pack
_f64 = Struct("<d").pack
_counts = attrgetter("counts")
_sum = attrgetter("sum")
# Bytes a length-delimited field may add around its content (tag, length varint up to 2^28).
_FIELD_OVERHEAD = 5


def key_values(tag: int, items: Attributes | list[tuple[str, str]]) -> bytes:
    """Repeated KeyValue {key = 1, value = 2: AnyValue {string_value = 1}} under field `tag`."""
    return b"".join(
        field(tag, field(0x0A, key.encode()) + field(0x12, field(0x0A, value.encode("utf-8", "replace"))))
        for key, value in items
    )


class _Bounds:
    """What every histogram with these bounds shares, and the data points of many of them
    encoded at once (histogram_points())."""

    __slots__ = ("buckets", "explicit", "exponent", "prefixes", "slots", "threshold")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.buckets = len(bounds) + 1
        # HistogramDataPoint: count (4), sum (5), bucket_counts (6, packed fixed64), then
        # explicit_bounds (7, packed doubles).
        counts = b"\x32" + varint(8 * self.buckets)
        self.explicit = (counts, field(0x3A, Struct(f"<{len(bounds)}d").pack(*bounds)))
        self.exponent = base2_exponent(bounds)
        self.threshold = b"\x71" + _f64(bounds[0]) if bounds else b""  # zero_threshold (14)
        # (varint width) -> the positive field (8) up to its packed counts, by window of non-empty
        # buckets (varint_slots.Slots.window_keys)
        self.prefixes: dict[int, list[bytes]] = {}
        self.slots: dict[tuple[int, int], Slots] = {}  # (width, n) -> Slots

    def _slots(self, width: int, n: int) -> Slots:
        slots = self.slots.get((width, n))
        if slots is None:
            if len(self.slots) >= 4:
                self.slots.clear()
            slots = self.slots[(width, n)] = Slots(self.buckets, width, n)
        return slots

    def _prefixes(self, width: int) -> list[bytes]:
        prefixes = self.prefixes.get(width)
        if prefixes is None:
            assert self.exponent is not None
            series_bytes = self.buckets * width
            prefixes = self.prefixes[width] = [b""] * (series_bytes * series_bytes + 1)
            for low in range(1, self.buckets):
                for high in range(low, self.buckets):
                    packed = (high - low + 1) * width
                    inner = b"\x08" + varint(zigzag(self.exponent + low - 1)) + b"\x12" + varint(packed)
                    prefixes[low * width * series_bytes + high * width] = b"\x42" + varint(len(inner) + packed) + inner
        return prefixes

    def histogram_points(self, heads: list[bytes], values: list[HistogramValue], exponential: bool) -> list[bytes]:
        """The data_points fields of these histograms, `heads` being each one's attributes and
        times: HistogramDataPoint {attributes (9), start (2), time (3), count (4), sum (5),
        bucket_counts (6), explicit_bounds (7)} or, if `exponential`, ExponentialHistogramDataPoint
        {attributes (1), start, time, count, sum, zero_count (7), positive (8: Buckets {offset
        (1), bucket_counts (2)}), zero_threshold (14)}; scale 0, the default, is absent.  min and
        max stay unset: the kernel keeps neither.

        Exponential: bucket k >= 1 of the kernel, (2^(e+k-1), 2^(e+k)], is index e + k - 1 at
        scale 0 (index i covers (2^i, 2^(i+1)]), and the +Inf bucket goes to the index above the
        last bound.  The positive buckets are the window from the first non-empty one to the last;
        their counts are packed varints, written for all points at once (varint_slots.py) and
        sliced to each point's window."""
        n = len(values)
        buckets = self.buckets
        counts = list(map(_counts, values))
        if set(map(len, counts)) != {buckets}:  # tolerate a short or long count tuple: pad or cut
            counts = [(tuple(c) + (0,) * buckets)[:buckets] for c in counts]
        totals = list(map(sum, counts))
        sums = list(map(_sum, values))
        if not exponential:
            # count (4), sum (5), bucket_counts (6), explicit_bounds (7): one pack for all points.
            middle, explicit = self.explicit
            stride = buckets + 6
            numbers: list[object] = [None] * (n * stride)
            numbers[0::stride] = [0x21] * n
            numbers[1::stride] = totals
            numbers[2::stride] = [0x29] * n
            numbers[3::stride] = sums
            numbers[4::stride] = [middle] * n
            for bucket in range(buckets):
                numbers[5 + bucket :: stride] = list(map(itemgetter(bucket), counts))
            numbers[5 + buckets :: stride] = [explicit] * n
            size = 1 + 8 + 1 + 8 + len(middle) + 8 * buckets + len(explicit)
            one = f"BQBd{len(middle)}s{buckets}Q{len(explicit)}s"
            bodies = memoryview(Struct("<" + one * n).pack(*numbers))
            lengths = map(add, map(len, heads), repeat(size, n))
            parts = map(bodies.__getitem__, map(slice, range(0, n * size, size), range(size, (n + 1) * size, size)))
            return list(map(b"".join, zip(repeat(b"\x0a", n), map(_length, lengths), heads, parts, strict=True)))
        # count (4), sum (5), zero_count (7), then positive (8) and zero_threshold (14).
        numbers = [None] * (6 * n)
        numbers[0::6] = [0x21] * n
        numbers[1::6] = totals
        numbers[2::6] = [0x29] * n
        numbers[3::6] = sums
        numbers[4::6] = [0x39] * n
        numbers[5::6] = list(map(itemgetter(0), counts))
        fixed = memoryview(Struct("<" + "BQBdBQ" * n).pack(*numbers))
        parts = list(map(fixed.__getitem__, map(slice, range(0, 27 * n, 27), range(27, 27 * n + 27, 27))))
        positives: list[bytes] | None = None
        for width in WIDTHS:
            slots = self._slots(width, n)
            packed = slots.pack(counts)
            if packed is not None:
                varints = slots.to_bytes(slots.varints(packed))
                lows, highs = slots.windows(packed)
                keys = slots.window_keys(lows, highs)
                windows = map(varints.__getitem__, map(slice, lows, map(add, highs, repeat(width, n))))
                positives = list(map(add, map(self._prefixes(width).__getitem__, keys), windows))
                break
        if positives is None:  # counts of 2^55 and more: point by point
            positives = [self._positive(c) for c in counts]
        threshold = self.threshold
        lengths = map(add, map(add, map(len, heads), map(len, positives)), repeat(27 + len(threshold), n))
        fields = zip(
            repeat(b"\x0a", n), map(_length, lengths), heads, parts, positives, repeat(threshold, n), strict=True
        )
        return list(map(b"".join, fields))

    def _positive(self, counts: Sequence[int]) -> bytes:
        """The positive field of one point, its counts' varints minimal."""
        assert self.exponent is not None
        low, high = 1, len(counts)
        while low < high and not counts[low]:
            low += 1
        while high > low and not counts[high - 1]:
            high -= 1
        if low >= high:
            return b""
        packed = b"".join(map(varint, counts[low:high]))
        return field(0x42, b"\x08" + varint(zigzag(self.exponent + low - 1)) + b"\x12" + varint(len(packed)) + packed)


def _length(n: int) -> bytes:
    return SMALL[n] if n < 0x4000 else varint(n)


class Encoder:
    """A batch -> serialized ExportMetricsServiceRequests of at most max_points points each (and
    under MAX_REQUEST_BYTES), one ResourceMetrics per resource, one Metric per metric in it.

    Caches what repeats from cycle to cycle, keyed by identity or attribute tuples; the caches
    hold only what the latest batch used."""

    def __init__(
        self, base_attributes: dict[str, str], start_time_ns: int, max_points: int, histograms: str = EXPLICIT
    ) -> None:
        if histograms not in (EXPLICIT, EXPONENTIAL):
            raise ValueError(f"histograms: expected explicit or exponential, got {histograms!r}")
        self._base = base_attributes
        self._start_time_ns = start_time_ns
        self.max_points = max_points
        self.histograms = histograms
        # ScopeMetrics.scope (1): InstrumentationScope {name = 1, version = 2}
        self._scope = field(0x0A, field(0x0A, SCOPE_NAME.encode()) + field(0x12, __version__.encode()))
        # A point's OTel resource attributes -> (merged attributes, ResourceMetrics.resource field)
        self._resources: dict[Attributes, tuple[Attributes, bytes]] = {}
        self._attributes: dict[tuple[int, Attributes, Attributes], bytes] = {}
        self._metrics: dict[MetricDef, bytes] = {}
        self._kinds: dict[MetricDef, tuple[int | None, bool, bool]] = {}  # data field, histogram?, gauge?
        self._bounds: dict[int, tuple[tuple[float, ...], _Bounds]] = {}

    # -- what repeats -----------------------------------------------------------------------

    def _resource(self, otel: Attributes) -> tuple[Attributes, bytes]:
        """(merged attributes, the ResourceMetrics.resource field) of a point's OTel attributes.
        Grouped by the merged attributes: two attribute sets that merge into one are one
        resource."""
        found = self._resources.get(otel)
        if found is None:
            attributes = dict(self._base)
            attributes.update(otel)  # the pod's own k8s.node.name etc. win
            merged = tuple(sorted(attributes.items()))
            found = self._resources[otel] = (merged, field(0x0A, key_values(0x0A, merged)))
        return found

    def _point_attributes(self, attributes: Attributes, labels: Attributes, tag: int) -> bytes:
        key = (tag, attributes, labels)
        found = self._attributes.get(key)
        if found is None:
            merged = dict(attributes)
            merged.update(labels)
            found = self._attributes[key] = key_values(tag, list(merged.items()))
        return found

    def _metric_head(self, metric: MetricDef) -> bytes:
        """Metric.name (1), description (2), unit (3)."""
        head = self._metrics.get(metric)
        if head is None:
            head = self._metrics[metric] = (
                field(0x0A, metric.name.encode())
                + field(0x12, metric.description.encode("utf-8", "replace"))
                + field(0x1A, metric.unit.encode())
            )
        return head

    def _bounds_of(self, bounds: tuple[float, ...]) -> _Bounds:
        cached = self._bounds.get(id(bounds))
        if cached is None or cached[0] is not bounds:
            if len(self._bounds) > 64:
                self._bounds.clear()
            cached = self._bounds[id(bounds)] = (bounds, _Bounds(bounds))
        return cached[1]

    # -- data points ---------------------------------------------------------------------------

    # -- requests ------------------------------------------------------------------------------

    def requests(self, batch: Batch) -> list[tuple[bytes, int]]:
        """(serialized ExportMetricsServiceRequest, points) per request: at most max_points
        points each, and under MAX_REQUEST_BYTES."""
        time_bytes = _u64(batch.time_ns)
        gauge_times = b"\x19" + time_bytes
        times_of: dict[int, bytes] = {}
        # merged resource attributes -> (resource field, {metric key: (metric, data field, [point])})
        grouped: dict[Attributes, tuple[bytes, dict[object, tuple[MetricDef, int, list[bytes]]]]] = {}
        # id(Resource) -> (Resource, its group's metrics, fallback labels): Resources are shared by
        # all points of a cgroup, so this is looked up by identity, not by hashing attributes.
        Group = dict[object, tuple[MetricDef, int, list[bytes]]]
        by_resource: dict[int, tuple[Resource | None, Group, Attributes]] = {}
        exponential = self.histograms == EXPONENTIAL
        kinds = self._kinds
        used: dict[Attributes, tuple[Attributes, bytes]] = {}
        # (attributes, fallback labels, start, gauge) -> a number data point up to its value, as a
        # data_points field: a scalar point is this plus 9 bytes.
        number_heads: dict[tuple[Attributes, Attributes, int, bool], bytes] = {}
        # (bounds, data field) -> the histogram points' lists, places, heads and values
        Todo = tuple[list[list[bytes]], list[int], list[bytes], list[HistogramValue]]
        histograms: dict[tuple[_Bounds, int], Todo] = {}
        for point in batch.points:
            metric = point.metric
            kind = kinds.get(metric)
            if kind is None:
                kind = kinds[metric] = (_DATA_FIELDS.get(metric.kind), metric.kind is Kind.HISTOGRAM,
                                        metric.kind is Kind.GAUGE)  # fmt: skip
            data_tag, histogram, gauge = kind
            value = point.value
            if data_tag is None or isinstance(value, HistogramValue) is not histogram:
                continue  # a receiver bug; one bad point must not fail the request
            resource = point.resource
            slot = by_resource.get(id(resource))
            if slot is None or slot[0] is not resource:
                otel = resource.otel if resource is not None else ()
                merged, resource_field = used[otel] = self._resource(otel)
                group = grouped.get(merged)
                if group is None:
                    group = grouped[merged] = (resource_field, {})
                # A resource with Prometheus labels only: its labels become point attributes, or
                # its series would collide with other resources'.
                labels = resource.labels if resource is not None and not resource.otel else ()
                slot = by_resource[id(resource)] = (resource, group[1], labels)
            start = point.start_time_ns or self._start_time_ns
            if histogram:
                times = times_of.get(start)
                if times is None:
                    times = times_of[start] = b"\x11" + _u64(start) + b"\x19" + time_bytes
                info = self._bounds_of(value.bounds)  # type: ignore[union-attr]
                if exponential and info.exponent is not None:
                    data_tag = EXPONENTIAL_FIELD
                    attributes = self._point_attributes(point.attributes, slot[2], 0x0A)
                else:
                    attributes = self._point_attributes(point.attributes, slot[2], 0x4A)
                key: object = (metric, data_tag)
                points = slot[1].get(key)
                if points is None:
                    points = slot[1][key] = (metric, data_tag, [])
                # Encoded below with the other histograms of its bounds and kind, into its place.
                todo = histograms.get((info, data_tag))
                if todo is None:
                    todo = histograms[(info, data_tag)] = ([], [], [], [])
                todo[0].append(points[2])
                todo[1].append(len(points[2]))
                todo[2].append(attributes + times)
                todo[3].append(value)
                points[2].append(b"")
                continue
            else:
                head_key = (point.attributes, slot[2], start, gauge)
                head = number_heads.get(head_key)
                if head is None:
                    # A gauge has no start (the SDK sends none either).
                    times = gauge_times if gauge else b"\x11" + _u64(start) + b"\x19" + time_bytes
                    body = self._point_attributes(point.attributes, slot[2], 0x3A) + times
                    head = number_heads[head_key] = b"\x0a" + varint(len(body) + 9) + body
                encoded = head + (b"\x31" + _i64(value) if type(value) is int else b"\x21" + _f64(value))  # type: ignore[arg-type]
            points = slot[1].get(metric)
            if points is None:
                points = slot[1][metric] = (metric, data_tag, [])
            points[2].append(encoded)
        for (info, data_tag), (lists, places, heads, values) in histograms.items():
            encoded = info.histogram_points(heads, values, data_tag == EXPONENTIAL_FIELD)
            for points_list, place, one in zip(lists, places, encoded, strict=True):
                points_list[place] = one
        self._resources = used  # only the resources of the latest snapshot stay cached
        if len(self._attributes) > 4 * len(batch) + 1000:
            self._attributes.clear()  # attribute sets of gone series
        builder = _Requests(self.max_points, self._scope)
        for resource_field, metrics in grouped.values():
            for metric, data_tag, encoded in metrics.values():
                builder.add(resource_field, self._metric_head(metric), data_tag, encoded)
        return builder.finish()

    def payloads(self, batch: Batch) -> list[Payload]:
        """The batch as gzip-compressed serialized requests: what the queue holds.  A node's
        snapshot is ~3 MB of Point objects, ~1.5 MB of protobuf, ~0.15 MB gzipped (level 1), so
        a queue of held snapshots costs little memory however long the collector is away."""
        return [Payload(gzip.compress(request, QUEUE_GZIP_LEVEL), points) for request, points in self.requests(batch)]


class _Requests:
    """Cuts grouped data points into requests of at most `max_points` points and under
    MAX_REQUEST_BYTES, in the order given (resource, then metric: a request repeats as few
    resources and metrics as possible).

    A request is kept as the list of its pieces (fields' heads, data points, tails) and joined
    once: every data point is copied once, where nesting the fields would copy it at each level
    (a node's snapshot has ~3,900 Metric messages, one per pod and metric).  A ResourceMetrics'
    head holds the length of all that follows it, so it is written when the resource closes, in
    the place kept for it."""

    def __init__(self, max_points: int, scope: bytes) -> None:
        self.max_points = max_points
        self.scope = scope
        self.out: list[tuple[bytes, int]] = []
        self.pieces: list[bytes] = []  # this request so far
        self.resource: bytes | None = None  # the resource field being filled
        self.resource_at = 0  # where its head goes in pieces
        self.scope_size = 0  # the size of its ScopeMetrics' content so far
        self.points = 0
        self.size = 0

    def _close_resource(self) -> None:
        resource = self.resource
        if resource is not None:
            if self.scope_size > len(self.scope):  # it has metrics
                scope_size = self.scope_size
                scope_length = varint(scope_size)
                resource_size = len(resource) + 1 + len(scope_length) + scope_size
                self.pieces[self.resource_at] = b"".join(
                    (b"\x0a", varint(resource_size), resource, b"\x12", scope_length, self.scope)
                )
            else:
                del self.pieces[self.resource_at :]
        self.resource = None

    def _close_request(self) -> None:
        self._close_resource()
        if self.pieces:
            self.out.append((b"".join(self.pieces), self.points))
        self.pieces, self.points, self.size = [], 0, 0

    def add(self, resource: bytes, head: bytes, data_tag: int, points: list[bytes]) -> None:
        """One metric's data points (each already a data_points field) of one resource."""
        tail = _DATA_TAILS[data_tag]
        if resource is not self.resource:
            self._close_resource()
        elif self.points + len(points) <= self.max_points:
            # The common case: the resource is open and its metric fits in this request.
            data_size = sum(map(len, points))
            grown = self.size + len(head) + len(tail) + 2 * _FIELD_OVERHEAD + data_size
            if grown <= MAX_REQUEST_BYTES:
                self.size = grown
                self.points += len(points)
                self._metric(head, data_tag, points, data_size + len(tail), tail)
                return
        done = 0
        pieces = self.pieces
        while done < len(points):
            if self.points >= self.max_points or self.size >= MAX_REQUEST_BYTES:
                self._close_request()
                pieces = self.pieces
            if self.resource is None:
                self.resource = resource
                self.resource_at = len(pieces)
                pieces.append(b"")  # its head, written when it closes
                self.scope_size = len(self.scope)
                self.size += len(resource) + len(self.scope) + 3 * _FIELD_OVERHEAD
            self.size += len(head) + len(tail) + 2 * _FIELD_OVERHEAD
            room = self.max_points - self.points
            taken = points[done : done + room] if done or room < len(points) else points
            data_size = sum(map(len, taken))
            grown = self.size + data_size
            if grown > MAX_REQUEST_BYTES:  # rare: cut where the request is full
                grown, kept = self.size, 0
                for one in taken:
                    if grown + len(one) > MAX_REQUEST_BYTES and (kept or self.points):
                        break
                    grown += len(one)
                    kept += 1
                taken = taken[:kept]
                data_size = sum(map(len, taken))
                grown = max(grown, MAX_REQUEST_BYTES)  # full: the next round starts a new request
            self.size = grown
            done += len(taken)
            self.points += len(taken)
            if taken:
                self._metric(head, data_tag, taken, data_size + len(tail), tail)

    def _metric(self, head: bytes, data_tag: int, points: list[bytes], data_size: int, tail: bytes) -> None:
        """A Metric field (ScopeMetrics.metrics, 2): its head, then the data field (gauge, sum,
        histogram...) holding the points and the tail, `data_size` bytes."""
        data_length = SMALL[data_size] if data_size < 0x4000 else varint(data_size)
        metric_size = len(head) + 1 + len(data_length) + data_size
        metric_length = SMALL[metric_size] if metric_size < 0x4000 else varint(metric_size)
        pieces = self.pieces
        pieces.append(b"".join((b"\x12", metric_length, head, _TAGS[data_tag], data_length)))
        pieces += points
        pieces.append(tail)
        self.scope_size += 1 + len(metric_length) + metric_size

    def finish(self) -> list[tuple[bytes, int]]:
        self._close_request()
        return self.out


_TAGS = [bytes((tag,)) for tag in range(256)]


# Metric.data fields: gauge (5), sum (7), histogram (9), exponential_histogram (10).
_DATA_FIELDS = {Kind.GAUGE: 0x2A, Kind.COUNTER: 0x3A, Kind.HISTOGRAM: 0x4A}
EXPONENTIAL_FIELD = 0x52
# What follows the data points in each: Sum's temporality (2) and is_monotonic (3), the histograms'
# temporality (2); a Gauge has nothing.
_DATA_TAILS = {
    0x2A: b"",
    0x3A: b"\x10" + bytes((CUMULATIVE,)) + b"\x18\x01",
    0x4A: b"\x10" + bytes((CUMULATIVE,)),
    0x52: b"\x10" + bytes((CUMULATIVE,)),
}


@dataclass
class Payload:
    gzipped: bytes  # a serialized ExportMetricsServiceRequest, gzip-compressed
    points: int
