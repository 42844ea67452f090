"""One OTLP request over gRPC or HTTP/protobuf, its errors classified as the OTLP spec does.

`send()` makes one attempt and raises `SendError` (transient or permanent, with the server's
retry delay when it sent one) or `PartialSuccess`; the retry loop is the exporter's.  grpc and
the OTLP protobuf modules are imported when a transport is built.
"""

from __future__ import annotations

import contextlib
import gzip
import http.client
import socket
import ssl
import threading
from typing import Any

from kpod.exporters.otlp.config import OtlpConfig, Target
from kpod.exporters.otlp.encoding import Payload

from kpod import __version__
from kpod.component import ComponentUnavailable

# OTLP spec (exporter retry): these gRPC codes are transient.  RESOURCE_EXHAUSTED only when the
# server sends RetryInfo (otherwise it is e.g. "message larger than max": retrying cannot help).
GRPC_EXPORT_METHOD = "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export"
GRPC_RETRYABLE = frozenset({"CANCELLED", "DEADLINE_EXCEEDED", "ABORTED", "OUT_OF_RANGE", "UNAVAILABLE", "DATA_LOSS"})
HTTP_RETRYABLE = frozenset({429, 502, 503, 504})


class SendError(Exception):
    """One failed request.  `permanent`: retrying the same request cannot succeed."""

    def __init__(self, message: str, permanent: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.retry_after = retry_after


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
