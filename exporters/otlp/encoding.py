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
from dataclasses import dataclass
from struct import Struct

from kpod.exporters.protowire import SMALL, field, varint, zigzag

from kpod import __version__
from kpod.model import Attributes, Batch, HistogramValue, Kind, MetricDef, Point, Resource, base2_exponent

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
# Bytes a length-delimited field may add around its content (tag, length varint up to 2^28).
_FIELD_OVERHEAD = 5


def key_values(tag: int, items: Attributes | list[tuple[str, str]]) -> bytes:
    """Repeated KeyValue {key = 1, value = 2: AnyValue {string_value = 1}} under field `tag`."""
    return b"".join(
        field(tag, field(0x0A, key.encode()) + field(0x12, field(0x0A, value.encode("utf-8", "replace"))))
        for key, value in items
    )


class _Bounds:
    """What every histogram with these bounds shares."""

    __slots__ = ("counts", "explicit", "exponent")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        # HistogramDataPoint.explicit_bounds (7), packed doubles, and the packing of the counts (6).
        self.explicit = field(0x3A, Struct(f"<{len(bounds)}d").pack(*bounds))
        self.counts = Struct(f"<{len(bounds) + 1}Q").pack
        self.exponent = base2_exponent(bounds)


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

    def _histogram_point(
        self, point: Point, labels: Attributes, value: HistogramValue, times: bytes, info: _Bounds
    ) -> bytes:
        """HistogramDataPoint: attributes (9), start (2), time (3), count (4), sum (5),
        bucket_counts (6), explicit_bounds (7).  min and max stay unset: the kernel keeps neither."""
        counts = value.counts
        buckets = len(value.bounds) + 1
        if len(counts) != buckets:  # tolerate a short or long count tuple: pad or cut
            counts = (tuple(counts) + (0,) * buckets)[:buckets]
        attributes = self._point_attributes(point.attributes, labels, 0x4A)
        return b"".join((
            attributes, times, b"\x21", _u64(sum(counts)), b"\x29", _f64(value.sum),
            b"\x32", varint(8 * buckets), info.counts(*counts), info.explicit,
        ))  # fmt: skip

    def _exponential_point(
        self, point: Point, labels: Attributes, value: HistogramValue, times: bytes, exponent: int
    ) -> bytes:
        """ExponentialHistogramDataPoint: attributes (1), start (2), time (3), count (4), sum (5),
        scale (6: 0, the default, so absent), zero_count (7), positive (8: Buckets {offset = 1,
        bucket_counts = 2}), zero_threshold (14).  Bucket k >= 1 of the kernel, (2^(e+k-1),
        2^(e+k)], is index e + k - 1 at scale 0 (index i covers (2^i, 2^(i+1)])."""
        counts = value.counts
        buckets = len(value.bounds) + 1
        if len(counts) != buckets:
            counts = (tuple(counts) + (0,) * buckets)[:buckets]
        low, high = 1, buckets
        while low < high and not counts[low]:
            low += 1
        while high > low and not counts[high - 1]:
            high -= 1
        if low < high:
            packed = b"".join([SMALL[c] if c < 0x4000 else varint(c) for c in counts[low:high]])
            buckets_field = b"\x08" + varint(zigzag(exponent + low - 1)) + b"\x12" + varint(len(packed)) + packed
            positive = field(0x42, buckets_field)
        else:
            positive = b""
        attributes = self._point_attributes(point.attributes, labels, 0x0A)
        return b"".join((
            attributes, times, b"\x21", _u64(sum(counts)), b"\x29", _f64(value.sum),
            b"\x39", _u64(counts[0]), positive, b"\x71", _f64(value.bounds[0]),
        ))  # fmt: skip

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
                    encoded = self._exponential_point(point, slot[2], value, times, info.exponent)  # type: ignore[arg-type]
                else:
                    encoded = self._histogram_point(point, slot[2], value, times, info)  # type: ignore[arg-type]
                # As a data_points field (1) of its Histogram already.
                encoded = b"\x0a" + varint(len(encoded)) + encoded
                key: object = (metric, data_tag)
            else:
                head_key = (point.attributes, slot[2], start, gauge)
                head = number_heads.get(head_key)
                if head is None:
                    # A gauge has no start (the SDK sends none either).
                    times = gauge_times if gauge else b"\x11" + _u64(start) + b"\x19" + time_bytes
                    body = self._point_attributes(point.attributes, slot[2], 0x3A) + times
                    head = number_heads[head_key] = b"\x0a" + varint(len(body) + 9) + body
                encoded = head + (b"\x31" + _i64(value) if type(value) is int else b"\x21" + _f64(value))  # type: ignore[arg-type]
                key = metric
            points = slot[1].get(key)
            if points is None:
                points = slot[1][key] = (metric, data_tag, [])
            points[2].append(encoded)
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
    resources and metrics as possible)."""

    def __init__(self, max_points: int, scope: bytes) -> None:
        self.max_points = max_points
        self.scope = scope
        self.out: list[tuple[bytes, int]] = []
        self.resources: list[bytes] = []  # finished ResourceMetrics fields of this request
        self.resource: bytes | None = None  # the resource field being filled
        self.metrics: list[bytes] = []  # its Metric fields so far
        self.points = 0
        self.size = 0

    def _close_resource(self) -> None:
        if self.resource is not None and self.metrics:
            scope_metrics = field(0x12, self.scope + b"".join(self.metrics))
            self.resources.append(field(0x0A, self.resource + scope_metrics))
        self.resource, self.metrics = None, []

    def _close_request(self) -> None:
        self._close_resource()
        if self.resources:
            self.out.append((b"".join(self.resources), self.points))
        self.resources, self.points, self.size = [], 0, 0

    def add(self, resource: bytes, head: bytes, data_tag: int, points: list[bytes]) -> None:
        """One metric's data points (each already a data_points field) of one resource."""
        tail = _DATA_TAILS[data_tag]
        if resource is not self.resource:
            self._close_resource()
        done = 0
        while done < len(points):
            if self.points >= self.max_points or self.size >= MAX_REQUEST_BYTES:
                self._close_request()
            if self.resource is None:
                self.resource = resource
                self.size += len(resource) + len(self.scope) + 3 * _FIELD_OVERHEAD
            self.size += len(head) + len(tail) + 2 * _FIELD_OVERHEAD
            room = self.max_points - self.points
            taken = points[done : done + room] if done or room < len(points) else points
            grown = self.size + sum(map(len, taken))
            if grown > MAX_REQUEST_BYTES:  # rare: cut where the request is full
                grown, kept = self.size, 0
                for one in taken:
                    if grown + len(one) > MAX_REQUEST_BYTES and (kept or self.points):
                        break
                    grown += len(one)
                    kept += 1
                taken = taken[:kept]
                grown = max(grown, MAX_REQUEST_BYTES)  # full: the next round starts a new request
            self.size = grown
            done += len(taken)
            self.points += len(taken)
            if taken:
                self.metrics.append(field(0x12, head + field(data_tag, b"".join(taken) + tail)))

    def finish(self) -> list[tuple[bytes, int]]:
        self._close_request()
        return self.out


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
