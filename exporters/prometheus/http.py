"""A small HTTP/1.1 server for answers that are already made (bytes, or an exposition's parts): one
thread, one event loop, bounded.

Anything that reaches the metrics port may be hostile (docs/SECURITY.md, "The metrics port").
The standard library's server read up to 100 header lines of 64 KiB each per request before
anyone looked at them, ran one thread per connection without limit, and gave each connection a
per-read timeout that a client trickling one byte at a time never hits: 20 requests took the
agent to 441 MB, 32 got it OOM-killed under the chart's 512 MiB limit, 3000 trickling clients
held 3000 threads and stalled scrapes for 25 s.  Here every resource a client can make the
agent hold has a bound that does not depend on the client:

  * one thread: a `selectors` loop serves every connection (the answers are cached bytes, so no
    request needs a thread of its own), whatever the number of clients;
  * headers: the request line and headers together are at most `max_header_bytes` in at most
    `max_header_lines` lines; reading stops there (431 and close), and `recv` never asks for
    more than what is left of that budget, so a connection holds at most that much;
  * bodies: none are read (GET and HEAD only; a request announcing a body gets 400 and close);
  * connections: at most `max_connections` in all and `max_per_client` per client address.
    At a cap, a new connection displaces one that is not busy writing an answer (at the
    per-client cap, one of the same client's): first the oldest that never completed an
    authorised request (a slow or idle client that proved nothing), else the least recently
    used idle keep-alive one; when there is none, the new connection is closed at once;
  * time: a request must arrive in full within `header_deadline_s` of its first byte (of the
    accept, for the first one, TLS handshake included), and be answered in full within
    `request_deadline_s` of that same moment: deadlines for the whole request, not per read,
    so trickling buys nothing.  An idle keep-alive connection is closed after `idle_timeout_s`.
    A request that did not arrive in full is never answered.

A connection that fails (reset, TLS error, a deadline) is closed with one debug line through
the logger, and counted by reason through `on_refused`; nothing is ever printed to stderr.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

READING, WRITING, HANDSHAKE = "reading", "writing", "handshake"
# What `on_refused` is called with: a client over its own connection cap, a new connection with
# no room at the total cap, a connection displaced to make room, a request head over the size
# or line bound, a malformed request, a request not complete (or not answered) in time.
REFUSED_REASONS = ("client_limit", "connection_limit", "evicted", "header_limit", "bad_request", "deadline")
# Per send() on TLS (below glibc's mmap threshold: the buffers are joined up to this size);
# plain sockets take what the kernel buffer takes, from at most _IOV_MAX buffers per sendmsg().
_SEND_CHUNK = 64 * 1024
_IOV_MAX = 1024
_ACCEPTS_PER_WAKEUP = 64  # so that a connection flood cannot starve the connections we have
_ACCEPT_PAUSE_S = 0.1  # after EMFILE: the listener stays readable, do not spin on it


@dataclass(frozen=True)
class Limits:
    """The bounds of docs/SECURITY.md ("The metrics port"), measured by tests/test_hostile_port.py."""

    # A scraper's request is a few hundred bytes; a Kubernetes service-account token (JWT) in
    # Authorization is 1-2 KiB.  16 KiB leaves room and bounds 128 connections to 2 MiB.
    max_header_bytes: int = 16384
    max_header_lines: int = 64
    max_connections: int = 128
    max_per_client: int = 16
    header_deadline_s: float = 10.0
    request_deadline_s: float = 30.0  # Prometheus's scrape_timeout is 10 s by default
    idle_timeout_s: float = 120.0  # longer than the usual scrape intervals (keep-alive reuse)


@dataclass(frozen=True)
class Request:
    method: str  # GET or HEAD
    target: str
    version: str  # HTTP/1.0 or HTTP/1.1
    headers: dict[str, str]  # lower-case names; a repeated header's values joined with ", "
    keep_alive: bool

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]

    def header(self, name: str) -> str:
        return self.headers.get(name, "")


# A response body: bytes, or the buffers it is made of, in order (a rendered exposition's
# parts: sent as they are with one sendmsg, never joined into one).
Body = bytes | list[bytes | memoryview]


def body_length(body: Body) -> int:
    return sum(map(len, body)) if isinstance(body, list) else len(body)


def joined(body: Body) -> bytes:
    """The body as one bytes object."""
    return b"".join(body) if isinstance(body, list) else body


@dataclass(frozen=True)
class Response:
    status: int
    body: Body
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()
    # The client showed it is entitled to what it asked (the right token, or no token needed):
    # its connection is kept before unproven ones when the connection cap is reached.
    proven: bool = True


class BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


_REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
    431: "Request Header Fields Too Large", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}  # fmt: skip
# RFC 9110 token characters: what a header name may be made of.
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def find_head_end(data: bytes | bytearray) -> tuple[int, int]:
    """(end of the request head, length of the blank line that ends it), or (-1, 0).  CRLF as
    HTTP says, bare LF as the standard library also accepted."""
    crlf, lf = data.find(b"\r\n\r\n"), data.find(b"\n\n")
    if crlf >= 0 and (lf < 0 or crlf < lf):
        return crlf, 4
    return (lf, 2) if lf >= 0 else (-1, 0)


def parse_head(head: bytes, max_lines: int) -> Request:
    """A request line and headers (without the blank line) -> Request.  Raises BadRequest."""
    lines = head.split(b"\n")
    if len(lines) > max_lines:
        raise BadRequest(431, "too many header lines")
    parts = lines[0].rstrip(b"\r").split(b" ")
    if len(parts) != 3 or not parts[1]:
        raise BadRequest(400, "malformed request line")
    method, target, version = (p.decode("latin-1") for p in parts)
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, "unsupported version")
    headers: dict[str, str] = {}
    for raw in lines[1:]:
        line = raw.rstrip(b"\r")
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN:
            raise BadRequest(400, "malformed header line")  # also obs-fold (a leading space)
        key = name.decode("ascii").lower()
        text = value.strip(b" \t").decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    if method not in ("GET", "HEAD"):
        raise BadRequest(405, "method not allowed")
    if headers.get("content-length", "0").strip() not in ("", "0") or "transfer-encoding" in headers:
        raise BadRequest(400, "request bodies are not accepted")
    tokens = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in tokens and (version == "HTTP/1.1" or "keep-alive" in tokens)
    if "://" in target:  # absolute form: keep the path
        target = "/" + target.split("://", 1)[1].partition("/")[2]
    return Request(method, target, version, headers, keep_alive)


def response_head(response: Response, length: int, close: bool) -> bytes:
    lines = [f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
             "Server: kpod-metrics", f"Content-Type: {response.content_type}", f"Content-Length: {length}"]  # fmt: skip
    lines += [f"{name}: {value}" for name, value in response.headers]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(eq=False)
class _Conn:
    sock: socket.socket
    client: str
    state: str
    accepted: float
    started: float  # first byte of the current request (or accept / end of the last answer)
    deadline: float
    last_active: float
    buf: bytearray = field(default_factory=bytearray)
    out: list[memoryview] = field(default_factory=list)
    close_after: bool = False
    proven: bool = False
    idle: bool = True  # no byte of a request yet
    served: int = 0  # answers sent on this connection


class HttpLoop:
    """Serves `respond(request)` on `listener` from one daemon thread until `stop()`."""

    def __init__(
        self,
        listener: socket.socket,
        respond: Callable[[Request], Response],
        log: logging.Logger,
        limits: Limits | None = None,
        tls: ssl.SSLContext | None = None,
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.listener = listener
        self.respond = respond
        self.log = log
        self.limits = limits or Limits()
        self.tls = tls
        self.on_refused = on_refused or (lambda reason: None)
        self._sel = selectors.DefaultSelector()
        self._conns: dict[socket.socket, _Conn] = {}
        self._per_client: dict[str, int] = {}
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping = False
        self._accept_paused_until = 0.0
        self._thread: threading.Thread | None = None

    @property
    def connections(self) -> int:
        return len(self._conns)

    def start(self, name: str = "prometheus-http") -> None:
        self.listener.setblocking(False)
        self._wake_r.setblocking(False)
        self._sel.register(self.listener, selectors.EVENT_READ, "listener")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stopping = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout_s)
        for conn in list(self._conns.values()):
            self._close(conn, None)
        for sock in (self.listener, self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                sock.close()
        self._sel.close()

    # ------------------------------------------------------------------ the loop

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._turn()
            except Exception:  # the loop must outlive any bug in one turn; never a traceback on stderr
                self.log.warning("HTTP loop: unexpected error (continuing)", exc_info=self.log.isEnabledFor(10))
                time.sleep(0.01)

    def _turn(self) -> None:
        now = time.monotonic()
        wait = min((c.deadline for c in self._conns.values()), default=now + 1.0) - now
        if self._accept_paused_until:
            wait = min(wait, self._accept_paused_until - now)
        accept = False
        for key, mask in self._sel.select(max(0.0, min(wait, 1.0))):
            if key.data == "listener":
                accept = True
            elif key.data == "wake":
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            else:
                self._service(key.data, mask)
        if accept:  # last: requests that arrived are served before a flood can displace them
            self._accept()
        now = time.monotonic()
        if self._accept_paused_until and now >= self._accept_paused_until:
            self._accept_paused_until = 0.0
            self._sel.register(self.listener, selectors.EVENT_READ, "listener")
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            # A keep-alive connection idle since its last answer simply ends; one that never
            # sent a request, a request still arriving or an answer still leaving is cut.
            kept_alive = conn.idle and conn.state == READING and conn.served > 0
            self._close(conn, None if kept_alive else "deadline")

    def _accept(self) -> None:
        limits = self.limits
        for _ in range(_ACCEPTS_PER_WAKEUP):
            try:
                sock, address = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:
                if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self.log.debug("accept: %s; pausing new connections", error.strerror)
                    self._sel.unregister(self.listener)
                    self._accept_paused_until = time.monotonic() + _ACCEPT_PAUSE_S
                return  # ECONNABORTED and the like: the client is gone already
            client = str(address[0]) if address else "?"
            if self._per_client.get(client, 0) >= limits.max_per_client and not self._evict(client):
                self._refuse(sock, client, "client_limit")
                continue
            if len(self._conns) >= limits.max_connections and not self._evict():
                self._refuse(sock, client, "connection_limit")
                continue
            self._admit(sock, client)

    def _refuse(self, sock: socket.socket, client: str, reason: str) -> None:
        with contextlib.suppress(OSError):
            sock.close()
        self.log.debug("connection from %s refused: %s", client, reason)
        self.on_refused(reason)

    def _evict(self, client: str | None = None) -> bool:
        """Make room for one connection (of `client`, at its own cap), or say there is none to
        make (see the module doc)."""
        waiting = [c for c in self._conns.values() if c.state != WRITING and client in (None, c.client)]
        unproven = [c for c in waiting if not c.proven]
        if unproven:
            victim = min(unproven, key=lambda c: c.accepted)
        elif waiting:
            idle = [c for c in waiting if c.idle]
            if not idle:
                return False
            victim = min(idle, key=lambda c: c.last_active)
        else:
            return False
        self._close(victim, "evicted")
        return True

    def _admit(self, sock: socket.socket, client: str) -> None:
        now = time.monotonic()
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            state = READING
            if self.tls is not None:
                sock = self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                state = HANDSHAKE
            conn = _Conn(sock, client, state, now, now, now + self.limits.header_deadline_s, now)
            self._sel.register(sock, selectors.EVENT_READ, conn)
        except (OSError, ValueError) as error:
            with contextlib.suppress(OSError):
                sock.close()
            self.log.debug("connection from %s: %s", client, error)
            return
        self._conns[sock] = conn
        self._per_client[client] = self._per_client.get(client, 0) + 1

    def _close(self, conn: _Conn, reason: str | None) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        left = self._per_client.get(conn.client, 1) - 1
        if left > 0:
            self._per_client[conn.client] = left
        else:
            self._per_client.pop(conn.client, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()
        conn.buf = bytearray()
        conn.out = []
        if reason is not None:
            self.log.debug("connection from %s closed: %s", conn.client, reason)
            self.on_refused(reason)

    # ------------------------------------------------------------------ one connection

    def _service(self, conn: _Conn, mask: int) -> None:
        try:
            if conn.state == HANDSHAKE:
                self._handshake(conn)
            elif conn.state == WRITING:
                self._write(conn)
            else:
                self._read(conn)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
            pass  # try again when the socket is ready
        except (OSError, ssl.SSLError) as error:
            # Resets, broken pipes, TLS alerts: the client's business, one debug line.
            self._close(conn, None)
            self.log.debug("connection from %s: %s", conn.client, getattr(error, "strerror", None) or error)

    def _handshake(self, conn: _Conn) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._sel.modify(sock, selectors.EVENT_READ, conn)
            return
        except ssl.SSLWantWriteError:
            self._sel.modify(sock, selectors.EVENT_WRITE, conn)
            return
        conn.state = READING
        self._sel.modify(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        limits = self.limits
        sock = conn.sock
        while True:
            room = limits.max_header_bytes + 1 - len(conn.buf)
            if room <= 0:
                break
            data = sock.recv(min(room, 65536))
            if not data:
                # The client closed (or half-closed) before its request was complete: a request
                # that did not arrive in full is never answered.
                self._close(conn, None)
                return
            if conn.idle:
                conn.idle = False
                if conn.served:  # a keep-alive request: its time starts now (the first one's at accept)
                    now = time.monotonic()
                    conn.started = now
                    conn.deadline = now + limits.header_deadline_s
            conn.buf += data
            if not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                break
        self._next_request(conn)

    def _next_request(self, conn: _Conn) -> None:
        limits = self.limits
        end, blank = find_head_end(conn.buf)
        if end < 0 or end > limits.max_header_bytes:
            if len(conn.buf) > limits.max_header_bytes or end > limits.max_header_bytes:
                self._fail(conn, BadRequest(431, "request head too large"), "header_limit")
            return
        head = bytes(conn.buf[:end])
        del conn.buf[: end + blank]
        try:
            request = parse_head(head, limits.max_header_lines)
        except BadRequest as error:
            self._fail(conn, error, "header_limit" if error.status == 431 else "bad_request")
            return
        try:
            response = self.respond(request)
        except Exception:  # a bug in an endpoint: answer 500-ish, log once at debug with the trace
            self.log.debug("handler failed for %s", request.path, exc_info=True)
            response = Response(503, b"error\n")
        conn.proven = conn.proven or response.proven
        close = not request.keep_alive
        body = response.body if request.method != "HEAD" else b""
        self._send(conn, response_head(response, body_length(response.body), close), body, close)

    def _fail(self, conn: _Conn, error: BadRequest, reason: str) -> None:
        """Answer a request we will not serve, then close: no more of it is read."""
        self.on_refused(reason)
        self.log.debug("request from %s refused: %s", conn.client, error)
        conn.buf = bytearray()
        body = f"{error}\n".encode()
        headers = (("Allow", "GET, HEAD"),) if error.status == 405 else ()
        response = Response(error.status, body, headers=headers)
        self._send(conn, response_head(response, len(body), True), body, True)

    def _send(self, conn: _Conn, head: bytes, body: Body, close: bool) -> None:
        conn.state = WRITING
        conn.close_after = close
        conn.deadline = conn.started + self.limits.request_deadline_s
        buffers = body if isinstance(body, list) else [body]
        conn.out = [memoryview(head), *(memoryview(buffer) for buffer in buffers if len(buffer))]
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        sock = conn.sock
        while conn.out:
            # Plain: head and body in one sendmsg (one segment when they fit, no Nagle wait).
            tls = isinstance(sock, ssl.SSLSocket)
            sent = sock.send(_leading(conn.out, _SEND_CHUNK)) if tls else sock.sendmsg(conn.out[:_IOV_MAX])
            while sent and conn.out:
                first = conn.out[0]
                if sent >= len(first):
                    sent -= len(first)
                    conn.out.pop(0)
                else:
                    conn.out[0] = first[sent:]
                    sent = 0
        conn.served += 1
        if conn.close_after:
            self._close(conn, None)
            return
        now = time.monotonic()
        conn.state, conn.idle, conn.last_active = READING, True, now
        conn.started, conn.deadline = now, now + self.limits.idle_timeout_s
        self._sel.modify(sock, selectors.EVENT_READ, conn)
        if conn.buf:  # a pipelined request already arrived
            conn.idle = False
            conn.deadline = now + self.limits.header_deadline_s
            self._next_request(conn)


def _leading(buffers: list[memoryview], size: int) -> bytes | memoryview:
    """The first `size` bytes of `buffers` (all of them if fewer), as one buffer: a TLS send
    takes one, and one per buffer would be a record and a system call for each family."""
    first = buffers[0]
    if len(first) >= size or len(buffers) == 1:
        return first[:size]
    out, left = [], size
    for buffer in buffers:
        out.append(buffer[:left])
        left -= len(out[-1])
        if not left:
            break
    return b"".join(out)
