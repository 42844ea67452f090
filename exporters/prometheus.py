"""The Prometheus exporter: a scrape endpoint serving the exposition rendered once per cycle.

`export()` renders the batch (text 0.0.4 and OpenMetrics) and gzips both; the HTTP handler only
picks the cached bytes, so a scrape's cost does not grow with the number of series and a scrape
never triggers collection.  Also serves /healthz (alive), /readyz (a cycle completed recently)
and /debug/status (JSON a user can paste into a bug report).
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpod.component import Context, Exporter, Factory
from kpod.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE, Renderer
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
class PrometheusConfig:
    endpoint: str = "0.0.0.0:9090"

    def validate(self) -> None:
        parse_endpoint(self.endpoint)


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


class PrometheusExporter(Exporter):
    def __init__(self, context: Context, config: PrometheusConfig) -> None:
        super().__init__(context, config)
        self.config: PrometheusConfig = config
        self._renderer = Renderer()
        self._exposition = _EMPTY
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.series = 0
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
        server_class = _Server
        if ":" in host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        try:
            self._server = server_class((host, port), self._handler())
        except OSError as error:
            raise OSError(f"exporters.{self.id}: cannot listen on {self.config.endpoint}: {error.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus-http", daemon=True)
        self._thread.start()
        self.log.info("serving /metrics on %s:%d", *self.address)

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
            server_version = "kpod-metrics"

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per scrape would drown the agent's own log

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
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
