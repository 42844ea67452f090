"""A fake Kubernetes API server on 127.0.0.1 that speaks the real pod list/watch protocol.

Only what a node-scoped pod informer uses, but the way the real server does it, so the real
`kubernetes` client can be pointed at it (through a kubeconfig file, see `write_kubeconfig`):

- GET /api/v1/pods?fieldSelector=spec.nodeName=<node>[&limit=&continue=] : a PodList with
  metadata.resourceVersion (paginated when `limit` is given);
- ...&watch=true&resourceVersion=<rv>[&allowWatchBookmarks=true&timeoutSeconds=] : a chunked
  HTTP/1.1 response, one JSON watch event per line (ADDED, MODIFIED, DELETED, BOOKMARK,
  ERROR), starting after <rv>; a <rv> older than the kept history gets an ERROR event with a
  410 Status, as the real server does after etcd compaction;
- bearer-token authentication (401 Status otherwise).

Test controls: add/update/delete pods (each bumps the resourceVersion and is kept as an event),
`compact()` (forget history: resuming watches get 410), `send_bookmark()`, `expire_watches()`
(an ERROR 410 event on every open watch), `drop_watches()` (close the sockets mid-stream),
`fail_next(n, status)` (the next n requests fail, e.g. 500), `stop()` / `start()` (an outage
on the same port).  Every request is recorded in `requests`.

Reusable outside pytest: `python tests/fake_apiserver.py --pods 110 --node node-a
--kubeconfig /tmp/kc.yaml` serves until killed (end-to-end runs of `kpod-metrics run`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from helpers import QuietHandler, poll_until, serve_http, stop_http

Pod = dict[str, Any]


def container_id(seed: str) -> str:
    """A 64-hex-digit container id derived from a seed (stable across runs)."""
    return hashlib.sha256(seed.encode()).hexdigest()


def make_pod(
    name: str,
    namespace: str = "default",
    node: str = "node-a",
    uid: str | None = None,
    labels: dict[str, str] | None = None,
    containers: list[tuple[str, str]] | None = None,
    init_containers: list[tuple[str, str]] | None = None,
    host_network: bool = False,
    phase: str = "Running",
    runtime: str = "containerd",
) -> Pod:
    """A pod as the API server returns it, with the bulk a real one has (managedFields, spec,
    conditions), so memory measurements see realistic JSON.  `containers` are (name, id);
    an empty id means "not started yet" (no containerID in the status)."""
    uid = uid or str(uuid.uuid4())
    containers = containers if containers is not None else [("app", container_id(f"{namespace}/{name}/app"))]
    init_containers = init_containers or []

    def status(entries: list[tuple[str, str]], ready: bool) -> list[dict[str, Any]]:
        out = []
        for cname, cid in entries:
            entry: dict[str, Any] = {
                "name": cname,
                "image": f"registry.example.com/{cname}:1.2.3",
                "imageID": f"registry.example.com/{cname}@sha256:{container_id(cname)}",
                "ready": ready and bool(cid),
                "restartCount": 0,
                "started": bool(cid),
                "state": {"running": {"startedAt": "2026-11-28T10:00:00Z"}}
                if cid
                else {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {},
            }
            if cid:
                entry["containerID"] = f"{runtime}://{cid}"
            out.append(entry)
        return out

    def spec_container(cname: str) -> dict[str, Any]:
        return {
            "name": cname,
            "image": f"registry.example.com/{cname}:1.2.3",
            "imagePullPolicy": "IfNotPresent",
            "args": ["--listen=:8080", "--log-level=info"],
            "env": [{"name": f"ENV_{i}", "value": f"value-{i}"} for i in range(8)],
            "ports": [{"containerPort": 8080, "name": "http", "protocol": "TCP"}],
            "resources": {"limits": {"cpu": "500m", "memory": "256Mi"}, "requests": {"cpu": "100m", "memory": "128Mi"}},
            "volumeMounts": [
                {
                    "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount",
                    "name": "kube-api-access",
                    "readOnly": True,
                }
            ],
            "terminationMessagePath": "/dev/termination-log",
            "terminationMessagePolicy": "File",
            "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080, "scheme": "HTTP"}, "periodSeconds": 10},
        }

    spec = {
        "nodeName": node,
        "hostNetwork": host_network,
        "containers": [spec_container(c) for c, _ in containers],
        "initContainers": [spec_container(c) for c, _ in init_containers],
        "volumes": [
            {"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}
        ],
        "restartPolicy": "Always",
        "serviceAccountName": "default",
        "tolerations": [
            {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
            {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
        ],
        "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler",
        "priority": 0,
    }
    # kubectl apply leaves the whole manifest in an annotation: often the largest field of a pod.
    applied = json.dumps({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec})
    return {
        "kind": "Pod",
        "apiVersion": "v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid,
            "resourceVersion": "0",
            "creationTimestamp": "2026-11-28T10:00:00Z",
            "labels": dict(labels or {"app": name.rsplit("-", 1)[0]}),
            "annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-11-28T09:59:00Z",
                "kubectl.kubernetes.io/last-applied-configuration": applied,
            },
            "ownerReferences": [
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{name}-rs", "uid": str(uuid.uuid4())}
            ],
            "managedFields": [
                {
                    "manager": "kube-controller-manager",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-11-28T10:00:00Z",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:metadata": {"f:labels": {".": {}, "f:app": {}}}, "f:spec": {"f:containers": {}}},
                },
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "subresource": "status",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {"f:conditions": {}, "f:containerStatuses": {}, "f:podIP": {}}},
                },
            ],
        },
        "spec": spec,
        "status": {
            "phase": phase,
            "hostIP": "10.0.0.10",
            "podIP": "10.244.1.23",
            "qosClass": "Burstable",
            "startTime": "2026-11-28T10:00:00Z",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": "2026-11-28T10:00:05Z"}
                for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")
            ],
            "containerStatuses": status(containers, True),
            "initContainerStatuses": status(init_containers, False),
        },
    }


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message,
            "reason": reason, "code": code}  # fmt: skip


@dataclass
class _Event:
    rv: int
    type: str
    obj: Pod


class _Closed(Exception):
    """The test closed this watch (drop or stop)."""


class FakeApiServer:
    def __init__(
        self, token: str = "test-token", host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None
    ) -> None:
        self.token = token
        self.tls = tls  # HTTPS with this server context (an API server as a pod sees it)
        # Verbs RBAC refuses (403 with the real server's Status), e.g. {"list"} or {"watch"}.
        self.forbidden_verbs: set[str] = set()
        self.host = host
        self.port = port
        self._cond = threading.Condition()
        self._rv = 100
        self._pods: dict[str, Pod] = {}  # by uid
        self._events: list[_Event] = []
        self._oldest_rv = self._rv  # watches from an rv below this get 410
        self._drop_generation = 0
        self._expire_generation = 0
        self._bookmark_generation = 0
        self._fail: list[int] = []
        self._server: ThreadingHTTPServer | None = None
        self._sockets: set[socket.socket] = set()
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.request_times: list[float] = []  # time.monotonic() of each request, as `requests`
        self.list_delay = 0.0  # seconds a list request waits before answering (a slow relist)
        self.open_watches = 0

    # Lifecycle ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def start(self) -> FakeApiServer:
        self._server = serve_http(_make_handler(self), self.host, self.port, tls=self.tls)
        self.port = self._server.server_address[1]
        return self

    def stop(self) -> None:
        """An outage: stop listening and cut every open connection.  start() resumes (same port)."""
        server, self._server = self._server, None
        stop_http(server)
        self.drop_watches()
        with self._cond:
            sockets = list(self._sockets)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> FakeApiServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: str, ca_file: str = "", token: str | None = None) -> str:
        """A kubeconfig for this server; `ca_file`: the CA to trust (HTTPS), `token`: another token."""
        cluster: dict[str, str] = {"server": self.url}
        if ca_file:
            cluster["certificate-authority"] = ca_file
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": self.token if token is None else token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        with open(path, "w") as handle:
            json.dump(config, handle)  # JSON is YAML
        return path

    # State --------------------------------------------------------------------------------

    def _record(self, kind: str, pod: Pod) -> None:
        # Called with the condition held.
        self._rv += 1
        pod["metadata"]["resourceVersion"] = str(self._rv)
        self._events.append(_Event(self._rv, kind, copy.deepcopy(pod)))
        self._cond.notify_all()

    def add_pod(self, pod: Pod) -> Pod:
        with self._cond:
            self._pods[pod["metadata"]["uid"]] = pod
            self._record("ADDED", pod)
            return pod

    def update_pod(self, uid: str, change: Callable[[Pod], None]) -> Pod:
        with self._cond:
            pod = self._pods[uid]
            change(pod)
            self._record("MODIFIED", pod)
            return pod

    def delete_pod(self, uid: str) -> None:
        with self._cond:
            pod = self._pods.pop(uid)
            self._record("DELETED", pod)

    def pods(self) -> list[Pod]:
        with self._cond:
            return [copy.deepcopy(p) for p in self._pods.values()]

    @property
    def resource_version(self) -> int:
        return self._rv

    def compact(self) -> None:
        """Forget the event history (etcd compaction): watches from older versions get 410."""
        with self._cond:
            self._events.clear()
            self._oldest_rv = self._rv

    def send_bookmark(self) -> None:
        with self._cond:
            self._bookmark_generation += 1
            self._cond.notify_all()

    def expire_watches(self) -> None:
        """Send every open watch an ERROR event with code 410, then end it (and compact)."""
        with self._cond:
            self._events.clear()
            self._oldest_rv = self._rv
            self._expire_generation += 1
            self._cond.notify_all()

    def drop_watches(self) -> None:
        """Cut every open watch mid-stream (no terminating chunk)."""
        with self._cond:
            self._drop_generation += 1
            self._cond.notify_all()

    def fail_next(self, count: int, status: int = 500) -> None:
        with self._cond:
            self._fail.extend([status] * count)

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        return poll_until(predicate, timeout)

    # Serving ------------------------------------------------------------------------------

    def _take_failure(self) -> int | None:
        with self._cond:
            return self._fail.pop(0) if self._fail else None

    @staticmethod
    def _node_of(selector: str) -> str | None:
        if not selector:
            return None
        key, sep, value = selector.partition("=")
        if key != "spec.nodeName" or not sep:
            raise ValueError(f"unsupported field selector {selector!r}")
        return value.lstrip("=")

    def _list(self, node: str | None, limit: int, cont: str) -> dict[str, Any]:
        with self._cond:
            pods = sorted(
                (p for p in self._pods.values() if node is None or p["spec"].get("nodeName") == node),
                key=lambda p: (p["metadata"]["namespace"], p["metadata"]["name"]),
            )
            items = copy.deepcopy(pods)
            rv = self._rv
        start = int(cont) if cont else 0
        metadata: dict[str, Any] = {"resourceVersion": str(rv)}
        if limit:
            if start + limit < len(items):
                metadata["continue"] = str(start + limit)
            items = items[start : start + limit]
        return {"kind": "PodList", "apiVersion": "v1", "metadata": metadata, "items": items}


def _make_handler(api: FakeApiServer) -> type[BaseHTTPRequestHandler]:
    class Handler(QuietHandler):
        def _send_json(self, code: int, body: dict[str, Any]) -> None:
            self.reply(code, json.dumps(body).encode(), "application/json")

        def do_GET(self) -> None:
            with api._cond:
                api._sockets.add(self.connection)
            try:
                self._get()
            finally:
                with api._cond:
                    api._sockets.discard(self.connection)

        def _get(self) -> None:
            parts = urlsplit(self.path)
            query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
            api.requests.append((parts.path, query))
            api.request_times.append(time.monotonic())
            scheme, _, token = (self.headers.get("Authorization") or "").partition(" ")
            # The scheme is case-insensitive (RFC 7235; the in-cluster client sends "bearer").
            if api.token and (scheme.lower() != "bearer" or token != api.token):
                self._send_json(401, _status(401, "Unauthorized", "Unauthorized"))
                return
            failure = api._take_failure()
            if failure is not None:
                self._send_json(failure, _status(failure, "InternalError", f"injected failure {failure}"))
                return
            if parts.path != "/api/v1/pods":
                self._send_json(404, _status(404, "NotFound", f"{parts.path} not found"))
                return
            try:
                node = api._node_of(query.get("fieldSelector", ""))
            except ValueError as error:
                self._send_json(400, _status(400, "BadRequest", str(error)))
                return
            verb = "watch" if query.get("watch") in ("true", "1") else "list"
            if verb in api.forbidden_verbs:
                message = (f'pods is forbidden: User "system:serviceaccount:kpod:kpod" cannot {verb} resource '
                           '"pods" in API group "" at the cluster scope')  # fmt: skip
                self._send_json(403, _status(403, "Forbidden", message))
                return
            if verb == "watch":
                self._watch(node, query)
            else:
                if api.list_delay:
                    time.sleep(api.list_delay)
                self._send_json(200, api._list(node, int(query.get("limit") or 0), query.get("continue", "")))

        def _chunk(self, obj: dict[str, Any]) -> None:
            data = json.dumps(obj).encode() + b"\n"
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _watch(self, node: str | None, query: dict[str, str]) -> None:
            # No resourceVersion (or "0"): start with the current state as synthetic ADDED
            # events, as the real server does.
            rv = int(query.get("resourceVersion") or 0)
            initial: list[Pod] = []
            if rv == 0:
                with api._cond:
                    rv = api._rv
                    initial = [copy.deepcopy(p) for p in api._pods.values()]
            bookmarks = query.get("allowWatchBookmarks") == "true"
            timeout = float(query.get("timeoutSeconds") or 1800)
            deadline = time.monotonic() + timeout
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            with api._cond:
                api.open_watches += 1
                drop_gen, expire_gen, bookmark_gen = (
                    api._drop_generation,
                    api._expire_generation,
                    api._bookmark_generation,
                )
                too_old = rv < api._oldest_rv
            try:
                if too_old:
                    message = f"too old resource version: {rv} ({api._oldest_rv})"
                    self._chunk({"type": "ERROR", "object": _status(410, "Expired", message)})
                    self._end()
                    return
                sent = rv
                for pod in initial:
                    if node is None or pod["spec"].get("nodeName") == node:
                        self._chunk({"type": "ADDED", "object": pod})
                while True:
                    with api._cond:
                        api._cond.wait_for(
                            lambda sent=sent, bookmark_gen=bookmark_gen: (
                                api._rv > sent
                                or api._drop_generation != drop_gen
                                or api._expire_generation != expire_gen
                                or api._bookmark_generation != bookmark_gen
                                or time.monotonic() >= deadline
                            ),
                            timeout=max(0.0, min(0.2, deadline - time.monotonic())),
                        )
                        if api._drop_generation != drop_gen:
                            raise _Closed
                        if api._expire_generation != expire_gen:
                            events, expire = [], True
                        else:
                            events = [e for e in api._events if e.rv > sent]
                            expire = False
                        bookmark = api._bookmark_generation != bookmark_gen
                        bookmark_gen = api._bookmark_generation
                        current_rv = api._rv
                    if expire:
                        self._chunk({"type": "ERROR", "object": _status(410, "Expired", "watch expired")})
                        self._end()
                        return
                    for event in events:
                        if node is None or event.obj["spec"].get("nodeName") == node:
                            self._chunk({"type": event.type, "object": event.obj})
                    # Everything up to current_rv is sent, filtered out or compacted away.
                    sent = max(sent, current_rv)
                    if bookmark and bookmarks:
                        self._chunk(
                            {
                                "type": "BOOKMARK",
                                "object": {"kind": "Pod", "apiVersion": "v1",
                                           "metadata": {"resourceVersion": str(current_rv)}},
                            }
                        )  # fmt: skip
                    if time.monotonic() >= deadline:
                        self._end()
                        return
            except (_Closed, OSError):
                # Cut the connection without the terminating chunk: the client sees a broken stream.
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
            finally:
                with api._cond:
                    api.open_watches -= 1

        def _end(self) -> None:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="fake Kubernetes API server (pods list/watch)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--pods", type=int, default=10)
    parser.add_argument("--node", default="node-a")
    parser.add_argument("--token", default="test-token")
    parser.add_argument("--kubeconfig", help="write a kubeconfig pointing at the server here")
    parser.add_argument("--churn", type=float, default=0.0, help="pod updates (MODIFIED events) per second")
    args = parser.parse_args()
    api = FakeApiServer(token=args.token, port=args.port).start()
    for i in range(args.pods):
        api.add_pod(make_pod(f"app{i % 10}-{i}", namespace=f"ns{i % 5}", node=args.node))
    if args.kubeconfig:
        api.write_kubeconfig(args.kubeconfig)
    print(api.url, flush=True)
    uids = [p["metadata"]["uid"] for p in api.pods()]
    tick = 0

    def touch(pod: Pod) -> None:
        # What a busy node sends: status and annotation updates of running pods.
        pod["metadata"]["annotations"]["kpod.test/tick"] = str(tick)
        pod["status"]["conditions"][1]["lastTransitionTime"] = f"2026-11-28T10:{tick % 60:02d}:00Z"

    try:
        while True:
            if args.churn > 0 and uids:
                time.sleep(1.0 / args.churn)
                tick += 1
                api.update_pod(uids[tick % len(uids)], touch)
            else:
                time.sleep(3600)
    except KeyboardInterrupt:
        api.stop()


if __name__ == "__main__":
    main()
