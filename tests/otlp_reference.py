"""ExportMetricsServiceRequests written the plain way: each message nested in its parent field
by field, point by point, as metrics.proto lays it out.  Slow, and meant to be read: the bytes
that kpod.exporters.otlp.encoding must produce, which tests compare with its output byte for
byte (its speed comes from caching and packing, never from writing something else).

What the encoder chose, and this repeats: fields in the order written below (a point's
attributes first), empty strings written, and an exponential histogram's positive bucket counts
as varints of 4 bytes for every point of a family (histograms of one bounds tuple and one kind in
the snapshot) when all its counts are below 2^27, of 8 bytes below 2^55, else minimal.  Requests
are cut at max_points only (the byte limit is the encoder's own test's business).
"""

from __future__ import annotations

from struct import Struct

from kpod.exporters.protowire import field, varint, zigzag

from kpod import __version__
from kpod.model import Attributes, Batch, HistogramValue, Kind, Point, base2_exponent

_u64, _i64, _f64 = Struct("<Q").pack, Struct("<q").pack, Struct("<d").pack
_DATA = {Kind.GAUGE: 0x2A, Kind.COUNTER: 0x3A, Kind.HISTOGRAM: 0x4A}
_EXPONENTIAL = 0x52
# Sum: temporality cumulative (2), is_monotonic; histograms: temporality; a Gauge: nothing.
_TAILS = {0x2A: b"", 0x3A: b"\x10\x02\x18\x01", 0x4A: b"\x10\x02", 0x52: b"\x10\x02"}


def _key_values(tag: int, items: Attributes | list[tuple[str, str]]) -> bytes:
    return b"".join(
        field(tag, field(0x0A, key.encode()) + field(0x12, field(0x0A, value.encode("utf-8", "replace"))))
        for key, value in items
    )


def _fixed_varint(value: int, width: int) -> bytes:
    return bytes((value >> 7 * i) & 0x7F | (0x80 if i < width - 1 else 0) for i in range(width))


def _width(family: list[tuple[int, ...]]) -> int | None:
    """The varint width of a family's positive counts: 4 or 8 bytes, None for minimal ones."""
    values = [c for counts in family for c in counts]
    if not all(type(c) is int and c >= 0 for c in values):
        return None
    return next((w for w in (4, 8) if all(c < 1 << 7 * w - 1 for c in values)), None)


def reference_requests(
    batch: Batch, base: dict[str, str], start_time_ns: int, max_points: int, histograms: str = "explicit"
) -> list[tuple[bytes, int]]:
    time_bytes = _u64(batch.time_ns)
    # Which data field each point goes to, and the padded counts of each histogram family.
    placed: list[tuple[Point, int]] = []
    families: dict[tuple[int, int], list[tuple[int, ...]]] = {}
    for point in batch.points:
        tag = _DATA.get(point.metric.kind)
        if tag is None or isinstance(point.value, HistogramValue) is not (point.metric.kind is Kind.HISTOGRAM):
            continue
        if isinstance(point.value, HistogramValue):
            bounds = point.value.bounds
            if histograms == "exponential" and base2_exponent(bounds) is not None:
                tag = _EXPONENTIAL
            buckets = len(bounds) + 1
            counts = (tuple(point.value.counts) + (0,) * buckets)[:buckets]
            families.setdefault((id(bounds), tag), []).append(counts)
        placed.append((point, tag))
    widths = {key: _width(family) for key, family in families.items()}

    # ResourceMetrics by merged resource attributes, Metrics by (metric, data field), in order.
    resources: dict[Attributes, dict[tuple[object, int], list[bytes]]] = {}
    for point, tag in placed:
        resource = point.resource
        merged_resource = dict(base)
        merged_resource.update(resource.otel if resource is not None else ())
        labels = resource.labels if resource is not None and not resource.otel else ()
        merged = dict(point.attributes)
        merged.update(labels)
        start = point.start_time_ns or start_time_ns
        value = point.value
        if isinstance(value, HistogramValue):
            buckets = len(value.bounds) + 1
            counts = (tuple(value.counts) + (0,) * buckets)[:buckets]
            times = b"\x11" + _u64(start) + b"\x19" + time_bytes
            head = times + b"\x21" + _u64(sum(counts)) + b"\x29" + _f64(value.sum)
            if tag == _EXPONENTIAL:
                exponent = base2_exponent(value.bounds)
                assert exponent is not None
                body = _key_values(0x0A, list(merged.items())) + head + b"\x39" + _u64(counts[0])
                nonzero = [k for k in range(1, buckets) if counts[k]]
                if nonzero:
                    low, high = nonzero[0], nonzero[-1]
                    width = widths[(id(value.bounds), tag)]
                    window = counts[low : high + 1]
                    packed = b"".join(varint(c) if width is None else _fixed_varint(c, width) for c in window)
                    body += field(0x42, b"\x08" + varint(zigzag(exponent + low - 1)) + field(0x12, packed))
                body += b"\x71" + _f64(value.bounds[0])
            else:
                body = (
                    _key_values(0x4A, list(merged.items()))
                    + head
                    + field(0x32, b"".join(map(_u64, counts)))
                    + field(0x3A, b"".join(map(_f64, value.bounds)))
                )
        else:
            times = b"\x19" + time_bytes  # a gauge has no start
            if point.metric.kind is not Kind.GAUGE:
                times = b"\x11" + _u64(start) + times
            number = b"\x31" + _i64(value) if type(value) is int else b"\x21" + _f64(value)
            body = _key_values(0x3A, list(merged.items())) + times + number
        metrics = resources.setdefault(tuple(sorted(merged_resource.items())), {})
        metrics.setdefault((point.metric, tag), []).append(field(0x0A, body))

    scope = field(0x0A, field(0x0A, b"kpod-metrics") + field(0x12, __version__.encode()))
    # Cut greedily at max_points: (resource, metric, data field, points) runs of each request.
    requests: list[list[tuple[Attributes, object, int, list[bytes]]]] = [[]]
    room = max_points
    for merged_resource, metrics in resources.items():
        for (metric, tag), points in metrics.items():
            while points:
                if room == 0:
                    requests.append([])
                    room = max_points
                taken = points[:room]
                requests[-1].append((merged_resource, metric, tag, taken))
                room -= len(taken)
                points = points[len(taken) :]
    out = []
    for runs in requests:
        body = b""
        count = 0
        index = 0
        while index < len(runs):
            merged_resource = runs[index][0]
            metrics_bytes = b""
            while index < len(runs) and runs[index][0] == merged_resource:
                _, metric, tag, points = runs[index]
                head = (
                    field(0x0A, metric.name.encode())  # type: ignore[attr-defined]
                    + field(0x12, metric.description.encode("utf-8", "replace"))  # type: ignore[attr-defined]
                    + field(0x1A, metric.unit.encode())  # type: ignore[attr-defined]
                )
                metrics_bytes += field(0x12, head + field(tag, b"".join(points) + _TAILS[tag]))
                count += len(points)
                index += 1
            resource_field = field(0x0A, _key_values(0x0A, merged_resource))
            body += field(0x0A, resource_field + field(0x12, scope + metrics_bytes))
        if count:
            out.append((body, count))
    return out
