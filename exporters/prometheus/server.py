"""The Prometheus exporter: a scrape endpoint serving the exposition rendered once per cycle.

`export()` renders the batch (text 0.0.4 and OpenMetrics) and gzips both; the HTTP handler only
picks the cached bytes, so a scrape's cost does not grow with the number of series and a scrape
never triggers collection.  Also serves /healthz (alive), /readyz (a cycle completed recently)
and /debug/status (JSON a user can paste into a bug report).

Exposure (docs/SECURITY.md): `endpoint` picks the address; `tls: {cert_file, key_file}` serves
HTTPS (TLS 1.2+, the files re-read at start); `bearer_token_file` makes /metrics,
/actuator/prometheus and /debug/status answer 401 without `Authorization: Bearer <token>`
(the file is re-read when it changes, so a rotated token works without a restart).  /healthz
and /readyz stay open: the kubelet's probes carry no token.  Neither the token nor any request
header is ever logged.
"""

from __future__ import annotations

import gzip
import hmac
import json
import logging
import os
import socket
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpod.exporters.prometheus.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Renderer

from kpod.component import Context, Exporter, Factory
from kpod.model import Batch
from kpod.selfmetrics import EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, declare_exporter_metrics

METRICS_PATHS = ("/metrics", "/actuator/prometheus")


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """'0.0.0.0:9090' -> ('0.0.0.0', 9090); '[::]:9090' -> ('::', 9090); ':9090' -> ('0.0.0.0', 9090)."""
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected host:port, got {endpoint!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port_text)


@dataclass
class TlsSettings:
    cert_file: str = ""  # PEM certificate (chain); empty with key_file empty: plain HTTP
    key_file: str = ""  # PEM private key


@dataclass
class PrometheusConfig:
    endpoint: str = "0.0.0.0:9090"
    tls: TlsSettings = field(default_factory=TlsSettings)
    # A file holding the token scrapers must send; empty: no authentication.
    bearer_token_file: str = ""

    def validate(self) -> None:
        parse_endpoint(self.endpoint)
        if bool(self.tls.cert_file) != bool(self.tls.key_file):
            raise ValueError("tls: set both cert_file and key_file, or neither")


# Endpoints that need the bearer token when one is configured (probes stay open).
PROTECTED_PATHS = (*METRICS_PATHS, "/debug/status")
# A client that connects and sends nothing (or never finishes a TLS handshake) is dropped
# after this long instead of holding a thread forever.
REQUEST_TIMEOUT_S = 30.0


class _Token:
    """The bearer token from a file, re-read when the file changes (projected tokens rotate)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._token = b""
        self._lock = threading.Lock()
        self.load()

    def load(self) -> None:
        """Raises OSError / ValueError: a configured token that cannot be read is fatal at start."""
        info = os.stat(self.path)
        with open(self.path, "rb") as handle:
            token = handle.read().strip()
        if not token:
            raise ValueError(f"bearer_token_file {self.path} is empty")
        with self._lock:
            self._token, self._stamp = token, (info.st_mtime_ns, info.st_ino)

    def matches(self, header: str) -> bool:
        try:
            info = os.stat(self.path)
            if (info.st_mtime_ns, info.st_ino) != self._stamp:
                self.load()
        except (OSError, ValueError):
            pass  # keep the last good token rather than lock everyone out
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        with self._lock:
            token = self._token
        # Constant time: the comparison must not tell an attacker how much of a guess is right.
        return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token)


@dataclass(frozen=True)
class _Exposition:
    text: bytes
    text_gzip: bytes
    openmetrics: bytes
    openmetrics_gzip: bytes


_EMPTY = _Exposition(b"", gzip.compress(b""), b"# EOF\n", gzip.compress(b"# EOF\n"))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class _TlsServerMixin:
    """Handshakes happen in the connection's own thread (not in accept, where one stalled
    client would block every other), and failed ones are one debug line, not a traceback."""

    def handle_error(self, request: Any, client_address: Any) -> None:
        logging.getLogger("kpod.exporters.prometheus").debug(
            "connection from %s failed", client_address[0] if client_address else "?", exc_info=False
        )


class PrometheusExporter(Exporter):
    def __init__(self, context: Context, config: PrometheusConfig) -> None:
        super().__init__(context, config)
        self.config: PrometheusConfig = config
        self._renderer = Renderer()
        self._exposition = _EMPTY
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.series = 0
        self._token: _Token | None = None
        # Same self-metrics as every exporter; "sent" here means rendered into the exposition
        # (a scrape serves them; nothing is queued, so queue and drops stay 0).
        declare_exporter_metrics(context.self_metrics, self.id)
        self._labels = (("exporter", self.id),)

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        host, port = parse_endpoint(self.config.endpoint)
        server_class: type[_Server] = _Server
        if ":" in host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        tls = self._tls_context()
        if tls is not None:
            server_class = type("_TlsServer", (_TlsServerMixin, server_class), {})
        if self.config.bearer_token_file:
            try:
                self._token = _Token(self.config.bearer_token_file)
            except OSError as error:
                raise OSError(
                    f"exporters.{self.id}: bearer_token_file {self.config.bearer_token_file}: {error.strerror}"
                ) from None
            except ValueError as error:
                raise OSError(f"exporters.{self.id}: {error}") from None
        try:
            self._server = server_class((host, port), self._handler())
        except OSError as error:
            raise OSError(f"exporters.{self.id}: cannot listen on {self.config.endpoint}: {error.strerror}") from None
        if tls is not None:
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus-http", daemon=True)
        self._thread.start()
        self.log.info(
            "serving /metrics on %s://%s:%d%s",
            "https" if tls is not None else "http",
            *self.address,
            " (bearer token required)" if self._token is not None else "",
        )

    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        if not tls.cert_file:
            return None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(tls.cert_file, tls.key_file)
        except (OSError, ssl.SSLError) as error:
            reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error)
            raise OSError(f"exporters.{self.id}: tls: cannot load {tls.cert_file} / {tls.key_file}: {reason}") from None
        return context

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def export(self, batch: Batch) -> None:
        text, openmetrics, self.series = self._renderer.render(batch)
        self.context.self_metrics.inc(EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, self._labels, len(batch))
        # gzip level 1: several times faster than the default 9 for a few % more bytes.
        self._exposition = _Exposition(
            text, gzip.compress(text, 1), openmetrics, gzip.compress(openmetrics, 1)
        )

    def status(self) -> dict[str, Any]:
        return {"endpoint": self.config.endpoint, "listening": self._server is not None, "series": self.series}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        exporter = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body leave in two writes; with Nagle on, a small body (a gzipped
            # exposition under ~64 KiB) waits for the scraper's delayed ACK: 40 ms per scrape
            # on loopback (measured by bench/scale.py; 0.3 ms with TCP_NODELAY).
            disable_nagle_algorithm = True
            server_version = "kpod-metrics"
            timeout = REQUEST_TIMEOUT_S

            def setup(self) -> None:
                super().setup()
                if isinstance(self.connection, ssl.SSLSocket):
                    self.connection.do_handshake()  # in this thread, under `timeout`

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape would drown the agent's own log; never log headers

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                token = exporter._token
                if (
                    token is not None
                    and path in PROTECTED_PATHS
                    and not token.matches(self.headers.get("Authorization", ""))
                ):
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Bearer realm="kpod-metrics"')
                    self.send_header("Content-Type", "text/plain; charset=utf-8")
                    self.send_header("Content-Length", "13")
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(b"unauthorized\n")
                    return
                if path in METRICS_PATHS:
                    self._metrics()
                elif path == "/healthz":
                    self._send(200, b"ok\n", "text/plain; charset=utf-8")
                elif path == "/readyz":
                    self._ready()
                elif path == "/debug/status":
                    self._status()
                else:
                    self._send(404, b"not found\n", "text/plain; charset=utf-8")

            def _metrics(self) -> None:
                exposition = exporter._exposition
                openmetrics = "application/openmetrics-text" in self.headers.get("Accept", "")
                gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
                if openmetrics:
                    body = exposition.openmetrics_gzip if gzipped else exposition.openmetrics
                    content_type = OPENMETRICS_CONTENT_TYPE
                else:
                    body = exposition.text_gzip if gzipped else exposition.text
                    content_type = TEXT_CONTENT_TYPE
                self._send(200, body, content_type, "gzip" if gzipped else None)

            def _ready(self) -> None:
                status = exporter.context.status
                ready, reason = status.ready() if status else (True, "ok")
                body = json.dumps({"ready": ready, "reason": reason}).encode() + b"\n"
                self._send(200 if ready else 503, body, "application/json")

            def _status(self) -> None:
                status = exporter.context.status
                snapshot = status.snapshot() if status else {}
                snapshot["series"] = exporter.series
                body = json.dumps(snapshot, indent=2, sort_keys=True, default=str).encode() + b"\n"
                self._send(200, body, "application/json")

            def _send(self, code: int, body: bytes, content_type: str, encoding: str | None = None) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                if encoding:
                    self.send_header("Content-Encoding", encoding)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def do_HEAD(self) -> None:
                self.do_GET()

        return Handler


factory = Factory(
    type="prometheus",
    kind="exporter",
    config_class=PrometheusConfig,
    create=PrometheusExporter,
    description="Serves the Prometheus exposition (/metrics, /actuator/prometheus), /healthz and /readyz.",
)
