"""Node-scoped pod discovery: keeps a PodStore filled from the API server or the kubelet.

`InformerDiscovery` (kpod.discovery.mode: informer) lists and then watches the pods of this
node only (fieldSelector spec.nodeName=<node>: one watch per node, never the cluster):
  - list (paginated), remember the list's resourceVersion, watch from it with bookmarks on;
    every event's resourceVersion moves the resume point, so a watch that ends (the server's
    timeoutSeconds, a dropped connection) resumes where it stopped without a relist;
  - "410 Gone" (an ERROR event, or an HTTP 410: our resourceVersion was compacted away) leads
    to a relist, which replaces the store in one step: the old pods are served until then;
  - any other error: log (once per distinct message), back off (doubling, capped), retry.
    The store keeps the last known pods all along, so labels survive an API outage.
  Memory: requests are plain http.client GETs (apiserver.py: in a pod, the service account's
  token and CA, without importing the `kubernetes` package, which costs some 30 MiB; that
  package only reads a kubeconfig outside a cluster); a list page is decoded as it arrives
  (podlist.PodListDecoder), each pod cut down to a `PodInfo` at once; a watch event is one line.

`KubeletDiscovery` (mode: kubelet) polls the kubelet's /pods (already node-local) every
kpod.discovery.kubelet.poll_interval with the service-account token; TLS verification against
ca_file unless insecure_skip_verify; plain http allowed (a local proxy).  The response is
decoded as it arrives, pod by pod: at no time the whole body, nor the whole node's pods as JSON
objects (which is what made kubelet mode's RSS exceed informer mode's).  A failed poll (bad
token, bad certificate, garbage, a response over MAX_RESPONSE_BYTES or a pod over
podlist.MAX_VALUE_CHARS) is logged in one line naming the URL, and the last good list stays.

Both run in one daemon thread, started and stopped by the k8sattributes processor.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from kpod.processors.k8sattributes import apiserver
from kpod.processors.k8sattributes.podlist import MAX_VALUE_CHARS, PodListDecoder, PodListPage, scalar_text
from kpod.processors.k8sattributes.pods import PodInfo, PodStore, pod_from_json

from kpod.component import ComponentUnavailable
from kpod.settings import KpodSettings

LIST_PAGE_SIZE = 500
CHUNK_BYTES = 65536  # read from the kubelet at a time
# The kubelet's /pods at most: at 20 KB a pod (large for a pod), some 6,000 pods.  Beyond it the
# poll fails with an error and the last good pods stay: a response that never ends is refused.
MAX_RESPONSE_BYTES = 128 * 1024 * 1024


class DiscoveryConfig(Protocol):
    """The k8sattributes processor config fields discovery reads."""

    kubeconfig: str
    watch_timeout: Any
    request_timeout: Any
    backoff_initial: Any
    backoff_max: Any


class Gone(Exception):
    """The resourceVersion we resume from is too old (HTTP 410 / ERROR event with code 410)."""


def _load_json(data: bytes | str) -> Any:
    """json.loads, with every way garbage can fail turned into ValueError."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        # RecursionError: a document nested thousands deep (json recurses per level).
        raise ValueError(f"not JSON ({type(error).__name__})") from None


@dataclass(frozen=True)
class WatchEvent:
    """One line of a watch stream, decoded.

    kind: ADDED | MODIFIED | DELETED | BOOKMARK | ERROR, or SKIP for a line that is not a
    usable event (not JSON, not an object, an unknown type).  `pod` is None for an ADDED or
    MODIFIED event whose object is not a usable pod (`reason` says why); such an event still
    moves the resume point.
    """

    kind: str
    resource_version: str = ""
    pod: PodInfo | None = None
    uid: str = ""  # DELETED
    code: int | None = None  # ERROR
    reason: str = ""


WATCH_KINDS = ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR")


def decode_watch_event(line: bytes | str) -> WatchEvent:
    """Decode one newline-delimited watch event.  Pure: never raises."""
    try:
        event = _load_json(line)
    except ValueError as error:
        return WatchEvent("SKIP", reason=str(error))
    if not isinstance(event, dict):
        return WatchEvent("SKIP", reason="event is not a JSON object")
    kind = event.get("type")
    obj = event.get("object")
    if not isinstance(obj, dict):
        obj = {}
    if kind not in WATCH_KINDS:
        return WatchEvent("SKIP", reason=f"unknown event type {str(kind)[:32]!r}")
    if kind == "ERROR":
        code = obj.get("code")
        message = obj.get("message") or obj.get("reason") or ""
        return WatchEvent(
            "ERROR", code=code if isinstance(code, int) and not isinstance(code, bool) else None, reason=str(message)
        )
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
    version = scalar_text(metadata.get("resourceVersion"))
    if kind in ("ADDED", "MODIFIED"):
        try:
            return WatchEvent(kind, version, pod=pod_from_json(obj))
        except (ValueError, AttributeError, TypeError, RecursionError) as error:
            return WatchEvent(kind, version, reason=f"malformed pod: {type(error).__name__}: {str(error)[:80]}")
    if kind == "DELETED":
        uid = metadata.get("uid")
        return WatchEvent(kind, version, uid=uid.lower() if isinstance(uid, str) else "")
    return WatchEvent(kind, version)


class _Base:
    """The thread, the stop event and error logging shared by both discoveries."""

    kind = "discovery"

    def __init__(self, store: PodStore, log: logging.Logger) -> None:
        self.store = store
        self.log = log
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_logged = ""
        self.errors = 0
        self.skipped = 0  # list items and watch lines that were not usable pods or events

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run_guarded, name=f"kpod-{self.kind}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._interrupt()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout)

    def _interrupt(self) -> None:
        """Unblock a blocking read so that stop() is prompt."""

    def _pause(self, seconds: float) -> bool:
        """Wait `seconds` before the next attempt (a backoff, a poll interval); True when
        stop() came meanwhile.  The one place the thread waits, so tests can see its waits."""
        return self._stop.wait(seconds)

    def wait_synced(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.store.synced and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.02)
        return self.store.synced

    def _run_guarded(self) -> None:
        try:
            self._run()
        except Exception:  # a bug here must be visible, and the last pods stay served
            self.log.exception("%s thread died; pods are no longer updated", self.kind)
            self.store.set_error(f"{self.kind} thread died")

    def _run(self) -> None:
        raise NotImplementedError

    def _error(self, message: str) -> None:
        """Log an error once per distinct message (an outage would otherwise log per retry)."""
        self.errors += 1
        self.store.set_error(message)
        if message != self._last_logged:
            self.log.error("%s: %s (serving the last %d known pods)", self.kind, message, len(self.store))
            self._last_logged = message
        else:
            self.log.debug("%s: %s (again)", self.kind, message)

    def _recovered(self) -> None:
        if self.store.last_error:
            self.store.set_error("")
        if self._last_logged:
            self.log.info("%s: recovered, %d pods", self.kind, len(self.store))
            self._last_logged = ""

    def status(self) -> dict[str, Any]:
        return {"discovery_errors": self.errors, "skipped_objects": self.skipped}


class InformerDiscovery(_Base):
    kind = "informer"

    def __init__(self, store: PodStore, log: logging.Logger, node: str, config: DiscoveryConfig) -> None:
        super().__init__(store, log)
        self.node = node
        self.field_selector = f"spec.nodeName={node}"
        self.watch_timeout = max(1, round(config.watch_timeout.seconds))
        self.request_timeout = max(0.1, config.request_timeout.seconds)
        self.backoff_initial = max(0.01, config.backoff_initial.seconds)
        self.backoff_max = max(self.backoff_initial, config.backoff_max.seconds)
        self.kubeconfig = config.kubeconfig
        self.resource_version = ""
        self.lists = 0
        self.watches = 0
        self.relists_after_gone = 0
        self.streamed = False  # the current (or last) watch delivered an event
        self._server: apiserver.ApiServer | None = None
        self._request: apiserver.Request | None = None
        self._request_lock = threading.Lock()

    def start(self) -> None:
        self._server = apiserver.load(self.kubeconfig)
        super().start()

    def _interrupt(self) -> None:
        with self._request_lock:
            request = self._request
        if request is not None:
            request.cut()  # unblocks a read in progress in the thread

    def status(self) -> dict[str, Any]:
        return {
            "discovery_errors": self.errors,
            "skipped_objects": self.skipped,
            "field_selector": self.field_selector,
            "resource_version": self.resource_version,
            "lists": self.lists,
            "watches": self.watches,
            "relists_after_gone": self.relists_after_gone,
        }

    # One list, one watch --------------------------------------------------------------------

    def _call(self, query: list[tuple[str, str]], read_timeout: float) -> apiserver.Request:
        """GET /api/v1/pods with this node's field selector; raises ApiError on a non-2xx
        answer.  The request is kept so that stop() can cut it."""
        assert self._server is not None
        target = "/api/v1/pods?" + urllib.parse.urlencode([("fieldSelector", self.field_selector), *query])
        request = apiserver.Request(self._server, target, self.request_timeout, read_timeout)
        with self._request_lock:
            self._request = request
        if self._stop.is_set():
            request.cut()
        return request

    def _forget(self, request: apiserver.Request) -> None:
        with self._request_lock:
            if self._request is request:
                self._request = None
        request.close()

    def list(self) -> str:
        """List this node's pods into the store; returns the list's resourceVersion."""
        pods: list[PodInfo] = []
        cont = ""
        version = ""
        while True:
            query = [("limit", str(LIST_PAGE_SIZE))]
            if cont:
                query.append(("continue", cont))
            request = self._call(query, self.request_timeout)
            try:
                # Decoded as it arrives: never the whole page's JSON as Python objects at once.
                decoder = PodListDecoder(self.log)
                for chunk in request.chunks():
                    decoder.feed(chunk)
                page = decoder.finish()
            finally:
                self._forget(request)
            self.skipped += page.skipped
            pods.extend(page.pods)
            cont = page.cont
            version = version or page.resource_version
            if not cont:
                break
        if not version:
            raise ValueError("pod list without metadata.resourceVersion")
        self.store.replace(pods)
        self.lists += 1
        if not pods:
            self.log.warning("no pods on node %r: is kpod.node_name this node's name?", self.node)
        return version

    def _lines(self, request: Any) -> Iterator[bytes]:
        """The lines of a streamed watch response (events are newline-terminated JSON)."""
        pending = b""
        for chunk in request.chunks():
            pending += chunk
            while True:
                newline = pending.find(b"\n")
                if newline < 0:
                    break
                line, pending = pending[:newline], pending[newline + 1 :]
                if line.strip():
                    yield line
            if len(pending) > MAX_VALUE_CHARS:  # a line that never ends must not fill the memory
                raise ValueError(f"a watch event larger than {MAX_VALUE_CHARS / 2**20:g} MiB")
        if pending.strip():
            yield pending

    def watch(self, version: str) -> tuple[str, int]:
        """Watch from `version` until the stream ends; returns (last version, events seen).

        Raises Gone when the server says the version is too old.
        """
        request = self._call(
            [
                ("watch", "true"),
                ("resourceVersion", version),
                ("allowWatchBookmarks", "true"),
                ("timeoutSeconds", str(self.watch_timeout)),
            ],
            # The server ends the watch after timeoutSeconds; the read timeout is only there
            # to notice a connection that died silently.
            self.watch_timeout + self.request_timeout,
        )
        self.watches += 1
        self._recovered()  # connected and streaming: whatever failed before works again
        self.streamed = False
        events = 0
        try:
            for line in self._lines(request):
                if self._stop.is_set():
                    break
                event = decode_watch_event(line)
                if event.kind == "SKIP":
                    # Not an event at all: skip and count it; failing the watch would only
                    # reconnect into the same stream.
                    self.skipped += 1
                    self.log.debug("skipping a watch line: %s", event.reason)
                    continue
                if event.kind == "ERROR":
                    if event.code == 410:
                        raise Gone(event.reason or "resource version too old")
                    raise RuntimeError(f"watch error {event.code}: {event.reason}")
                new_version = event.resource_version
                if event.kind in ("ADDED", "MODIFIED"):
                    if event.pod is not None:
                        self.store.upsert(event.pod)
                    else:
                        # Skip it rather than fail the watch: resuming would replay it forever.
                        self.skipped += 1
                        self.log.debug("skipping a malformed pod event: %s", event.reason)
                elif event.kind == "DELETED" and event.uid:
                    self.store.delete(event.uid)
                if new_version:
                    version = str(new_version)
                    self.resource_version = version
                events += 1
                self.streamed = True
        finally:
            self._forget(request)
        return version, events

    # The loop -------------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self.backoff_initial
        version = ""
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                if not version:
                    version = self.list()
                    self.resource_version = version
                    self._recovered()
                    backoff = self.backoff_initial
                version, events = self.watch(version)
                # A watch that ended by itself at once with nothing in it (a proxy closing idle
                # streams?) must not turn into a busy loop: it counts as a failure.
                if events == 0 and time.monotonic() - began < 1.0 and not self._stop.is_set():
                    raise RuntimeError("watch ended immediately without events")
                self._recovered()
                backoff = self.backoff_initial
                continue
            except Gone as error:
                if self._stop.is_set():
                    break
                # Our version was compacted away: relist (the store keeps serving meanwhile).
                self.log.info("informer: %s; relisting", error)
                self.relists_after_gone += 1
                version = ""
                continue
            except apiserver.ApiError as error:
                if error.status == 410:
                    self.log.info("informer: 410 Gone; relisting")
                    self.relists_after_gone += 1
                    version = ""
                    continue
                message = f"API server {error.status} {error.reason}".strip()
                if error.status in (401, 403):
                    message += " (check the service account token and RBAC: list/watch pods)"
            except Exception as error:
                if self._stop.is_set():
                    break
                message = apiserver.describe_error(error)
            self._error(message)
            if self.streamed:
                # The watch that broke had delivered events: the server works, and this is a
                # new failure, not the next one of a run (an outage's 30 s would otherwise
                # delay the reconnect after any later drop).
                backoff = self.backoff_initial
                self.streamed = False
            if self._pause(backoff):
                break
            backoff = min(backoff * 2, self.backoff_max)


class KubeletDiscovery(_Base):
    kind = "kubelet"

    def __init__(self, store: PodStore, log: logging.Logger, settings: KpodSettings, request_timeout: float) -> None:
        super().__init__(store, log)
        kubelet = settings.discovery.kubelet
        self.url = kubelet.url
        self.poll_interval = max(0.05, kubelet.poll_interval.seconds)
        self.token_file = kubelet.token_file
        self.ca_file = kubelet.ca_file
        self.insecure = kubelet.insecure_skip_verify
        self.request_timeout = request_timeout
        self.polls = 0
        # The TLS context, made again only when the CA file changes (a context per poll would
        # parse the CA and allocate OpenSSL's tables every time).
        self._tls: ssl.SSLContext | None = None
        self._tls_key: tuple[int, int, int] | None = None

    def start(self) -> None:
        if not self.url.startswith(("https://", "http://")):
            raise ComponentUnavailable(f"kubelet url {self.url!r}: not an http(s) URL")
        if "${" in self.url or getattr(self.url, "unset", ()):
            # getattr: the config's ${env:...} substitution marks a url made with unset variables.
            raise ComponentUnavailable(f"kubelet url {self.url!r}: an environment variable is not set")
        super().start()

    def status(self) -> dict[str, Any]:
        return {"discovery_errors": self.errors, "skipped_objects": self.skipped, "url": self.url, "polls": self.polls}

    def _ssl_context(self) -> ssl.SSLContext:
        if self.insecure:
            if self._tls is None:
                self._tls = ssl.create_default_context()
                self._tls.check_hostname = False
                self._tls.verify_mode = ssl.CERT_NONE
            return self._tls
        try:
            info = os.stat(self.ca_file)
            key = (info.st_ino, info.st_size, info.st_mtime_ns)
            if self._tls is None or key != self._tls_key:
                self._tls = ssl.create_default_context(cafile=self.ca_file)
                self._tls_key = key
        except (OSError, ssl.SSLError) as error:
            self._tls = self._tls_key = None
            raise ValueError(f"CA file {self.ca_file}: {error}") from None
        return self._tls

    def _connect(self) -> tuple[http.client.HTTPConnection, str]:
        """A connection to the kubelet (not yet open) and the request target (path?query).
        Plain http.client: urllib.request would also send the request through a proxy named
        in the environment (HTTPS_PROXY), where the node's own kubelet is not."""
        parts = urllib.parse.urlsplit(self.url)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        host = parts.hostname or ""
        if parts.scheme == "https":
            context = self._ssl_context()
            return http.client.HTTPSConnection(host, parts.port, timeout=self.request_timeout, context=context), target
        return http.client.HTTPConnection(host, parts.port, timeout=self.request_timeout), target

    def fetch(self) -> list[PodInfo]:
        """One poll.  Raises ValueError with a message a user can act on.

        The response is decoded as it arrives (PodListDecoder): neither the whole body nor
        the whole document as Python objects is ever held, only each pod's few fields.
        """
        headers = {"Accept": "application/json"}
        try:
            with open(self.token_file) as handle:  # re-read: projected tokens rotate
                headers["Authorization"] = f"Bearer {handle.read().strip()}"
        except OSError as error:
            if self.url.startswith("https://"):
                raise ValueError(f"token file {self.token_file}: {error.strerror}") from None
        try:
            connection, target = self._connect()
            try:
                connection.request("GET", target, headers=headers)
                response = connection.getresponse()
                if not 200 <= response.status <= 299:
                    hint = " (the token was rejected)" if response.status in (401, 403) else ""
                    raise ValueError(f"{self.url}: HTTP {response.status} {response.reason}{hint}")
                page = self._decode(response)
            finally:
                connection.close()
        except ssl.SSLCertVerificationError as error:
            raise ValueError(
                f"{self.url}: TLS certificate not trusted by {self.ca_file} ({error.verify_message})"
            ) from None
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"{self.url}: {error}") from None
        except http.client.HTTPException as error:
            raise ValueError(f"{self.url}: {type(error).__name__}: {error}".rstrip(": ")) from None
        self.skipped += page.skipped
        return page.pods

    def _decode(self, response: http.client.HTTPResponse) -> PodListPage:
        decoder = PodListDecoder(self.log)
        received = 0
        try:
            while chunk := response.read1(CHUNK_BYTES):
                received += len(chunk)
                if received > MAX_RESPONSE_BYTES:
                    raise ValueError(f"response larger than {MAX_RESPONSE_BYTES / 2**20:g} MiB")
                decoder.feed(chunk)
            return decoder.finish()
        except ValueError as error:
            raise ValueError(f"{self.url}: {error}") from None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                pods = self.fetch()
            except ValueError as error:
                self._error(str(error))
            else:
                self.store.replace(pods)
                self.polls += 1
                self._recovered()
            if self._pause(self.poll_interval):
                break


def create_discovery(
    mode: str, settings: KpodSettings, config: DiscoveryConfig, store: PodStore, log: logging.Logger, node: str
) -> InformerDiscovery | KubeletDiscovery:
    if mode == "informer":
        return InformerDiscovery(store, log, node, config)
    if mode == "kubelet":
        return KubeletDiscovery(store, log, settings, config.request_timeout.seconds)
    raise ValueError(f"no discovery for mode {mode!r}")
