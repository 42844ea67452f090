"""The OTLP exporter's old route, kept as a reference: Points -> the SDK's metric data classes
-> ExportMetricsServiceRequests (opentelemetry-exporter-otlp's `encode_metrics`), gzipped.

Until issue 18 the exporter encoded this way; exporters/otlp/encoding.py now writes the request
bytes directly.  bench/otlp.py measures both side by side, and tests/test_otlp_export.py checks
that the direct encoding decodes to the same requests as this one.  The agent never uses it.
"""

from __future__ import annotations

import gzip
from typing import Any

from kpod.exporters.otlp.encoding import MAX_REQUEST_BYTES, QUEUE_GZIP_LEVEL, SCOPE_NAME, Payload

from kpod import __version__
from kpod.model import Attributes, Batch, HistogramValue, Kind, MetricDef, Point

# (resource attribute key, SDK Resource, metric, point)
Entry = tuple[Attributes, Any, MetricDef, Point]


class SdkEncoder:
    """Points -> SDK data classes -> ExportMetricsServiceRequest, split into bounded requests.

    Lives in the sender thread; built in start() because it imports the SDK.
    """

    def __init__(self, base_attributes: dict[str, str], start_time_ns: int, max_points: int) -> None:
        from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
        from opentelemetry.sdk.metrics import export as sdk
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope

        self._sdk = sdk
        self._encode_metrics = encode_metrics
        self._resource_class = Resource
        self._scope = InstrumentationScope(SCOPE_NAME, __version__)
        self._base = base_attributes
        self._start_time_ns = start_time_ns
        self.max_points = max_points
        # SDK Resources by the point's OTel attributes; rebuilt per batch so that it only holds
        # the pods of the latest snapshot.
        self._resources: dict[Attributes, tuple[Attributes, Any]] = {}
        self._by_attributes: dict[Attributes, Any] = {}

    def _resource(self, otel: Attributes, cache: dict[Attributes, tuple[Attributes, Any]]) -> tuple[Attributes, Any]:
        """(merged attributes, SDK Resource) of a point's OTel attributes.  Keyed by the merged
        attributes: two attribute sets that merge into one must share one Resource, or the
        encoder (which groups by Resource) would keep only one of their ResourceMetrics."""
        found = cache.get(otel)
        if found is None:
            found = self._resources.get(otel)
            if found is None:
                attributes = dict(self._base)
                attributes.update(otel)  # the pod's own k8s.node.name etc. win
                merged = tuple(sorted(attributes.items()))
                found = (merged, self._by_attributes.get(merged) or self._resource_class(attributes))
            self._by_attributes[found[0]] = found[1]
            cache[otel] = found
        return found

    def group(self, points: list[Point]) -> list[Entry]:
        """(resource key, SDK resource, metric, point) in resource, then metric order: the order
        requests are cut in, so that a request repeats as few resources and metrics as possible.
        Keyed by attribute tuples, never by the SDK Resource (its hash serialises JSON)."""
        cache: dict[Attributes, tuple[Attributes, Any]] = {}
        self._by_attributes = {}
        grouped: dict[Attributes, tuple[Any, dict[MetricDef, list[Point]]]] = {}
        for point in points:
            merged, resource = self._resource(point.resource.otel if point.resource is not None else (), cache)
            grouped.setdefault(merged, (resource, {}))[1].setdefault(point.metric, []).append(point)
        entries = [
            (merged, resource, metric, point)
            for merged, (resource, metrics) in grouped.items()
            for metric, metric_points in metrics.items()
            for point in metric_points
        ]
        # Only the resources of the latest snapshot stay cached: gone pods are forgotten.
        self._resources = cache
        return entries

    def _data_point(self, point: Point, time_ns: int) -> Any:
        attributes = dict(point.attributes)
        if point.resource is not None and not point.resource.otel:
            # A resource with Prometheus labels only: keep them, or its series would collide.
            attributes.update(point.resource.labels)
        start = point.start_time_ns or self._start_time_ns
        value = point.value
        if isinstance(value, HistogramValue):
            return self._sdk.HistogramDataPoint(
                attributes=attributes,
                start_time_unix_nano=start,
                time_unix_nano=time_ns,
                count=value.count,
                sum=value.sum,
                bucket_counts=list(value.counts),
                explicit_bounds=list(value.bounds),
                # The kernel keeps no min or max: leave them unset rather than guess.
                min=None,  # type: ignore[arg-type]
                max=None,  # type: ignore[arg-type]
            )
        return self._sdk.NumberDataPoint(
            attributes=attributes, start_time_unix_nano=start, time_unix_nano=time_ns, value=value
        )

    def _metric(self, metric: MetricDef, data_points: list[Any]) -> Any | None:
        sdk = self._sdk
        cumulative = sdk.AggregationTemporality.CUMULATIVE
        if metric.kind is Kind.COUNTER:
            data = sdk.Sum(data_points=data_points, aggregation_temporality=cumulative, is_monotonic=True)
        elif metric.kind is Kind.GAUGE:
            data = sdk.Gauge(data_points=data_points)
        elif metric.kind is Kind.HISTOGRAM:
            data = sdk.Histogram(data_points=data_points, aggregation_temporality=cumulative)
        else:
            return None
        return sdk.Metric(name=metric.name, description=metric.description, unit=metric.unit, data=data)

    def metrics_data(self, entries: list[Entry], time_ns: int) -> Any:
        """One MetricsData of consecutive grouped entries."""
        sdk = self._sdk
        by_resource: dict[Attributes, tuple[Any, dict[MetricDef, list[Any]]]] = {}
        for key, resource, metric, point in entries:
            if isinstance(point.value, HistogramValue) != (metric.kind is Kind.HISTOGRAM):
                continue  # a receiver bug; one bad point must not fail the request
            metrics = by_resource.setdefault(key, (resource, {}))[1]
            metrics.setdefault(metric, []).append(self._data_point(point, time_ns))
        resource_metrics = []
        for resource, metrics in by_resource.values():
            converted = [m for m in (self._metric(metric, dps) for metric, dps in metrics.items()) if m is not None]
            scope = sdk.ScopeMetrics(scope=self._scope, metrics=converted, schema_url="")
            resource_metrics.append(sdk.ResourceMetrics(resource=resource, scope_metrics=[scope], schema_url=""))
        return sdk.MetricsData(resource_metrics=resource_metrics)

    def requests(self, batch: Batch) -> list[tuple[Any, int]]:
        """(ExportMetricsServiceRequest, points) per request: at most max_points points each,
        halved again while a request is over MAX_REQUEST_BYTES."""
        entries = self.group(batch.points)
        out: list[tuple[Any, int]] = []
        pending = [entries[i : i + self.max_points] for i in range(0, len(entries), self.max_points)]
        while pending:
            chunk = pending.pop(0)
            request = self._encode_metrics(self.metrics_data(chunk, batch.time_ns))
            if request.ByteSize() > MAX_REQUEST_BYTES and len(chunk) > 1:
                half = len(chunk) // 2
                pending[:0] = [chunk[:half], chunk[half:]]
                continue
            out.append((request, len(chunk)))
        return out

    def payloads(self, batch: Batch) -> list[Payload]:
        """The batch as gzip-compressed serialized requests, as the exporter's queue held them."""
        return [
            Payload(gzip.compress(request.SerializeToString(), QUEUE_GZIP_LEVEL), points)
            for request, points in self.requests(batch)
        ]
