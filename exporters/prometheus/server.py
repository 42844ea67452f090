"""The HTTP side of the Prometheus exporter: serves the bytes of the cycle's Exposition.

Endpoints: /metrics and /actuator/prometheus (the exposition, text 0.0.4, OpenMetrics 1.0 or
the protobuf MetricFamily stream as `negotiate` decides, gzipped when the scraper accepts it),
/healthz (alive), /readyz (a cycle completed recently) and /debug/status (JSON a user can paste
into a bug report).  The exporter renders ahead the formats scrapers asked for lately; a scrape
asking for another makes the Exposition render it, once per cycle.

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
import math
import os
import socket
import ssl
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, Protocol

from kpod.exporters.prometheus.config import TlsSettings, parse_endpoint
from kpod.exporters.prometheus.exposition import OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE
from kpod.exporters.prometheus.protobuf import PROTOBUF_CONTENT_TYPE

if TYPE_CHECKING:
    from kpod.status import AgentStatus

METRICS_PATHS = ("/metrics", "/actuator/prometheus")
# Endpoints that need the bearer token when one is configured (probes stay open).
PROTECTED_PATHS = (*METRICS_PATHS, "/debug/status")
# A client that connects and sends nothing (or never finishes a TLS handshake) is dropped
# after this long instead of holding a thread forever.
REQUEST_TIMEOUT_S = 30.0


TEXT, OPENMETRICS, PROTOBUF = "text", "openmetrics", "protobuf"
CONTENT_TYPES = {TEXT: TEXT_CONTENT_TYPE, OPENMETRICS: OPENMETRICS_CONTENT_TYPE, PROTOBUF: PROTOBUF_CONTENT_TYPE}
# A render produces one or more formats at once (text and OpenMetrics share their samples).
Render = Callable[[], dict[str, bytes]]


class Exposition:
    """One cycle's exposition: each format rendered, and gzipped, at most once, the first time
    it is wanted (the exporter renders what scrapers asked for recently right away; anything
    else waits for a scrape that asks for it).  Thread-safe: scrapes arrive on their own threads."""

    def __init__(self, renders: dict[str, Render], lock: threading.Lock | None = None) -> None:
        self._renders = renders  # format -> the render that produces it
        self._bodies: dict[tuple[str, bool], bytes] = {}
        self._lock = lock or threading.Lock()  # shared with the renders' caches: one render at a time
        self.served: set[tuple[str, bool]] = set()  # (format, gzipped) that scrapes asked for

    @classmethod
    def of(cls, text: bytes, openmetrics: bytes) -> Exposition:
        """Text and OpenMetrics bodies rendered beforehand."""

        def bodies() -> dict[str, bytes]:
            return {TEXT: text, OPENMETRICS: openmetrics}

        return cls({TEXT: bodies, OPENMETRICS: bodies})

    def offers(self, fmt: str) -> bool:
        return fmt in self._renders

    def asked(self) -> set[tuple[str, bool]]:
        """(format, gzipped) that scrapes asked for so far."""
        with self._lock:
            return set(self.served)

    def body(self, fmt: str, gzipped: bool = False, scrape: bool = False) -> bytes:
        """The body of `fmt` (a format it offers), rendered now if it was not yet."""
        key = (fmt, gzipped)
        with self._lock:
            if scrape:
                self.served.add(key)
            found = self._bodies.get(key)
            if found is not None:
                return found
            plain = self._bodies.get((fmt, False))
            if plain is None:
                for name, rendered in self._renders[fmt]().items():
                    self._bodies[(name, False)] = rendered
                plain = self._bodies[(fmt, False)]
            if not gzipped:
                return plain
            # gzip level 1: several times faster than the default 9 for a few % more bytes.
            found = self._bodies[key] = gzip.compress(plain, 1)
            return found


EMPTY_EXPOSITION = Exposition.of(b"", b"# EOF\n")


def _media_ranges(accept: str) -> list[tuple[str, dict[str, str], float]]:
    """(type/subtype, parameters, q) of each media range of an Accept header, lower-cased."""
    ranges = []
    for item in accept.split(","):
        kind, *params = (part.strip() for part in item.split(";"))
        values: dict[str, str] = {}
        for param in params:
            name, _, value = param.partition("=")
            values[name.strip().lower()] = value.strip().strip('"')
        try:
            q = float(values.pop("q", "1"))
        except ValueError:
            q = 0.0
        if kind and math.isfinite(q):
            ranges.append((kind.lower(), values, q))
    return ranges


def _format_of(kind: str, params: dict[str, str]) -> str | None:
    if kind == "application/vnd.google.protobuf":
        delimited = params.get("encoding") == "delimited"
        return PROTOBUF if params.get("proto") == "io.prometheus.client.MetricFamily" and delimited else None
    if kind == "application/openmetrics-text":
        return OPENMETRICS
    if kind in ("text/plain", "text/*", "*/*"):
        return TEXT
    return None


def negotiate(accept: str, accept_encoding: str, protobuf: bool = False) -> tuple[str, bool]:
    """(format, gzip?) for a scrape's Accept and Accept-Encoding headers: the format the scraper
    ranks highest (q-values) among those served, ties going to protobuf (when offered: the only
    format with native histograms), then OpenMetrics 1.0, then text 0.0.4, which is also the
    answer to no Accept header or nothing we serve."""
    preference = (PROTOBUF, OPENMETRICS, TEXT) if protobuf else (OPENMETRICS, TEXT)
    best, best_q = TEXT, 0.0
    for kind, params, q in _media_ranges(accept):
        fmt = _format_of(kind, params)
        if fmt is None or fmt not in preference or q <= 0:
            continue
        if q > best_q or (q == best_q and preference.index(fmt) < preference.index(best)):
            best, best_q = fmt, q
    return best, "gzip" in accept_encoding


def select(exposition: Exposition, accept: str, accept_encoding: str) -> tuple[bytes, str, str | None]:
    """(body, Content-Type, Content-Encoding) of the exposition a scrape asked for."""
    fmt, gzipped = negotiate(accept, accept_encoding, exposition.offers(PROTOBUF))
    return exposition.body(fmt, gzipped, scrape=True), CONTENT_TYPES[fmt], "gzip" if gzipped else None


class BearerToken:
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


class ScrapeSource(Protocol):
    """What the server serves: the exporter's latest exposition and the agent's state."""

    @property
    def exposition(self) -> Exposition: ...

    @property
    def series(self) -> int: ...

    @property
    def agent_status(self) -> AgentStatus | None: ...


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


def tls_context(tls: TlsSettings, owner: str) -> ssl.SSLContext | None:
    """The server's TLS context, or None for plain HTTP.  `owner` names the exporter in errors."""
    if not tls.cert_file:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as error:
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or str(error)
        raise OSError(f"exporters.{owner}: tls: cannot load {tls.cert_file} / {tls.key_file}: {reason}") from None
    return context


class ScrapeServer:
    """Listens on `endpoint` in a daemon thread and answers from `source`."""

    def __init__(
        self, owner: str, endpoint: str, tls: TlsSettings, bearer_token_file: str, source: ScrapeSource
    ) -> None:
        self.owner = owner  # the exporter id, in error messages
        self.endpoint = endpoint
        self.tls = tls
        self.bearer_token_file = bearer_token_file
        self.source = source
        self.token: BearerToken | None = None
        self.secure = False
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Raises OSError with one line naming the exporter (port taken, unreadable TLS files or token)."""
        host, port = parse_endpoint(self.endpoint)
        server_class: type[_Server] = _Server
        if ":" in host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        tls = tls_context(self.tls, self.owner)
        if tls is not None:
            server_class = type("_TlsServer", (_TlsServerMixin, server_class), {})
        if self.bearer_token_file:
            try:
                self.token = BearerToken(self.bearer_token_file)
            except OSError as error:
                raise OSError(
                    f"exporters.{self.owner}: bearer_token_file {self.bearer_token_file}: {error.strerror}"
                ) from None
            except ValueError as error:
                raise OSError(f"exporters.{self.owner}: {error}") from None
        try:
            self._server = server_class((host, port), handler_class(self.source, lambda: self.token))
        except OSError as error:
            raise OSError(f"exporters.{self.owner}: cannot listen on {self.endpoint}: {error.strerror}") from None
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self.secure = tls is not None
        self._thread = threading.Thread(target=self._server.serve_forever, name="prometheus-http", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()


def handler_class(source: ScrapeSource, token: Any) -> type[BaseHTTPRequestHandler]:
    """The request handler over `source`; `token()` is the BearerToken in force, or None."""

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
            required = token()
            if (
                required is not None
                and path in PROTECTED_PATHS
                and not required.matches(self.headers.get("Authorization", ""))
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
            body, content_type, encoding = select(
                source.exposition, self.headers.get("Accept", ""), self.headers.get("Accept-Encoding", "")
            )
            self._send(200, body, content_type, encoding)

        def _ready(self) -> None:
            status = source.agent_status
            ready, reason = status.ready() if status else (True, "ok")
            body = json.dumps({"ready": ready, "reason": reason}).encode() + b"\n"
            self._send(200 if ready else 503, body, "application/json")

        def _status(self) -> None:
            status = source.agent_status
            snapshot = status.snapshot() if status else {}
            snapshot["series"] = source.series
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
