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
from itertools import chain, repeat
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
            size = 1 + 8 + 1 + 8 + len(middle) + 8 * buckets + len(explicit)
            # Not kept from cycle to cycle: a Struct of n points' fields holds ~200 bytes per point.
            packer = Struct("<" + f"BQBd{len(middle)}s{buckets}Q{len(explicit)}s" * n)
            numbers = zip(repeat(0x21, n), totals, repeat(0x29, n), sums, repeat(middle, n), strict=True)
            bodies = memoryview(packer.pack(*chain.from_iterable(map(chain, numbers, counts, repeat((explicit,), n)))))
            # Each point's data_points field head (tag, length) and attributes and times: few
            # distinct ones, the points of one series set sharing one.
            prefixes = {head: b"\x0a" + _length(len(head) + size) + head for head in set(heads)}
            parts = map(bodies.__getitem__, map(slice, range(0, n * size, size), range(size, (n + 1) * size, size)))
            return list(map(add, map(prefixes.__getitem__, heads), parts))
        # count (4), sum (5), zero_count (7), then positive (8) and zero_threshold (14).
        zero_counts = map(itemgetter(0), counts)
        fixed_fields = zip(repeat(0x21, n), totals, repeat(0x29, n), sums, repeat(0x39, n), zero_counts, strict=True)
        fixed = memoryview(Struct("<" + "BQBdBQ" * n).pack(*chain.from_iterable(fixed_fields)))
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
        lengths = list(map(add, map(add, map(len, heads), map(len, positives)), repeat(27 + len(threshold), n)))
        length_varints = map(SMALL.__getitem__ if max(lengths, default=0) < len(SMALL) else varint, lengths)
        fields = zip(repeat(b"\x0a", n), length_varints, heads, parts, positives, repeat(threshold, n), strict=True)
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
        self._kinds: dict[MetricDef, tuple[int | None, int, bytes]] = {}  # data field, point kind, metric head
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
        default_start = self._start_time_ns
        gauge_times = b"\x19" + time_bytes  # a gauge has no start (the SDK sends none either)
        times_of: dict[int, bytes] = {}  # start -> start (2) and time (3)
        # merged resource attributes -> (resource field, its metrics)
        grouped: dict[Attributes, tuple[bytes, _Metrics]] = {}
        # id(Resource) -> (Resource, its own view of its group's metrics, fallback labels, its heads,
        # its group's metrics): Resources are shared by all points of a cgroup, so this is looked
        # up by identity, not by hashing attributes, and only when the resource changes from one
        # point to the next.  A group holds the points of several Resources when they merge into
        # the same attributes (Prometheus labels only: their points' attributes differ by labels).
        by_resource: dict[int, tuple[Resource | None, _Entries, Attributes, list[_Heads], _Metrics]] = {}
        exponential = self.histograms == EXPONENTIAL
        kinds = self._kinds
        used: dict[Attributes, tuple[Attributes, bytes]] = {}
        # fallback labels -> by point kind (_COUNTER ... _EXPONENTIAL), a point's attributes -> its
        # head at the default start: a number data point up to its value, as a data_points field
        # (a scalar point is this plus 9 bytes), or a histogram point's attributes and times.
        heads_of: dict[Attributes, list[dict[Attributes, bytes]]] = {}
        # (attributes, fallback labels, start, kind) -> the head of a point with a start of its own
        started_heads: dict[tuple[Attributes, Attributes, int, int], bytes] = {}
        # (bounds, data field) -> the histogram points' lists, places, heads and values
        Todo = tuple[list[list[bytes]], list[int], list[bytes], list[HistogramValue]]
        histograms: dict[tuple[_Bounds, int], Todo] = {}
        last_resource: object = histograms  # no point's resource
        entries: _Entries = {}
        group_metrics: _Metrics = {}
        labels: Attributes = ()
        heads: list[dict[Attributes, bytes]] = []
        # The latest histogram's bounds, what they share, its kind and data field, and where the
        # histograms of those bounds and kind wait to be encoded: set by the first histogram.
        last_bounds: object = histograms  # no histogram's bounds
        info: _Bounds | None = None
        bounds_code, bounds_tag = _HISTOGRAM, _DATA_FIELDS[Kind.HISTOGRAM]
        todo: Todo = ([], [], [], [])
        for point in batch.points:
            resource = point.resource
            if resource is not last_resource:
                slot = by_resource.get(id(resource))
                if slot is None or slot[0] is not resource:
                    otel = resource.otel if resource is not None else ()
                    merged, resource_field = used[otel] = self._resource(otel)
                    group = grouped.get(merged)
                    if group is None:
                        group = grouped[merged] = (resource_field, {})
                    # A resource with Prometheus labels only: its labels become point attributes,
                    # or its series would collide with other resources'.
                    labels = resource.labels if resource is not None and not resource.otel else ()
                    heads = heads_of.get(labels) or heads_of.setdefault(labels, [{}, {}, {}, {}])
                    slot = by_resource[id(resource)] = (resource, {}, labels, heads, group[1])
                last_resource, entries, labels, heads, group_metrics = slot
            metric = point.metric
            value = point.value
            entry = entries.get(metric)
            if entry is None:  # the metric's first point of this resource
                kind = kinds.get(metric)
                if kind is None:
                    kind = kinds[metric] = (_DATA_FIELDS.get(metric.kind), _CODES.get(metric.kind, _COUNTER),
                                            self._metric_head(metric))  # fmt: skip
                data_tag, code, metric_head = kind
                if data_tag is None or (code == _HISTOGRAM) is not isinstance(value, HistogramValue):
                    continue  # a receiver bug; one bad point must not fail the request
                if code == _HISTOGRAM and exponential and self._bounds_of(value.bounds).exponent is not None:  # type: ignore[union-attr]
                    code, data_tag = _EXPONENTIAL, EXPONENTIAL_FIELD
                points = _group_points(group_metrics, metric, metric_head, data_tag, code)
                entry = entries[metric] = (points, code, heads[code])
            points, code, kind_heads = entry
            if code < _HISTOGRAM:
                if type(value) is int:
                    number = _int_value(0x31, value)
                elif type(value) is float or not isinstance(value, HistogramValue):
                    number = _double_value(0x21, value)
                else:
                    continue  # a receiver bug
            else:
                if not isinstance(value, HistogramValue):
                    continue  # a receiver bug
                bounds = value.bounds
                if bounds is not last_bounds:
                    info = self._bounds_of(bounds)
                    last_bounds = bounds
                    bounds_code = _EXPONENTIAL if exponential and info.exponent is not None else _HISTOGRAM
                    bounds_tag = EXPONENTIAL_FIELD if bounds_code == _EXPONENTIAL else _DATA_FIELDS[Kind.HISTOGRAM]
                    todo = histograms.get((info, bounds_tag)) or histograms.setdefault(
                        (info, bounds_tag), ([], [], [], [])
                    )
                if bounds_code != code:  # not the kind of histogram of the metric's first point here
                    key = (metric, bounds_code)
                    other = entries.get(key)
                    if other is None:
                        points = _group_points(group_metrics, metric, kinds[metric][2], bounds_tag, bounds_code)
                        other = entries[key] = (points, bounds_code, heads[bounds_code])
                    points, code, kind_heads = other
            # The point's head (its attributes and times), the same for numbers and histograms.
            start = point.start_time_ns
            if not start or start == default_start:
                head = kind_heads.get(point.attributes)
                if head is None:
                    head = kind_heads[point.attributes] = self._point_head(
                        point.attributes, labels, code, default_start, time_bytes, gauge_times, times_of
                    )
            else:
                head = self._started_head(point.attributes, labels, code, start, time_bytes, gauge_times,
                                          times_of, started_heads)  # fmt: skip
            if code < _HISTOGRAM:
                points.append(head + number)
                continue
            # Encoded below with the other histograms of its bounds and kind, into its place.
            todo[0].append(points)
            todo[1].append(len(points))
            todo[2].append(head)
            todo[3].append(value)
            points.append(b"")
        for (bounds_info, data_tag), (lists, places, histogram_heads, values) in histograms.items():
            encoded = bounds_info.histogram_points(histogram_heads, values, data_tag == EXPONENTIAL_FIELD)
            for points_list, place, one in zip(lists, places, encoded, strict=True):
                points_list[place] = one
        self._resources = used  # only the resources of the latest snapshot stay cached
        if len(self._attributes) > 4 * len(batch) + 1000:
            self._attributes.clear()  # attribute sets of gone series
        builder = _Requests(self.max_points, self._scope)
        for resource_field, metrics in grouped.values():
            builder.add_resource(resource_field, list(metrics.values()))
        return builder.finish()

    def _started_head(
        self,
        attributes: Attributes,
        labels: Attributes,
        code: int,
        start: int,
        time_bytes: bytes,
        gauge_times: bytes,
        times_of: dict[int, bytes],
        started_heads: dict[tuple[Attributes, Attributes, int, int], bytes],
    ) -> bytes:
        """_point_head() of a point with a start of its own (not the agent's)."""
        key = (attributes, labels, start, code)
        head = started_heads.get(key)
        if head is None:
            head = started_heads[key] = self._point_head(attributes, labels, code, start, time_bytes, gauge_times,
                                                         times_of)  # fmt: skip
        return head

    def _point_head(
        self,
        attributes: Attributes,
        labels: Attributes,
        code: int,
        start: int,
        time_bytes: bytes,
        gauge_times: bytes,
        times_of: dict[int, bytes],
    ) -> bytes:
        """What a point of this kind, attributes and start holds before its value: a number data
        point's data_points field up to its value (9 bytes: a double or int64), a histogram
        point's attributes and times."""
        times = times_of.get(start)
        if times is None:
            times = times_of[start] = b"\x11" + _u64(start) + b"\x19" + time_bytes
        if code == _HISTOGRAM:
            return self._point_attributes(attributes, labels, 0x4A) + times
        if code == _EXPONENTIAL:
            return self._point_attributes(attributes, labels, 0x0A) + times
        body = self._point_attributes(attributes, labels, 0x3A) + (gauge_times if code == _GAUGE else times)
        return b"\x0a" + varint(len(body) + 9) + body

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
        self.headers = _Headers()

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

    def add_resource(self, resource: bytes, metrics: list[tuple[bytes, int, list[bytes], int]]) -> None:
        """The metrics (head, data field, data points) of one resource: in one ResourceMetrics of
        this request when they all fit (the common case, with the sizes add() would have
        reached), else metric by metric."""
        if not metrics:
            return
        heads, data_tags, lists, _ = zip(*metrics, strict=True)
        tails = list(map(_DATA_TAILS.__getitem__, data_tags))
        count = sum(map(len, lists))
        # Each Metric's data field: its points and tail.
        sizes = list(map(add, map(sum, map(map, repeat(len), lists)), map(len, tails)))
        grown = self.size + len(resource) + len(self.scope) + 3 * _FIELD_OVERHEAD + sum(sizes)
        grown += sum(map(len, heads)) + 2 * _FIELD_OVERHEAD * len(metrics)
        if self.points + count > self.max_points or grown > MAX_REQUEST_BYTES:
            for head, data_tag, points, _ in metrics:
                self.add(resource, head, data_tag, points)
            return
        self._close_resource()
        pieces = self.pieces
        self.resource = resource
        self.resource_at = len(pieces)
        pieces.append(b"")  # its head, written when it closes
        headers = list(map(self.headers.__getitem__, zip(heads, data_tags, sizes, strict=True)))
        # header, points..., tail of each metric
        pieces += chain.from_iterable(chain.from_iterable(zip(zip(headers), lists, zip(tails), strict=True)))
        self.scope_size = len(self.scope) + sum(map(len, headers)) + sum(sizes)
        self.size = grown
        self.points += count

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


class _Headers(dict[tuple[bytes, int, int], bytes]):
    """(metric head, data field, the data field's size) -> the Metric field up to its data field's
    content: metrics of one kind and as many points of the same sizes (a node's pods) share it."""

    def __missing__(self, key: tuple[bytes, int, int]) -> bytes:
        head, data_tag, data_size = key
        data_length = varint(data_size)
        header = self[key] = b"".join(
            (b"\x12", varint(len(head) + 1 + len(data_length) + data_size), head, _TAGS[data_tag], data_length)
        )
        return header


# A number point's value: as_double (4) or as_int (6).
_double_value = Struct("<Bd").pack
_int_value = Struct("<Bq").pack
# Kinds of point, by how their heads differ.
_COUNTER, _GAUGE, _HISTOGRAM, _EXPONENTIAL = range(4)
_CODES = {Kind.COUNTER: _COUNTER, Kind.GAUGE: _GAUGE, Kind.HISTOGRAM: _HISTOGRAM}
# A resource group's metrics: metric (or metric and point kind) -> (metric head, data field,
# [point], point kind).
_Metrics = dict[object, tuple[bytes, int, list[bytes], int]]
# One Resource's view of them: metric (or metric and point kind) -> ([point], point kind, the heads
# of its kind and of the Resource's labels).
_Heads = dict[Attributes, bytes]
_Entries = dict[object, tuple[list[bytes], int, _Heads]]


def _group_points(group: _Metrics, metric: MetricDef, metric_head: bytes, data_tag: int, code: int) -> list[bytes]:
    """The points of this metric and kind of point in a resource group: under the metric for the
    kind of its first point there, under (metric, kind) for the other kind of histogram."""
    found = group.get(metric)
    if found is None:
        found = group[metric] = (metric_head, data_tag, [], code)
    elif found[3] != code:
        found = group.get((metric, code))
        if found is None:
            found = group[(metric, code)] = (metric_head, data_tag, [], code)
    return found[2]


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
