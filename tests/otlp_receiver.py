"""Real OTLP receivers for the tests: a gRPC MetricsService and an HTTP /v1/metrics server.

Both listen on 127.0.0.1 only, record every request they accept (decoded with the
opentelemetry-proto classes), and can be told to answer with an error, to be slow, or to be
stopped and started again on the same port.  TLS material comes from `make_tls()` (openssl CLI).
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc

Request = metrics_service_pb2.ExportMetricsServiceRequest


@dataclass
class Received:
    request: Any  # ExportMetricsServiceRequest
    metadata: dict[str, str]  # gRPC metadata or HTTP headers (lower-case names)
    encoding: str  # "gzip" or "" (what arrived on the wire)
    size: int  # bytes on the wire (HTTP) or of the decoded message (gRPC)
    at: float  # time.monotonic()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        self._thread: threading.Thread | None = None

    def start(self) -> HttpReceiver:
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                with recorder.lock:
                    recorder.connections.append(self.connection)

            def log_message(self, format: str, *args: Any) -> None:
                pass

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
                self.send_response(code)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(body)))
                if recorder.retry_after and code in (429, 503):
                    self.send_header("Retry-After", recorder.retry_after)
                self.end_headers()
                self.wfile.write(body)

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        server = Server(("127.0.0.1", self.port), Handler)
        if self.tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(str(self.tls.server_cert), str(self.tls.server_key))
            server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
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
