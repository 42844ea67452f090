"""The HTTP side of the Prometheus exporter: what each endpoint answers, from the bytes of the
cycle's Exposition.  How connections are served, and within which bounds, is http.py.

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

import hmac
import json
import logging
import math
import os
import socket
import ssl
import threading
import time
import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from kpod.exporters.prometheus.config import TlsSettings, parse_endpoint
from kpod.exporters.prometheus.exposition import OPENMETRICS_CONTENT_TYPE, PROTOBUF_CONTENT_TYPE, TEXT_CONTENT_TYPE
from kpod.exporters.prometheus.http import Body, HttpLoop, Limits, Request, Response

if TYPE_CHECKING:
    from kpod.status import AgentStatus

METRICS_PATHS = ("/metrics", "/actuator/prometheus")
# Endpoints that need the bearer token when one is configured (probes stay open).
PROTECTED_PATHS = (*METRICS_PATHS, "/debug/status")
# /debug/status is computed (receiver details, BPF map fill) in the server's one thread: at most
# once per this long, however often it is asked for.
STATUS_CACHE_S = 1.0


TEXT, OPENMETRICS, PROTOBUF = "text", "openmetrics", "protobuf"
CONTENT_TYPES = {TEXT: TEXT_CONTENT_TYPE, OPENMETRICS: OPENMETRICS_CONTENT_TYPE, PROTOBUF: PROTOBUF_CONTENT_TYPE}
# A render produces one or more formats at once (text and OpenMetrics share their samples),
# each as bytes or in the parts it was rendered in (http.Body: served as they are).
Render = Callable[[], dict[str, Body]]


class Exposition:
    """One cycle's exposition: each format rendered, and gzipped, at most once, the first time
    it is wanted (the exporter renders what scrapers asked for recently right away; anything
    else waits for a scrape that asks for it).  Thread-safe: scrapes arrive on their own threads."""

    def __init__(self, renders: dict[str, Render], lock: threading.Lock | None = None) -> None:
        self._renders = renders  # format -> the render that produces it
        self._bodies: dict[tuple[str, bool], Body] = {}
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

    def drop_plain(self, keep: set[str]) -> bool:
        """Forget the plain bodies that were only made to be gzipped: those of formats whose
        gzip is made and whose plain body is not in `keep` (what scrapes asked for lately).  A
        scrape that asks for one after all has it rendered again.  Whether any was dropped."""
        dropped = False
        with self._lock:
            for fmt, gzipped in list(self._bodies):
                if not gzipped and fmt not in keep and (fmt, True) in self._bodies:
                    del self._bodies[(fmt, False)]
                    dropped = True
        return dropped

    def body(self, fmt: str, gzipped: bool = False, scrape: bool = False) -> Body:
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
            found = self._bodies[key] = gzipped_body(plain)
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
    answer to no Accept header or nothing we serve; gzip as `_accepts_gzip` says."""
    preference = (PROTOBUF, OPENMETRICS, TEXT) if protobuf else (OPENMETRICS, TEXT)
    best, best_q = TEXT, 0.0
    for kind, params, q in _media_ranges(accept):
        fmt = _format_of(kind, params)
        if fmt is None or fmt not in preference or q <= 0:
            continue
        if q > best_q or (q == best_q and preference.index(fmt) < preference.index(best)):
            best, best_q = fmt, q
    return best, _accepts_gzip(accept_encoding)


def _accepts_gzip(accept_encoding: str) -> bool:
    """gzip when the client accepts it with q > 0 (by name, as x-gzip, or as *) and does not
    rank identity higher (RFC 9110 12.5.3): "gzip;q=0" means no gzip.  Of a coding listed
    twice, the first counts; a q that is not a number in [0, 1] counts as 0."""
    q: dict[str, float] = {}
    for coding, _, value in _media_ranges(accept_encoding):
        q.setdefault(coding, value if 0.0 <= value <= 1.0 else 0.0)
    mine = q.get("gzip", q.get("x-gzip", q.get("*", 0.0)))
    identity = q.get("identity")
    return mine > 0.0 and (identity is None or mine >= identity)


def gzipped_body(body: Body) -> bytes:
    """The gzip of a body, made from its parts as they are (not joined first).  Level 1:
    several times faster than the default 9 for a few % more bytes."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, 31)  # wbits 31: a gzip member
    out = [compressor.compress(part) for part in (body if isinstance(body, list) else [body])]
    out.append(compressor.flush())
    return b"".join(out)


def select(exposition: Exposition, accept: str, accept_encoding: str) -> tuple[Body, str, str | None]:
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
    """Listens on `endpoint` (one thread, http.py) and answers from `source`."""

    def __init__(
        self,
        owner: str,
        endpoint: str,
        tls: TlsSettings,
        bearer_token_file: str,
        source: ScrapeSource,
        log: logging.Logger | None = None,
        on_refused: Callable[[str], None] | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.owner = owner  # the exporter id, in error messages
        self.endpoint = endpoint
        self.tls = tls
        self.bearer_token_file = bearer_token_file
        self.source = source
        self.log = log or logging.getLogger("kpod.exporters.prometheus")
        self.on_refused = on_refused
        self.limits = limits or Limits()
        self.token: BearerToken | None = None
        self.secure = False
        self._loop: HttpLoop | None = None
        self._address: tuple[str, int] = ("", 0)
        self._status_cache: tuple[float, bytes] = (0.0, b"")

    @property
    def address(self) -> tuple[str, int]:
        return self._address

    @property
    def listening(self) -> bool:
        return self._loop is not None

    @property
    def connections(self) -> int:
        return self._loop.connections if self._loop else 0

    def start(self) -> None:
        """Raises OSError with one line naming the exporter (port taken, unreadable TLS files or token)."""
        host, port = parse_endpoint(self.endpoint)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        tls = tls_context(self.tls, self.owner)
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
            # A backlog the loop drains at once (it accepts and sorts out floods itself).
            listener = socket.create_server((host, port), family=family, backlog=128)
        except OSError as error:
            raise OSError(f"exporters.{self.owner}: cannot listen on {self.endpoint}: {error.strerror}") from None
        self._address = tuple(listener.getsockname()[:2])  # type: ignore[assignment]
        self.secure = tls is not None
        self._loop = HttpLoop(listener, self.respond, self.log, self.limits, tls, self.on_refused)
        self._loop.start()

    def shutdown(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            loop.stop()

    # ------------------------------------------------------------------ endpoints

    def respond(self, request: Request) -> Response:
        path = request.path
        required = self.token
        if required is not None and path in PROTECTED_PATHS and not required.matches(request.header("authorization")):
            challenge = (("WWW-Authenticate", 'Bearer realm="kpod-metrics"'),)
            return Response(401, b"unauthorized\n", headers=challenge, proven=False)
        # With a token configured, only a request that carried it proves a client (http.py).
        proven = required is None or path in PROTECTED_PATHS
        if path in METRICS_PATHS:
            body, content_type, encoding = select(
                self.source.exposition, request.header("accept"), request.header("accept-encoding")
            )
            headers = (("Content-Encoding", encoding),) if encoding else ()
            return Response(200, body, content_type, (*headers, ("Vary", "Accept, Accept-Encoding")), proven)
        if path == "/healthz":
            return Response(200, b"ok\n", proven=proven)
        if path == "/readyz":
            status = self.source.agent_status
            ready, reason = status.ready() if status else (True, "ok")
            body = json.dumps({"ready": ready, "reason": reason}).encode() + b"\n"
            return Response(200 if ready else 503, body, "application/json", proven=proven)
        if path == "/debug/status":
            return Response(200, self._status(), "application/json", proven=proven)
        return Response(404, b"not found\n", proven=proven)

    def _status(self) -> bytes:
        made, body = self._status_cache
        now = time.monotonic()
        if body and now - made < STATUS_CACHE_S:
            return body
        status = self.source.agent_status
        snapshot = status.snapshot() if status else {}
        snapshot["series"] = self.source.series
        body = json.dumps(snapshot, indent=2, sort_keys=True, default=str).encode() + b"\n"
        self._status_cache = (now, body)
        return body
