"""Real OTLP receivers for the tests: a gRPC MetricsService and an HTTP /v1/metrics server.

Both listen on 127.0.0.1 only, record every request they accept (decoded with the
opentelemetry-proto classes), and can be told to answer with an error, to be slow, or to be
stopped and started again on the same port.  TLS material comes from `make_tls()` (openssl CLI).
`make_exporter()` points an OTLP exporter at one of them; `assert_delivered_equal()` compares
what arrived with the batch that was exported, point for point.  `with_otel()` gives the
synthetic node batch (bench.synthetic) the OTel resource attributes k8sattributes would set.
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import math
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from helpers import QuietHandler, free_port, serve_http, server_tls, stop_http
from kpod.exporters.otlp.config import OtlpConfig, TlsConfig
from kpod.exporters.otlp.exporter import OtlpExporter
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.metrics.v1 import metrics_pb2

from kpod.component import Context
from kpod.model import Batch, HistogramValue, Kind, MetricDef, Point, Resource
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings
from kpod.units import Duration

Request = metrics_service_pb2.ExportMetricsServiceRequest


def with_otel(batch: Batch) -> Batch:
    """The synthetic node batch with the OTel resource attributes k8sattributes would set."""
    resources: dict[Any, Resource] = {}
    for point in batch.points:
        labels = point.resource.labels if point.resource else ()
        resource = resources.get(labels)
        if resource is None:
            found = dict(labels)
            otel = {
                "k8s.namespace.name": found["namespace"],
                "k8s.pod.name": found["pod"],
                "k8s.pod.uid": f"uid-{found['pod']}",
                "k8s.container.name": found["container"],
                "container.id": f"cid-{found['pod']}",
                "k8s.node.name": found["node"],
            }
            resource = resources[labels] = Resource(labels, tuple(sorted(otel.items())))
        point.resource = resource
    return batch


def self_point(name: str, value: float) -> Point:
    return Point(MetricDef(name, Kind.GAUGE, "1", "agent"), None, (("exporter", "x"),), value)


@dataclass
class Received:
    request: Any  # ExportMetricsServiceRequest
    metadata: dict[str, str]  # gRPC metadata or HTTP headers (lower-case names)
    encoding: str  # "gzip" or "" (what arrived on the wire)
    size: int  # bytes on the wire (HTTP) or of the decoded message (gRPC)
    at: float  # time.monotonic()


class _Recorder:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.received: list[Received] = []
        self.attempts = 0  # requests seen, answered with an error or not
        self.attempt_times: list[float] = []

    def record_attempt(self) -> None:
        with self.lock:
            self.attempts += 1
            self.attempt_times.append(time.monotonic())

    def add(self, item: Received) -> None:
        with self.lock:
            self.received.append(item)

    def requests(self) -> list[Received]:
        with self.lock:
            return list(self.received)

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.requests()
            if predicate(got):
                return got
            time.sleep(0.02)
        raise AssertionError(f"receiver: condition not met within {timeout}s ({len(self.requests())} requests)")


class GrpcReceiver(_Recorder):
    """grpc.server with the MetricsService servicer from opentelemetry-proto's stubs."""

    def __init__(self, port: int = 0, tls: TlsFiles | None = None, client_ca: bool = False) -> None:
        super().__init__()
        self.port = port or free_port()
        self.tls = tls
        self.client_ca = client_ca
        # None: accept.  A grpc.StatusCode: abort every request with it.
        self.fail_with: grpc.StatusCode | None = None
        self.delay_s = 0.0
        self._server: grpc.Server | None = None

    def start(self) -> GrpcReceiver:
        recorder = self

        class Servicer(metrics_service_pb2_grpc.MetricsServiceServicer):
            def Export(self, request: Any, context: grpc.ServicerContext) -> Any:
                recorder.record_attempt()
                if recorder.delay_s:
                    time.sleep(recorder.delay_s)
                if recorder.fail_with is not None:
                    context.abort(recorder.fail_with, "refused by the test receiver")
                metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
                recorder.add(
                    Received(request, metadata, metadata.get("grpc-encoding", ""), request.ByteSize(), time.monotonic())
                )
                return metrics_service_pb2.ExportMetricsServiceResponse()

        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 1)])
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(Servicer(), server)
        address = f"127.0.0.1:{self.port}"
        if self.tls is not None:
            credentials = grpc.ssl_server_credentials(
                [(self.tls.server_key.read_bytes(), self.tls.server_cert.read_bytes())],
                root_certificates=self.tls.ca_cert.read_bytes() if self.client_ca else None,
                require_client_auth=self.client_ca,
            )
            bound = server.add_secure_port(address, credentials)
        else:
            bound = server.add_insecure_port(address)
        assert bound == self.port, f"could not bind {address}"
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.stop(grace=0).wait(5)


class HttpReceiver(_Recorder):
    """OTLP/HTTP: POST /v1/metrics with application/x-protobuf, optional gzip."""

    def __init__(self, port: int = 0, tls: TlsFiles | None = None) -> None:
        super().__init__()
        self.port = port or free_port()
        self.tls = tls
        self.fail_status: int | None = None
        self.retry_after: str | None = None
        self._server: http.server.ThreadingHTTPServer | None = None
        # Kept-alive client connections: a stopped receiver must not go on serving them.
        self.connections: list[socket.socket] = []

    def start(self) -> HttpReceiver:
        recorder = self

        class Handler(QuietHandler):
            def setup(self) -> None:
                super().setup()
                with recorder.lock:
                    recorder.connections.append(self.connection)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                recorder.record_attempt()
                if self.path != "/v1/metrics":
                    self._answer(404, b"no such path")
                    return
                if recorder.fail_status is not None:
                    self._answer(recorder.fail_status, b"refused by the test receiver")
                    return
                encoding = self.headers.get("Content-Encoding", "")
                data = gzip.decompress(body) if encoding == "gzip" else body
                request = Request()
                request.ParseFromString(data)
                headers = {k.lower(): v for k, v in self.headers.items()}
                recorder.add(Received(request, headers, encoding, len(body), time.monotonic()))
                self._answer(200, metrics_service_pb2.ExportMetricsServiceResponse().SerializeToString())

            def _answer(self, code: int, body: bytes) -> None:
                retry = {"Retry-After": recorder.retry_after} if recorder.retry_after and code in (429, 503) else {}
                self.reply(code, body, "application/x-protobuf", retry)

        tls = server_tls(self.tls.server_cert, self.tls.server_key) if self.tls is not None else None
        self._server = serve_http(Handler, port=self.port, tls=tls)
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        stop_http(server)
        with self.lock:
            connections, self.connections = self.connections, []
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)


# --------------------------------------------------------------------------- TLS material


@dataclass
class TlsFiles:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=kpod test CA")
    extensions = directory / "server.ext"
    extensions.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (directory / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, ext in (("server", "server.ext"), ("client", "client.ext")):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
            "-subj", f"/CN=kpod test {name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "2", "-extfile", ext)
    return TlsFiles(
        directory / "ca.crt", directory / "server.crt", directory / "server.key",
        directory / "client.crt", directory / "client.key",
    )


# --------------------------------------------------------------------------- exporter and comparison

NODE = "node-1"


def make_exporter(
    receiver: GrpcReceiver | HttpReceiver | None,
    protocol: str,
    metrics: SelfMetrics | None = None,
    port: int | None = None,
    **overrides: Any,
) -> OtlpExporter:
    settings = KpodSettings()
    settings.node_name = NODE
    settings.poll_interval = Duration(0.01)  # export() every call
    port = port if port is not None else receiver.port  # type: ignore[union-attr]
    config = OtlpConfig(
        endpoint=f"127.0.0.1:{port}",
        protocol=protocol,
        **{
            "tls": TlsConfig(insecure=True),
            "backoff_initial": Duration(0.05),
            "backoff_max": Duration(0.2),
            "timeout": Duration(2.0),
            **overrides,
        },
    )
    config.validate()
    context = Context(id="otlp/test", settings=settings, cgroups=None, self_metrics=metrics or SelfMetrics())  # type: ignore[arg-type]
    exporter = OtlpExporter(context, config)
    exporter.start()
    return exporter


# --------------------------------------------------------------------------- decoding


def flatten(received: list[Received]) -> list[dict[str, Any]]:
    """One record per data point, with its resource, scope and metric."""
    out = []
    for item in received:
        for rm in item.request.resource_metrics:
            resource = {kv.key: kv.value.string_value for kv in rm.resource.attributes}
            for sm in rm.scope_metrics:
                for metric in sm.metrics:
                    kind = metric.WhichOneof("data")
                    data = getattr(metric, kind)
                    for dp in data.data_points:
                        record: dict[str, Any] = {
                            "resource": resource,
                            "scope": (sm.scope.name, sm.scope.version),
                            "name": metric.name,
                            "unit": metric.unit,
                            "description": metric.description,
                            "kind": kind,
                            "temporality": getattr(data, "aggregation_temporality", None),
                            "monotonic": getattr(data, "is_monotonic", None),
                            "attributes": {kv.key: kv.value.string_value for kv in dp.attributes},
                            "start": dp.start_time_unix_nano,
                            "time": dp.time_unix_nano,
                        }
                        if kind == "histogram":
                            record["value"] = (
                                tuple(dp.explicit_bounds), tuple(dp.bucket_counts), dp.sum, dp.count,
                                dp.HasField("min"), dp.HasField("max"),
                            )
                        elif kind == "exponential_histogram":
                            record["value"] = ExponentialValue(
                                dp.scale, dp.zero_threshold, dp.zero_count, dp.positive.offset,
                                tuple(dp.positive.bucket_counts), len(dp.negative.bucket_counts), dp.sum, dp.count,
                                dp.HasField("min") or dp.HasField("max"),
                            )
                        else:
                            record["value"] = dp.as_double if dp.WhichOneof("value") == "as_double" else dp.as_int
                        out.append(record)
    return out


@dataclass(frozen=True)
class ExponentialValue:
    scale: int
    zero_threshold: float
    zero_count: int
    offset: int
    positive: tuple[int, ...]
    negatives: int
    sum: float
    count: int
    min_or_max: bool

    def buckets(self) -> dict[int, int]:
        """Count by bucket index (index i holds (2^i, 2^(i+1)] at scale 0), empty ones left out."""
        return {self.offset + k: c for k, c in enumerate(self.positive) if c}


def as_exponential(value: HistogramValue) -> dict[int, int]:
    """What an explicit histogram with power-of-two bounds is at scale 0, computed from the
    bounds' own values (not with the exporter's code): bucket k >= 1, (bounds[k-1], bounds[k]],
    is index log2(bounds[k-1]); the +Inf bucket the index after the last bound's."""
    out = {}
    for k, count in enumerate(value.counts[1:], start=1):
        lower = value.bounds[k - 1]
        index = round(math.log2(lower))
        assert 2.0**index == lower, "bounds are not powers of two"
        if count:
            out[index] = count
    return out


def series_key(resource: dict[str, str], name: str, attributes: dict[str, str]) -> tuple[Any, ...]:
    return (tuple(sorted(resource.items())), name, tuple(sorted(attributes.items())))


def expected_records(batch: Batch) -> dict[tuple[Any, ...], Point]:
    base = {"service.name": "kpod-metrics", "host.name": socket.gethostname(), "k8s.node.name": NODE}
    out: dict[tuple[Any, ...], Point] = {}
    for point in batch.points:
        resource = dict(base)
        if point.resource is not None:
            resource.update(point.resource.otel)
        key = series_key(resource, point.metric.name, dict(point.attributes))
        assert key not in out, f"test batch has a duplicate series {key}"
        out[key] = point
    return out


def total_points(received: list[Received]) -> int:
    return len(flatten(received))


def assert_delivered_equal(batch: Batch, received: list[Received], histograms: str = "explicit") -> None:
    records = flatten(received)
    expected = expected_records(batch)
    assert len(records) == len(expected), (len(records), len(expected))
    kinds = {Kind.COUNTER: "sum", Kind.GAUGE: "gauge", Kind.HISTOGRAM: "histogram"}
    if histograms == "exponential":
        kinds[Kind.HISTOGRAM] = "exponential_histogram"
    cumulative = metrics_pb2.AggregationTemporality.AGGREGATION_TEMPORALITY_CUMULATIVE
    seen = set()
    for record in records:
        resource = dict(record["resource"])
        assert resource.pop("service.version")  # present, the agent's version
        key = series_key(resource, record["name"], record["attributes"])
        assert key in expected, f"unexpected series {key}"
        assert key not in seen, f"series sent twice {key}"
        seen.add(key)
        point = expected[key]
        assert record["scope"][0] == "kpod-metrics"
        assert record["unit"] == point.metric.unit
        assert record["description"] == point.metric.description
        assert record["kind"] == kinds[point.metric.kind]
        assert record["time"] == batch.time_ns
        if point.metric.kind is Kind.GAUGE:
            assert record["temporality"] is None
        else:
            assert record["temporality"] == cumulative
            assert record["start"] > 0 and record["start"] <= record["time"]
        if point.metric.kind is Kind.COUNTER:
            assert record["monotonic"] is True
        if isinstance(point.value, HistogramValue) and histograms == "exponential":
            got = record["value"]
            assert (got.scale, got.negatives, got.min_or_max) == (0, 0, False)
            assert got.zero_threshold == point.value.bounds[0]
            assert got.zero_count == point.value.counts[0]
            assert got.buckets() == as_exponential(point.value)
            assert got.count == point.value.count
            assert got.sum == pytest.approx(point.value.sum, rel=1e-12)
        elif isinstance(point.value, HistogramValue):
            bounds, counts, total, count, has_min, has_max = record["value"]
            assert bounds == point.value.bounds
            assert counts == point.value.counts
            assert len(counts) == len(bounds) + 1
            assert total == pytest.approx(point.value.sum, rel=1e-12)
            assert count == point.value.count
            assert not has_min and not has_max  # the kernel keeps neither
        else:
            assert record["value"] == pytest.approx(point.value, rel=1e-12)
