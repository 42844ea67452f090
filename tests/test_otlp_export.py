"""The OTLP exporter against real OTLP receivers (gRPC MetricsService and HTTP /v1/metrics on
127.0.0.1): what arrives equals what the batch held, point for point."""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import histogram_count_families, require_tools
from kpod.exporters.otlp.config import OtlpConfig, TlsConfig, resolve_target
from otlp_receiver import (
    GrpcReceiver,
    HttpReceiver,
    assert_delivered_equal,
    flatten,
    make_exporter,
    make_tls,
    self_point,
    total_points,
    with_otel,
)

from bench.synthetic import node_batch
from kpod.config import ConfigError, load_config
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point, Resource
from kpod.selfmetrics import SelfMetrics
from kpod.units import Duration

PROTOCOLS = ("grpc", "http/protobuf")


# --------------------------------------------------------------------------- delivery


@pytest.mark.parametrize(("protocol", "histograms"), [*((p, "explicit") for p in PROTOCOLS), ("grpc", "exponential")])
def test_node_batch_arrives_point_for_point(protocol: str, histograms: str) -> None:
    receiver = (GrpcReceiver() if protocol == "grpc" else HttpReceiver()).start()
    exporter = make_exporter(
        receiver, protocol, max_batch_points=1000, headers={"X-Scope-OrgID": "tenant-7"}, histograms=histograms
    )
    try:
        batch = with_otel(node_batch(pods=40, seed=3))
        batch.add(self_point("kpod.test.agent.gauge", 3.5))
        exporter.export(batch)
        received = receiver.wait_for(lambda got: total_points(got) >= len(batch))
        time.sleep(0.1)  # anything extra would arrive now
        received = receiver.requests()
        assert_delivered_equal(batch, received, histograms)
        # max_batch_points: every request within it, and more than one request for this batch.
        sizes = [total_points([r]) for r in received]
        assert max(sizes) <= 1000 and len(received) == -(-len(batch) // 1000)
        assert all(r.metadata.get("x-scope-orgid") == "tenant-7" for r in received)
        # One Resource per container of each pod, the agent's own points under the agent's.
        pods = {rec["resource"].get("k8s.pod.name") for rec in flatten(received)}
        assert len(pods) == 40 + 1  # 40 pods + the agent (no pod name)
        assert exporter.sent_points == len(batch)
        assert exporter.failed_requests == 0
    finally:
        exporter.shutdown()
        receiver.stop()


def test_direct_encoding_decodes_to_what_the_sdk_route_sent() -> None:
    """The requests written byte by byte decode, with the official classes, to the same messages
    as the SDK route the exporter used before (bench/otlp_sdk.py: SDK data classes and
    opentelemetry-exporter-otlp's encode_metrics), attribute order aside."""
    from google.protobuf.json_format import MessageToDict
    from kpod.exporters.otlp.encoding import Encoder
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    from bench.otlp_sdk import SdkEncoder

    def normalised(message: Any) -> Any:
        if isinstance(message, dict):
            return {
                k: sorted((normalised(i) for i in v), key=lambda kv: kv["key"]) if k == "attributes" else normalised(v)
                for k, v in message.items()
            }
        if isinstance(message, list):
            return [normalised(i) for i in message]
        return message

    base = {"service.name": "kpod-metrics", "host.name": "node-x"}
    batch = with_otel(node_batch(pods=30, seed=5))
    batch.add(self_point("kpod.test.agent.gauge", 3.5))
    bare = Resource((("cgroup", "/system.slice/x"),))  # labels only, no OTel attributes
    batch.add(Point(MetricDef("kpod.test.counter", Kind.COUNTER, "1", "c"), CgroupRef(9, "/x"), (), 7, bare))
    ours = Encoder(base, 1_000, 700).requests(batch)
    theirs = SdkEncoder(base, 1_000, 700).requests(batch)
    assert [points for _, points in ours] == [points for _, points in theirs]
    decoded = [normalised(MessageToDict(ExportMetricsServiceRequest.FromString(body))) for body, _ in ours]
    assert decoded == [normalised(MessageToDict(request)) for request, _ in theirs]


def test_requests_are_split_below_the_collector_receive_limit() -> None:
    """A huge max_batch_points still yields requests under 4 MiB (the Collector's default)."""
    receiver = GrpcReceiver().start()
    exporter = make_exporter(receiver, "grpc", max_batch_points=1_000_000, compression="none")
    try:
        batch = with_otel(node_batch(pods=400))  # about 4.5 MB in one request
        exporter.export(batch)
        received = receiver.wait_for(lambda got: total_points(got) >= len(batch), timeout=30)
        assert len(received) >= 2
        assert all(r.size < 4 * 1024 * 1024 for r in received)
        assert_delivered_equal(batch, received)
    finally:
        exporter.shutdown()
        receiver.stop()


def test_real_cgroup_cpu_points_through_the_pipeline(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """cgroup_cpu on this machine's cgroups, k8sattributes (local), OTLP: the cycle's batch,
    with the processor's resource attributes, arrives unchanged."""
    from kpod.agent import build_cgroup_index
    from kpod.pipeline import Pipeline

    receiver = GrpcReceiver().start()
    path = tmp_path / "config.yaml"
    path.write_text(
        "kpod: {profile: custom, poll_interval: 1s, node_name: node-1, discovery: {mode: local}}\n"
        "receivers: {cgroup_cpu: {}}\n"
        f"exporters: {{otlp: {{endpoint: '127.0.0.1:{receiver.port}', tls: {{insecure: true}}}}}}\n"
        "service: {pipelines: {metrics: {receivers: [cgroup_cpu], exporters: [otlp]}}}\n"
    )
    config = load_config(str(path), environ=clean_env)
    pipeline = Pipeline(config, build_cgroup_index(config))
    pipeline.start()
    try:
        batch = pipeline.run_cycle()
        cgroup_points = [p for p in batch.points if p.cgroup is not None]
        if not cgroup_points:
            pytest.skip("cgroup_cpu found no cgroups on this machine")
        assert all(p.resource is not None and p.resource.otel for p in cgroup_points)
        received = receiver.wait_for(lambda got: total_points(got) >= len(batch))
        assert_delivered_equal(batch, received)
        names = {r["name"] for r in flatten(received)}
        assert "kpod.exporter.sent.points" in names  # self-metrics travel too
    finally:
        pipeline.shutdown()
        receiver.stop()


# --------------------------------------------------------------------------- outages


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_collector_down_then_back(protocol: str) -> None:
    """Stop the receiver mid-run: the queue stays within queue_size, the oldest batches are
    dropped and counted; start it again on the same port: delivery resumes, no restart."""
    receiver = (GrpcReceiver() if protocol == "grpc" else HttpReceiver()).start()
    metrics = SelfMetrics()
    exporter = make_exporter(receiver, protocol, metrics, queue_size=3)
    labels = (("exporter", "otlp/test"),)
    try:
        first = with_otel(node_batch(pods=2, seed=1))
        exporter.export(first)
        receiver.wait_for(lambda got: total_points(got) >= len(first))
        receiver.stop()

        down_batches = [with_otel(node_batch(pods=2, seed=10 + i)) for i in range(8)]
        max_queue = 0
        for batch in down_batches:
            exporter.export(batch)
            max_queue = max(max_queue, exporter.queue_batches())
            assert metrics.get("kpod.exporter.queue.batches", labels) <= 3
            time.sleep(0.15)
        assert max_queue == 3
        assert exporter.failed_requests > 0
        dropped = metrics.get("kpod.exporter.dropped.points", labels)
        # 8 batches while down, at most 3 held: at least 5 were dropped, whole.
        assert dropped >= 5 * len(first) and dropped % len(first) == 0
        assert dropped == exporter.dropped_points

        receiver.start()  # same port
        last = down_batches[-1]
        got = receiver.wait_for(lambda got: any(r["time"] == last.time_ns for r in flatten(got)), timeout=15)
        # The held (newest) batches arrived, the dropped (oldest) ones never did.
        times = {r["time"] for r in flatten(got)}
        held = [b.time_ns for b in down_batches[-3:]]
        assert set(held) <= times
        assert down_batches[0].time_ns not in times
        newest = [r for r in got if flatten([r])[0]["time"] == last.time_ns]
        assert_delivered_equal(last, newest)
        assert exporter.queue_batches() == 0
        assert metrics.get("kpod.exporter.sent.points", labels) == exporter.sent_points == 4 * len(first)
    finally:
        exporter.shutdown()
        receiver.stop()


def test_full_queue_does_not_defeat_the_backoff() -> None:
    """Snapshots arriving faster than the backoff supersede each other, but the attempt rate
    stays the backoff's: the next batch waits out the remaining backoff, no retry storm."""
    import grpc

    receiver = GrpcReceiver().start()
    receiver.fail_with = grpc.StatusCode.UNAVAILABLE
    exporter = make_exporter(
        receiver, "grpc", queue_size=1, backoff_initial=Duration(0.3), backoff_max=Duration(0.3)
    )
    try:
        began = time.monotonic()
        arrivals = 0
        while time.monotonic() - began < 1.5:
            exporter.export(with_otel(node_batch(pods=1, seed=arrivals)))
            arrivals += 1
            time.sleep(0.05)
        attempts = receiver.attempts
        assert arrivals >= 20
        assert 2 <= attempts <= 1.5 / (0.3 * 0.8) + 2, attempts  # ~6, not one per arrival
        assert exporter.dropped_points > 0
    finally:
        exporter.shutdown()
        receiver.stop()


def test_collector_absent_at_start_is_not_fatal() -> None:
    port = GrpcReceiver().port  # nothing listens there yet
    exporter = make_exporter(None, "grpc", port=port)
    try:
        batch = with_otel(node_batch(pods=1))
        exporter.export(batch)
        time.sleep(0.3)
        assert exporter.failed_requests >= 1 and exporter.sent_points == 0
        receiver = GrpcReceiver(port=port).start()
        try:
            got = receiver.wait_for(lambda got: total_points(got) >= len(batch), timeout=15)
            assert_delivered_equal(batch, got)
        finally:
            receiver.stop()
    finally:
        exporter.shutdown()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_export_never_blocks_on_a_slow_collector(protocol: str) -> None:
    receiver = (GrpcReceiver() if protocol == "grpc" else HttpReceiver()).start()
    if protocol == "grpc":
        receiver.delay_s = 1.5  # type: ignore[union-attr]
    else:
        receiver.stop()
        # A listener that accepts and never answers.
        silent = socket.socket()
        silent.bind(("127.0.0.1", receiver.port))
        silent.listen(16)
    exporter = make_exporter(receiver, protocol, queue_size=2)
    try:
        durations = []
        for i in range(6):
            batch = with_otel(node_batch(pods=5, seed=i))
            began = time.perf_counter()
            exporter.export(batch)
            durations.append(time.perf_counter() - began)
            time.sleep(0.05)
        # Blocking on the collector would take its 1.5 s delay or the 2 s timeout; allow for a loaded CI.
        assert max(durations) < 0.25, durations
        assert exporter.queue_batches() <= 2
        assert exporter.dropped_points > 0
        began = time.monotonic()
        exporter.shutdown()
        assert time.monotonic() - began < 3.0  # shutdown cuts the hanging request
    finally:
        exporter.shutdown()
        receiver.stop()
        if protocol != "grpc":
            silent.close()


# --------------------------------------------------------------------------- permanent errors


GRPC_PERMANENT = ("INVALID_ARGUMENT", "UNAUTHENTICATED", "PERMISSION_DENIED")
HTTP_PERMANENT = (400, 401, 403)


@pytest.mark.parametrize(
    ("protocol", "failure"),
    [("grpc", code) for code in GRPC_PERMANENT] + [("http/protobuf", status) for status in HTTP_PERMANENT],
)
def test_permanent_error_is_counted_logged_once_not_retried(
    protocol: str, failure: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import grpc

    receiver = (GrpcReceiver() if protocol == "grpc" else HttpReceiver()).start()
    if protocol == "grpc":
        receiver.fail_with = getattr(grpc.StatusCode, failure)  # type: ignore[union-attr]
    else:
        receiver.fail_status = failure  # type: ignore[union-attr]
    metrics = SelfMetrics()
    labels = (("exporter", "otlp/test"),)
    caplog.set_level(logging.DEBUG, logger="kpod")
    exporter = make_exporter(receiver, protocol, metrics)
    try:
        batches = 4
        for i in range(batches):
            batch = with_otel(node_batch(pods=1, seed=i))
            exporter.export(batch)
            deadline = time.monotonic() + 5
            while exporter.failed_requests < i + 1 and time.monotonic() < deadline:
                time.sleep(0.01)
        time.sleep(0.5)  # several backoff periods: a retry would show now
        assert receiver.attempts == batches  # one request per batch, no retry
        assert exporter.failed_requests == batches
        assert metrics.get("kpod.exporter.failed.requests", labels) == batches
        assert metrics.get("kpod.exporter.dropped.points", labels) == batches * len(batch)
        assert metrics.get("kpod.exporter.sent.points", labels) == 0
        errors = [r for r in caplog.records if r.levelno >= logging.WARNING and "rejected" in r.getMessage()]
        assert len(errors) == 1, [r.getMessage() for r in errors]
        assert str(failure) in errors[0].getMessage()
    finally:
        exporter.shutdown()
        receiver.stop()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_transient_error_is_retried_with_growing_backoff(protocol: str, caplog: pytest.LogCaptureFixture) -> None:
    import grpc

    receiver = (GrpcReceiver() if protocol == "grpc" else HttpReceiver()).start()
    if protocol == "grpc":
        receiver.fail_with = grpc.StatusCode.UNAVAILABLE  # type: ignore[union-attr]
    else:
        receiver.fail_status = 503  # type: ignore[union-attr]
    caplog.set_level(logging.INFO, logger="kpod")
    exporter = make_exporter(receiver, protocol, backoff_initial=Duration(0.05), backoff_max=Duration(0.4))
    try:
        batch = with_otel(node_batch(pods=1))
        exporter.export(batch)
        time.sleep(2.0)
        attempts = receiver.attempt_times[:]
        # Backoff 0.05, 0.1, 0.2, 0.4, 0.4... (+-20 %): about 7 attempts in 2 s, not hundreds.
        assert 4 <= len(attempts) <= 12, len(attempts)
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert min(gaps) >= 0.04, gaps  # never a tight loop
        assert max(gaps) >= 0.3, gaps  # it grew up to the cap...
        assert sorted(gaps)[len(gaps) // 2] <= 0.4 * 1.2 + 0.3, gaps  # ...and stayed there (slack for load)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "retrying" in r.getMessage()]
        assert len(warnings) == 1
        # The collector recovers: the same batch goes through, and that is logged.
        receiver.fail_with = None  # type: ignore[union-attr]
        receiver.fail_status = None  # type: ignore[union-attr]
        got = receiver.wait_for(lambda got: total_points(got) >= len(batch))
        assert_delivered_equal(batch, got)
        assert any("reachable again" in r.getMessage() for r in caplog.records)
    finally:
        exporter.shutdown()
        receiver.stop()


# --------------------------------------------------------------------------- TLS and gzip


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Any:
    require_tools("openssl")
    return make_tls(tmp_path_factory.mktemp("tls"))


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tls_with_a_self_signed_ca(protocol: str, tls_files: Any) -> None:
    receiver = (GrpcReceiver(tls=tls_files) if protocol == "grpc" else HttpReceiver(tls=tls_files)).start()
    trusted = make_exporter(receiver, protocol, tls=TlsConfig(ca_file=str(tls_files.ca_cert)))
    untrusted = make_exporter(receiver, protocol, tls=TlsConfig())  # system roots: not our CA
    try:
        assert trusted.target.secure and untrusted.target.secure
        batch = with_otel(node_batch(pods=2))
        trusted.export(batch)
        got = receiver.wait_for(lambda got: total_points(got) >= len(batch))
        assert_delivered_equal(batch, got)
        untrusted.export(with_otel(node_batch(pods=2)))
        deadline = time.monotonic() + 5
        while untrusted.failed_requests == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert untrusted.failed_requests >= 1 and untrusted.sent_points == 0
        assert total_points(receiver.requests()) == len(batch)
    finally:
        trusted.shutdown()
        untrusted.shutdown()
        receiver.stop()


def test_grpc_mutual_tls(tls_files: Any) -> None:
    receiver = GrpcReceiver(tls=tls_files, client_ca=True).start()
    with_cert = make_exporter(
        receiver, "grpc",
        tls=TlsConfig(ca_file=str(tls_files.ca_cert), cert_file=str(tls_files.client_cert),
                      key_file=str(tls_files.client_key)),
    )
    without = make_exporter(receiver, "grpc", tls=TlsConfig(ca_file=str(tls_files.ca_cert)))
    try:
        batch = with_otel(node_batch(pods=1))
        with_cert.export(batch)
        receiver.wait_for(lambda got: total_points(got) >= len(batch))
        without.export(with_otel(node_batch(pods=1)))
        deadline = time.monotonic() + 5
        while without.failed_requests == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert without.failed_requests >= 1 and without.sent_points == 0
    finally:
        with_cert.shutdown()
        without.shutdown()
        receiver.stop()


def test_http_gzip_on_the_wire() -> None:
    receiver = HttpReceiver().start()
    zipped = make_exporter(receiver, "http/protobuf", compression="gzip")
    plain = make_exporter(receiver, "http/protobuf", compression="none")
    try:
        batch = with_otel(node_batch(pods=5))
        zipped.export(batch)
        (first,) = receiver.wait_for(lambda got: len(got) >= 1)
        plain.export(batch)
        second = receiver.wait_for(lambda got: len(got) >= 2)[1]
        assert first.encoding == "gzip" and second.encoding == ""
        assert first.size < second.size / 3  # really compressed on the wire
        assert_delivered_equal(batch, [first])
        assert_delivered_equal(batch, [second])
    finally:
        zipped.shutdown()
        plain.shutdown()
        receiver.stop()


class _CountingProxy:
    """A loopback TCP forwarder that counts the bytes the client sends (what is on the wire)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.client_bytes = 0
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, count: bool) -> None:
        try:
            while data := source.recv(65536):
                if count:
                    with self._lock:
                        self.client_bytes += len(data)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed = True
        self.listener.close()


@pytest.mark.parametrize("compression", ["gzip", "none"])
def test_grpc_gzip_on_the_wire(compression: str) -> None:
    receiver = GrpcReceiver().start()
    proxy = _CountingProxy(receiver.port)
    exporter = make_exporter(receiver, "grpc", port=proxy.port, compression=compression)
    try:
        batch = with_otel(node_batch(pods=5))
        exporter.export(batch)
        got = receiver.wait_for(lambda got: total_points(got) >= len(batch))
        assert_delivered_equal(batch, got)
        message_bytes = sum(r.size for r in got)
        if compression == "gzip":
            assert proxy.client_bytes < message_bytes / 3, (proxy.client_bytes, message_bytes)
        else:
            assert proxy.client_bytes > message_bytes, (proxy.client_bytes, message_bytes)
    finally:
        exporter.shutdown()
        proxy.close()
        receiver.stop()


# --------------------------------------------------------------------------- config


def test_targets() -> None:
    def target(**kw: Any) -> str:
        return str(resolve_target(OtlpConfig(**kw)))

    assert target() == "grpcs://localhost:4317"
    assert target(tls=TlsConfig(insecure=True)) == "grpc://localhost:4317"
    assert target(endpoint="http://collector:4317") == "grpc://collector:4317"
    assert target(endpoint="collector") == "grpcs://collector:4317"
    assert target(protocol="http/protobuf") == "https://localhost:4318/v1/metrics"
    assert target(protocol="http/protobuf", endpoint="http://c:4318") == "http://c:4318/v1/metrics"
    assert target(protocol="http/protobuf", endpoint="https://otlp.example/otlp/v1/metrics") == (
        "https://otlp.example:443/otlp/v1/metrics"
    )
    assert target(endpoint="[::1]:4317", tls=TlsConfig(insecure=True)) == "grpc://[::1]:4317"


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ("{protocol: thrift}", "must be one of grpc, http/protobuf"),
        ("{endpoint: 'https://c:4317', tls: {insecure: true}}", "tls.insecure"),
        ("{tls: {cert_file: /x}}", "go together"),
        ("{endpoint: 'ftp://c'}", "scheme"),
        ("{endpoint: 'c:4317/path'}", "no path"),
        ("{compression: zstd}", "must be one of gzip, none"),
        ("{queue_size: 0}", "between 1 and"),
        ("{max_batch_points: 0}", "between 1 and"),
        ("{headers: {'bad header': x}}", "invalid header"),
        ("{backoff_initial: 10s, backoff_max: 1s}", "backoff_max"),
        ("{histograms: native}", "must be one of explicit, exponential"),
    ],
)
def test_bad_config_is_one_line(tmp_path: Path, clean_env: dict[str, str], settings: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        f"exporters:\n  otlp/a: {settings}\nservice: {{pipelines: {{metrics: {{exporters: [otlp/a]}}}}}}\n"
    )
    with pytest.raises(ConfigError) as error:
        load_config(str(path), environ=clean_env)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_two_otlp_exporters_coexist(tmp_path: Path, clean_env: dict[str, str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "exporters:\n"
        "  otlp/a: {endpoint: 'a:4317', headers: {authorization: 'Bearer x'}, interval: 60s}\n"
        "  otlp/b: {endpoint: 'http://b:4318', protocol: http/protobuf, compression: none, queue_size: 3}\n"
        "service: {pipelines: {metrics: {exporters: [otlp/a, otlp/b]}}}\n"
    )
    config = load_config(str(path), environ=clean_env)
    a, b = config.exporters
    assert (a.id, b.id) == ("otlp/a", "otlp/b")
    assert a.config.headers == {"authorization": "Bearer x"} and a.config.interval.seconds == 60
    assert b.config.queue_size == 3 and b.config.compression == "none"


def test_interval_thins_out_snapshots() -> None:
    receiver = GrpcReceiver().start()
    exporter = make_exporter(receiver, "grpc", interval=Duration(0.5))
    try:
        batches = []
        began = time.monotonic()
        while time.monotonic() - began < 1.2:
            batch = with_otel(node_batch(pods=1, seed=len(batches)))
            batches.append(batch)
            exporter.export(batch)
            time.sleep(0.05)
        time.sleep(0.3)
        times = {r["time"] for r in flatten(receiver.requests())}
        assert 2 <= len(times) <= 4, len(times)  # ~every 0.5 s of 1.2 s, not ~24 snapshots
        assert batches[0].time_ns in times
    finally:
        exporter.shutdown()
        receiver.stop()


def test_points_without_otel_attributes_keep_their_labels() -> None:
    receiver = GrpcReceiver().start()
    exporter = make_exporter(receiver, "grpc")
    try:
        metric = MetricDef("kpod.test.x", Kind.COUNTER, "By", "x")
        resource = Resource((("namespace", "a"), ("pod", "b")))
        batch = Batch([
            Point(metric, CgroupRef(1, "/a"), (), 5.0, resource),
            Point(metric, CgroupRef(2, "/b"), (), 7.0, Resource((("namespace", "a"), ("pod", "c")))),
        ])
        exporter.export(batch)
        got = flatten(receiver.wait_for(lambda got: total_points(got) >= 2))
        assert sorted((r["attributes"]["pod"], r["value"]) for r in got) == [("b", 5.0), ("c", 7.0)]
    finally:
        exporter.shutdown()
        receiver.stop()


def test_exponential_points_of_any_counts_decode_to_the_kernel_buckets() -> None:
    """Exponential histograms are encoded for all the points of a snapshot at once (fixed-width
    varints, kpod.exporters.varint_slots); decoded by the official classes, every point holds
    its kernel counts whatever they are: empty, only the zero bucket, the +Inf bucket, beyond
    4-byte and 8-byte varints (those point by point), a short or long count tuple (padded or cut
    to the bounds)."""
    import random

    from kpod.exporters.otlp.encoding import Encoder
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
    from otlp_receiver import as_exponential

    from bench.synthetic import HIST_BOUNDS
    from kpod.model import HistogramValue

    metric = MetricDef("kpod.test.latency", Kind.HISTOGRAM, "s", "Latency.")
    rng = random.Random(55)
    buckets = len(HIST_BOUNDS) + 1
    for group in histogram_count_families(rng, buckets):
        values = [HistogramValue(HIST_BOUNDS, counts, rng.random()) for counts in group]
        resource = Resource((("pod", "p"),), (("k8s.pod.name", "p"),))
        batch = Batch([Point(metric, CgroupRef(1, "/"), (("n", str(i)),), v, resource) for i, v in enumerate(values)])
        requests = Encoder({"service.name": "kpod-metrics"}, 1_000, 10**6, "exponential").requests(batch)
        decoded = [
            point
            for body, _ in requests
            for resource_metrics in ExportMetricsServiceRequest.FromString(body).resource_metrics
            for scope in resource_metrics.scope_metrics
            for message in scope.metrics
            for point in message.exponential_histogram.data_points
        ]
        assert len(decoded) == len(values)
        for point, value in zip(decoded, values, strict=True):
            counts = (tuple(value.counts) + (0,) * buckets)[:buckets]
            kernel = HistogramValue(value.bounds, counts, value.sum)
            assert (point.count, point.zero_count, point.sum) == (sum(counts), counts[0], value.sum)
            assert (point.scale, point.zero_threshold) == (0, HIST_BOUNDS[0])
            got = {point.positive.offset + k: c for k, c in enumerate(point.positive.bucket_counts) if c}
            assert got == as_exponential(kernel)
            if got:  # the window of non-empty buckets: no empty bucket at either end
                assert point.positive.bucket_counts[0] and point.positive.bucket_counts[-1]
