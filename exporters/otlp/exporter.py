"""The OTLP exporter: pushes each cycle's snapshot to an OpenTelemetry Collector (gRPC or HTTP).

Configured as `exporters: {otlp: {...}}`, several at once as `otlp/<name>`:

    endpoint          host:port or a URL.  grpc: default localhost:4317; http/protobuf: default
                      localhost:4318, path /v1/metrics unless the URL names one
    protocol          grpc (default) | http/protobuf
    headers           sent with every request (gRPC metadata, HTTP headers): auth tokens...
    tls               insecure (plaintext), ca_file, cert_file + key_file (client certificate)
    compression       gzip (default) | none
    timeout           one request attempt
    interval          how often a snapshot is sent (default: the poll interval)
    max_batch_points  points per request; requests are also split until each stays under the
                      Collector's default 4 MiB receive limit
    queue_size        snapshots held while the collector is slow or away (default 10)
    backoff_initial / backoff_max   transient-error retry backoff (doubling, with jitter)

How a snapshot travels: `export()` (called from the collection loop) only appends the batch to a
bounded queue and returns; it never converts, encodes or touches the network.  One sender thread
converts each batch to the SDK's metric data classes (`opentelemetry.sdk.metrics.export`, built by
hand: no MeterProvider, since kernel data is already aggregated), encodes them with the exporter
package's `encode_metrics` into requests of at most max_batch_points points (and under 4 MiB), keeps
them gzip-compressed (about 0.15 MB per 110-pod snapshot instead of ~3 MB of Point objects), and
sends them oldest first.  Batches that arrive while a retry waits are encoded during the wait.

Why not `OTLPMetricExporter.export()`: in opentelemetry-exporter-otlp 1.45 it retries inside the
call (up to 6 attempts, backoff 1 s, 2 s, 4 s... with +-20 % jitter, all within one `timeout`
deadline), logs every failure at ERROR, and returns only SUCCESS/FAILURE, so the caller can tell
neither a permanent rejection (bad request, auth) from a transient outage nor how long to wait.
Here one attempt is one request; this module owns the retry loop (capped exponential backoff with
jitter, RetryInfo / Retry-After honoured up to the cap), classifies errors as the OTLP spec does,
logs each distinct error once and counts everything in self-metrics.

Failure behaviour:
  - transient (gRPC UNAVAILABLE, DEADLINE_EXCEEDED, ...; HTTP 429/502/503/504; connection errors):
    the request is retried with backoff until it succeeds or its batch is superseded;
  - permanent (gRPC INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, ...; other HTTP 4xx):
    logged once per distinct error, counted, the request's points dropped; no retry;
  - the queue holds at most `queue_size` batches, the one being retried included; when a new
    batch arrives to a full queue the OLDEST is dropped (values are cumulative: the newest
    snapshot carries everything the dropped one did except its timestamp) and its points are
    counted in kpod_exporter_dropped_points_total{exporter}.  Memory stays bounded however long
    the collector is away, and delivery resumes by itself when it is back.

The OpenTelemetry and gRPC modules (about 30 MB) are imported in `start()`, so an agent without
an OTLP exporter never loads them.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import http.client
import logging
import random
import socket
import ssl
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from kpod import __version__
from kpod.component import ComponentUnavailable, Context, Exporter, Factory
from kpod.model import Attributes, Batch, HistogramValue, Kind, MetricDef, Point
from kpod.selfmetrics import (
    EXPORTER_DROPPED_POINTS,
    EXPORTER_DROPPED_POINTS_HELP,
    EXPORTER_FAILED_REQUESTS,
    EXPORTER_FAILED_REQUESTS_HELP,
    EXPORTER_QUEUE_BATCHES,
    EXPORTER_QUEUE_BATCHES_HELP,
    EXPORTER_SENT_POINTS,
    EXPORTER_SENT_POINTS_HELP,
    declare_exporter_metrics,
)
from kpod.units import Duration

SERVICE_NAME = "kpod-metrics"
SCOPE_NAME = "kpod-metrics"
GRPC_DEFAULT_PORT = 4317
HTTP_DEFAULT_PORT = 4318
HTTP_METRICS_PATH = "/v1/metrics"
# A Collector's default gRPC receive limit is 4 MiB; keep a margin for framing and metadata.
MAX_REQUEST_BYTES = 4 * 1024 * 1024 - 64 * 1024
# How many distinct error messages are remembered for "log once" (bounded like everything else).
MAX_REMEMBERED_ERRORS = 64
# Shutdown must not hold the agent's exit (the agent has 5 s in total).
SHUTDOWN_JOIN_S = 2.0
# Held requests are compressed fast (the sender thread's CPU), not small: level 1.
QUEUE_GZIP_LEVEL = 1

# OTLP spec (exporter retry): these gRPC codes are transient.  RESOURCE_EXHAUSTED only when the
# server sends RetryInfo (otherwise it is e.g. "message larger than max": retrying cannot help).
GRPC_EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
GRPC_RETRYABLE = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"})
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})


# --------------------------------------------------------------------------- config


@dataclass
class TlsConfig:
    # Plaintext (no TLS).  With grpc an endpoint http://... means the same; https://... means TLS.
    insecure: bool = False
    # PEM file of the CA that signed the collector's certificate; empty = the system's roots.
    ca_file: str = ""
    # Client certificate and key (PEM) for mutual TLS; both or neither.
    cert_file: str = ""
    key_file: str = ""

    def validate(self) -> None:
        if bool(self.cert_file) != bool(self.key_file):
            raise ValueError("tls.cert_file and tls.key_file go together")
        if self.insecure and (self.ca_file or self.cert_file):
            raise ValueError("tls.insecure is plaintext: ca_file, cert_file and key_file would be ignored")


@dataclass
class OtlpConfig:
    endpoint: str = ""
    protocol: str = field(default="grpc", metadata={"choices": ("grpc", "http/protobuf")})
    headers: dict[str, str] = field(default_factory=dict)
    tls: TlsConfig = field(default_factory=TlsConfig)
    compression: str = field(default="gzip", metadata={"choices": ("gzip", "none")})
    timeout: Duration = field(default_factory=lambda: Duration.parse("10s"), metadata={"min": 0.01, "max": 300})
    # None: every cycle (the poll interval).
    interval: Duration | None = None
    max_batch_points: int = field(default=5000, metadata={"min": 1, "max": 1_000_000})
    queue_size: int = field(default=10, metadata={"min": 1, "max": 10_000})
    backoff_initial: Duration = field(default_factory=lambda: Duration.parse("1s"), metadata={"min": 0.01})
    backoff_max: Duration = field(default_factory=lambda: Duration.parse("30s"), metadata={"min": 0.01})

    def validate(self) -> None:
        resolve_target(self)  # raises ValueError with the reason
        if self.backoff_max.seconds < self.backoff_initial.seconds:
            raise ValueError("backoff_max must be at least backoff_initial")
        for key in self.headers:
            if not key or any(c in key for c in " \r\n:"):
                raise ValueError(f"headers: invalid header name {key!r}")
        for value in self.headers.values():
            if "\r" in value or "\n" in value:
                raise ValueError("headers: a value contains a line break")


@dataclass(frozen=True)
class Target:
    """Where and how to connect, resolved from endpoint, protocol and tls."""

    protocol: str  # grpc | http/protobuf
    secure: bool
    host: str
    port: int
    path: str  # HTTP only

    @property
    def grpc_target(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def __str__(self) -> str:
        if self.protocol == "grpc":
            return f"grpc{'s' if self.secure else ''}://{self.grpc_target}"
        return f"{'https' if self.secure else 'http'}://{self.grpc_target}{self.path}"


def resolve_target(config: OtlpConfig) -> Target:
    """Endpoint + protocol + tls -> Target.  Raises ValueError naming the problem.

    Without a scheme the endpoint is host[:port] and TLS is on unless tls.insecure (as the
    Collector's own otlp exporter does); the default ports are 4317 (grpc) and 4318 (http).
    """
    grpc = config.protocol == "grpc"
    default_port = GRPC_DEFAULT_PORT if grpc else HTTP_DEFAULT_PORT
    endpoint = config.endpoint.strip() or f"localhost:{default_port}"
    scheme = ""
    if "://" in endpoint:
        scheme = endpoint.split("://", 1)[0].lower()
        if scheme not in ("http", "https"):
            raise ValueError(f"endpoint {endpoint!r}: scheme must be http or https")
        parsed = urllib.parse.urlsplit(endpoint)
    else:
        parsed = urllib.parse.urlsplit("//" + endpoint)
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError as error:
        raise ValueError(f"endpoint {endpoint!r}: {error}") from None
    if not host:
        raise ValueError(f"endpoint {endpoint!r}: no host")
    if port is None:
        port = {"http": 80, "https": 443}.get(scheme, default_port) if scheme and not grpc else default_port
    if scheme == "https" and config.tls.insecure:
        raise ValueError(f"endpoint {endpoint!r} is https but tls.insecure asks for plaintext")
    secure = scheme == "https" or (not scheme and not config.tls.insecure)
    if scheme == "http" and (config.tls.ca_file or config.tls.cert_file):
        raise ValueError(f"endpoint {endpoint!r} is plaintext http but tls files are configured")
    path = parsed.path or ""
    if grpc:
        if path not in ("", "/"):
            raise ValueError(f"endpoint {endpoint!r}: a gRPC endpoint has no path")
        path = ""
    elif path in ("", "/"):
        path = HTTP_METRICS_PATH
    if parsed.query:
        path += "?" + parsed.query
    return Target(config.protocol, secure, host, port, path)


# --------------------------------------------------------------------------- points -> OTLP

# (resource attribute key, SDK Resource, metric, point)
Entry = tuple[Attributes, Any, MetricDef, Point]


class SendError(Exception):
    """One failed request.  `permanent`: retrying the same request cannot succeed."""

    def __init__(self, message: str, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


class Encoder:
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
        """The batch as gzip-compressed serialized requests: what the queue holds.  A node's
        snapshot is ~3 MB of Point objects, ~1.5 MB of protobuf, ~0.15 MB gzipped (level 1), so
        a queue of held snapshots costs little memory however long the collector is away."""
        return [
            Payload(gzip.compress(request.SerializeToString(), QUEUE_GZIP_LEVEL), points)
            for request, points in self.requests(batch)
        ]


@dataclass
class Payload:
    gzipped: bytes  # a serialized ExportMetricsServiceRequest, gzip-compressed
    points: int


# --------------------------------------------------------------------------- transports


class GrpcTransport:
    def __init__(self, target: Target, config: OtlpConfig) -> None:
        import grpc
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

        self._grpc = grpc
        self._metadata = tuple((k.lower(), v) for k, v in config.headers.items())
        self._compression = grpc.Compression.Gzip if config.compression == "gzip" else grpc.Compression.NoCompression
        options = [
            ("grpc.primary_user_agent", f"kpod-metrics/{__version__}"),
            # Our loop retries; gRPC's own retries would hide attempts from it.
            ("grpc.enable_retries", 0),
            # After a long outage the channel's reconnect backoff (default up to 120 s) must not
            # outlast ours: reconnect at least as often as we retry.
            ("grpc.initial_reconnect_backoff_ms", max(100, int(config.backoff_initial.seconds * 1000))),
            ("grpc.min_reconnect_backoff_ms", max(100, int(config.backoff_initial.seconds * 1000))),
            ("grpc.max_reconnect_backoff_ms", max(100, int(config.backoff_max.seconds * 1000))),
        ]
        if target.secure:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(config.tls.ca_file) if config.tls.ca_file else None,
                private_key=_read(config.tls.key_file) if config.tls.key_file else None,
                certificate_chain=_read(config.tls.cert_file) if config.tls.cert_file else None,
            )
            self._channel = grpc.secure_channel(target.grpc_target, credentials, options=options)
        else:
            self._channel = grpc.insecure_channel(target.grpc_target, options=options)
        # The MetricsService Export method as the opentelemetry-proto stub defines it, but taking
        # the request already serialized (the queue holds bytes, not messages).
        self._export = self._channel.unary_unary(
            GRPC_EXPORT_METHOD,
            request_serializer=None,
            response_deserializer=ExportMetricsServiceResponse.FromString,
        )

    def send(self, payload: Payload, timeout: float) -> None:
        """Send one request.  Raises SendError, or PartialSuccess with the rejected points."""
        grpc = self._grpc
        try:
            response = self._export(
                gzip.decompress(payload.gzipped),  # gRPC compresses per message itself
                timeout=timeout,
                metadata=self._metadata,
                compression=self._compression,
            )
        except grpc.RpcError as error:
            code = error.code() if hasattr(error, "code") else None
            name = code.name if code is not None else "UNKNOWN"
            details = error.details() if hasattr(error, "details") else str(error)
            message = f"gRPC {name}: {details}"
            retry_after = _grpc_retry_delay(error)
            if name in GRPC_RETRYABLE or (name == "RESOURCE_EXHAUSTED" and retry_after is not None):
                raise SendError(message, permanent=False, retry_after=retry_after) from None
            raise SendError(message, permanent=True) from None
        partial = response.partial_success
        if partial.rejected_data_points or partial.error_message:
            raise PartialSuccess(int(partial.rejected_data_points), partial.error_message)

    def close(self) -> None:
        # Cancels an RPC in progress, so that shutdown does not wait for its timeout.
        self._channel.close()


class PartialSuccess(Exception):
    def __init__(self, rejected: int, message: str) -> None:
        super().__init__(message)
        self.rejected = rejected
        self.message = message


def _grpc_retry_delay(error: Any) -> float | None:
    """The server's RetryInfo delay (google.rpc.RetryInfo in the trailers), if it sent one."""
    try:
        trailers = dict(error.trailing_metadata() or ())
    except Exception:
        return None
    raw = trailers.get("google.rpc.retryinfo-bin")
    if raw is None:
        return None
    try:
        from google.rpc.error_details_pb2 import RetryInfo

        info = RetryInfo()
        info.ParseFromString(raw)
        return info.retry_delay.seconds + info.retry_delay.nanos / 1e9
    except Exception:
        return None


class HttpTransport:
    """OTLP/HTTP with protobuf bodies over one kept-alive connection (http.client: no extra
    dependency, and a socket we can cut at shutdown)."""

    def __init__(self, target: Target, config: OtlpConfig) -> None:
        self._target = target
        self._gzip = config.compression == "gzip"
        self._headers = {
            "Content-Type": "application/x-protobuf",
            "User-Agent": f"kpod-metrics/{__version__}",
            **config.headers,
        }
        if self._gzip:
            self._headers["Content-Encoding"] = "gzip"
        self._context: ssl.SSLContext | None = None
        if target.secure:
            self._context = ssl.create_default_context(cafile=config.tls.ca_file or None)
            if config.tls.cert_file:
                self._context.load_cert_chain(config.tls.cert_file, config.tls.key_file)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        with self._lock:
            if self._conn is None:
                if self._context is not None:
                    self._conn = http.client.HTTPSConnection(
                        self._target.host, self._target.port, timeout=timeout, context=self._context
                    )
                else:
                    self._conn = http.client.HTTPConnection(self._target.host, self._target.port, timeout=timeout)
            conn = self._conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_connection(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def send(self, payload: Payload, timeout: float) -> None:
        """Send one request.  Raises SendError, or PartialSuccess with the rejected points."""
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceResponse

        body = payload.gzipped if self._gzip else gzip.decompress(payload.gzipped)
        conn = self._connection(timeout)
        try:
            conn.request("POST", self._target.path, body=body, headers=self._headers)
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException) as error:
            self._drop_connection()
            reason = "timed out" if isinstance(error, socket.timeout) else f"{type(error).__name__}: {error}"
            raise SendError(f"HTTP {self._target}: {reason}", permanent=False) from None
        if response.getheader("Connection", "").lower() == "close":
            self._drop_connection()
        status = response.status
        if 200 <= status < 300:
            parsed = ExportMetricsServiceResponse()
            try:
                parsed.ParseFromString(data)
            except Exception:  # an empty or odd body on success is still a success
                return
            partial = parsed.partial_success
            if partial.rejected_data_points or partial.error_message:
                raise PartialSuccess(int(partial.rejected_data_points), partial.error_message)
            return
        message = f"HTTP {status} {response.reason}".strip() + _status_message(data)
        if status in HTTP_RETRYABLE:
            raise SendError(message, permanent=False, retry_after=_retry_after(response.getheader("Retry-After")))
        raise SendError(message, permanent=True)

    def close(self) -> None:
        with self._lock:
            conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)  # unblocks a read in progress
        self._drop_connection()


def _status_message(data: bytes) -> str:
    """The google.rpc.Status message an OTLP/HTTP server puts in an error body, if any."""
    if not data:
        return ""
    try:
        from google.rpc.status_pb2 import Status

        status = Status()
        status.ParseFromString(data)
        if status.message:
            return f": {status.message[:200]}"
    except Exception:
        pass
    text = data[:200].decode("utf-8", "replace").strip()
    return f": {text}" if text.isprintable() else ""


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: rare from collectors; our own backoff applies


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except OSError as error:
        raise ComponentUnavailable(f"cannot read {path}: {error.strerror}") from None


# --------------------------------------------------------------------------- the exporter


@dataclass
class _Item:
    batch: Batch | None  # as export() got it; None once encoded
    points: int
    payloads: list[Payload] | None = None  # the encoded requests, once the sender got to it
    abandoned: bool = False  # superseded while being retried: dropped at the next check


class OtlpExporter(Exporter):
    def __init__(self, context: Context, config: OtlpConfig) -> None:
        super().__init__(context, config)
        self.config: OtlpConfig = config
        self.target = resolve_target(config)
        settings = context.settings
        self.interval_s = config.interval.seconds if config.interval else settings.poll_interval.seconds
        self._labels = (("exporter", self.id),)
        self._metrics = context.self_metrics
        declare_exporter_metrics(self._metrics, self.id)
        self._cond = threading.Condition()
        self._queue: collections.deque[_Item] = collections.deque()
        self._inflight: _Item | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._transport: GrpcTransport | HttpTransport | None = None
        self._encoder: Encoder | None = None
        self._last_enqueued = 0.0
        self._logged: set[str] = set()
        # Consecutive transient failures and when the next attempt may go (monotonic).
        self._attempt = 0
        self._retry_at = 0.0
        # Counters mirrored in status() (the self-metrics hold the same numbers).
        self.sent_points = 0
        self.failed_requests = 0
        self.dropped_points = 0
        self.consecutive_failures = 0
        self.last_success_unix = 0.0
        self.last_error = ""
        self.next_retry_unix = 0.0

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        # The heavy imports happen here, only when an OTLP exporter is configured.
        transport_class = GrpcTransport if self.target.protocol == "grpc" else HttpTransport
        try:
            self._transport = transport_class(self.target, self.config)
        except (OSError, ssl.SSLError) as error:
            raise ComponentUnavailable(f"exporters.{self.id}: TLS setup failed: {error}") from None
        settings = self.context.settings
        base = {"service.name": SERVICE_NAME, "service.version": __version__, "host.name": socket.gethostname()}
        if settings.node_name:
            base["k8s.node.name"] = settings.node_name
        status = self.context.status
        start_ns = int(status.started_unix * 1e9) if status is not None else time.time_ns()
        self._encoder = Encoder(base, start_ns, self.config.max_batch_points)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"otlp-{self.id}", daemon=True)
        self._thread.start()
        self.log.info(
            "sending to %s every %gs (queue %d batches)", self.target, self.interval_s, self.config.queue_size
        )

    def shutdown(self) -> None:
        with self._cond:
            if self._stopping and self._thread is None:
                return
            self._stopping = True
            left = sum(item.points for item in self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if left:
            self._count_dropped(left)
        transport = self._transport
        if transport is not None:
            transport.close()  # cuts a request in progress
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(SHUTDOWN_JOIN_S)
        self._set_queue_gauge()

    # The collection loop's side: O(1), never blocks on the network -----------------------------

    def export(self, batch: Batch) -> None:
        now = time.monotonic()
        # 5 % slack: cycles are not exactly poll_interval apart.
        if self._last_enqueued and now - self._last_enqueued < 0.95 * self.interval_s:
            return
        self._last_enqueued = now
        dropped = 0
        with self._cond:
            if self._stopping:
                return
            self._queue.append(_Item(batch, len(batch)))
            while self._held() > self.config.queue_size:
                inflight = self._inflight
                if inflight is not None and not inflight.abandoned:
                    # The batch being retried is the oldest: it goes first.  The sender counts
                    # the points it had not delivered yet when it notices.
                    inflight.abandoned = True
                else:
                    dropped += self._queue.popleft().points
            self._cond.notify_all()
        if dropped:
            self._count_dropped(dropped)
        self._set_queue_gauge()

    def _held(self) -> int:
        inflight = self._inflight
        return len(self._queue) + (1 if inflight is not None and not inflight.abandoned else 0)

    def queue_batches(self) -> int:
        with self._cond:
            return self._held()

    # The sender thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    self._inflight = None
                    return
                item = self._inflight = self._queue.popleft()
            try:
                self._encode(item)
                self._deliver(item)
            except Exception:  # a bug must be visible, and must not end the sender
                self.log.exception("unexpected error while exporting; batch dropped")
                self._count_dropped(item.points)
            finally:
                with self._cond:
                    self._inflight = None
                self._set_queue_gauge()

    def _encode(self, item: _Item) -> None:
        """Batch -> compressed requests, and let go of the batch's Point objects."""
        batch = item.batch
        if item.payloads is not None or batch is None:
            return
        assert self._encoder is not None
        item.payloads = self._encoder.payloads(batch)
        item.batch = None

    def _encode_waiting(self) -> bool:
        """Encode one waiting batch (called while a retry waits).  False if none was left."""
        with self._cond:
            raw = next((i for i in self._queue if i.payloads is None), None)
        if raw is None:
            return False
        self._encode(raw)  # outside the lock: export() stays O(1) meanwhile
        return True

    def _wait_backoff(self, item: _Item, delay: float) -> None:
        """Sleep until the retry, early on shutdown or when this batch is superseded; encode the
        batches that arrive meanwhile so that they are held compressed."""
        deadline = time.monotonic() + delay
        while True:
            with self._cond:
                remaining = deadline - time.monotonic()
                if self._stopping or item.abandoned or remaining <= 0:
                    return
                if not any(i.payloads is None for i in self._queue):
                    self._cond.wait(remaining)
                    continue
            self._encode_waiting()

    def _deliver(self, item: _Item) -> None:
        assert self._transport is not None and item.payloads is not None
        payloads = item.payloads
        for index, payload in enumerate(payloads):
            points = payload.points
            while True:
                with self._cond:
                    give_up = self._stopping or item.abandoned
                if give_up:
                    self._count_dropped(sum(p.points for p in payloads[index:]))
                    return
                # The backoff belongs to the collector, not to a batch: the next batch (after
                # this one was superseded) waits it out too, or a full queue would mean one
                # attempt per arriving snapshot.
                wait = self._retry_at - time.monotonic()
                if wait > 0:
                    self._wait_backoff(item, wait)
                    continue
                try:
                    self._transport.send(payload, self.config.timeout.seconds)
                except PartialSuccess as partial:
                    self._succeeded(points - partial.rejected)  # resets the backoff too
                    self._count_dropped(partial.rejected)
                    self._log_once(
                        logging.WARNING, f"partial:{partial.message}",
                        "%s rejected %d of %d points: %s", self.target, partial.rejected, points, partial.message,
                    )
                    break
                except SendError as error:
                    self._failed(str(error))
                    if error.permanent:
                        self._attempt, self._retry_at = 0, 0.0  # it answered: reachable
                        self._count_dropped(points)
                        self._log_once(
                            logging.ERROR, str(error),
                            "%s rejected a request (%s); its %d points are dropped, not retried",
                            self.target, error, points,
                        )
                        break
                    self._log_once(
                        logging.WARNING, str(error),
                        "%s: %s; retrying with backoff (queue: %d batches)", self.target, error, self._held(),
                    )
                    delay = self._backoff(self._attempt, error.retry_after)
                    self._attempt += 1
                    self._retry_at = time.monotonic() + delay
                    self.next_retry_unix = time.time() + delay
                    continue
                self._succeeded(points)
                break

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.config.backoff_max.seconds
        base = min(cap, self.config.backoff_initial.seconds * 2**min(attempt, 30))
        # Jitter of +-20 %: exporters restarted together (a DaemonSet rollout) spread out.
        delay = min(cap, base * random.uniform(0.8, 1.2))
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay

    # Accounting --------------------------------------------------------------------------------

    def _succeeded(self, points: int) -> None:
        self._attempt, self._retry_at, self.next_retry_unix = 0, 0.0, 0.0
        if self.consecutive_failures:
            self.log.info("%s reachable again after %d failed requests", self.target, self.consecutive_failures)
            # A later outage with the same message is worth a log line again.
            self._logged.clear()
        self.consecutive_failures = 0
        self.last_error = ""
        self.last_success_unix = time.time()
        self.sent_points += points
        self._metrics.inc(EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, self._labels, points)

    def _failed(self, message: str) -> None:
        self.failed_requests += 1
        self.consecutive_failures += 1
        self.last_error = message
        self._metrics.inc(EXPORTER_FAILED_REQUESTS, EXPORTER_FAILED_REQUESTS_HELP, self._labels)

    def _count_dropped(self, points: int) -> None:
        if points <= 0:
            return
        self.dropped_points += points
        self._metrics.inc(EXPORTER_DROPPED_POINTS, EXPORTER_DROPPED_POINTS_HELP, self._labels, points)

    def _set_queue_gauge(self) -> None:
        self._metrics.set(EXPORTER_QUEUE_BATCHES, EXPORTER_QUEUE_BATCHES_HELP, self.queue_batches(), self._labels)

    def _log_once(self, level: int, key: str, message: str, *args: Any) -> None:
        """Each distinct error once (an outage would otherwise log every retry)."""
        if key in self._logged:
            self.log.debug(message, *args)
            return
        if len(self._logged) >= MAX_REMEMBERED_ERRORS:
            self._logged.clear()
        self._logged.add(key)
        self.log.log(level, message, *args)

    def status(self) -> dict[str, Any]:
        return {
            "endpoint": str(self.target),
            "interval_seconds": self.interval_s,
            "queue_batches": self.queue_batches(),
            "queue_size": self.config.queue_size,
            "sending": self._inflight is not None,
            "sent_points": self.sent_points,
            "failed_requests": self.failed_requests,
            "dropped_points": self.dropped_points,
            "consecutive_failures": self.consecutive_failures,
            "last_success_unix": self.last_success_unix,
            "last_error": self.last_error,
            "next_retry_unix": self.next_retry_unix,
        }


factory = Factory(
    type="otlp",
    kind="exporter",
    config_class=OtlpConfig,
    create=OtlpExporter,
    description="Pushes every snapshot to an OpenTelemetry Collector (OTLP gRPC or HTTP/protobuf).",
)
