"""Informer discovery against a fake API server that speaks the real list/watch protocol.

The processor runs as the pipeline runs it (factory.create, start, process, shutdown); the fake
API server speaks list/watch over HTTP with chunked JSON lines (over HTTPS with the in-cluster
config: token and CA files, as in a pod).  Most tests reach it through a kubeconfig, which the
`kubernetes` package reads; in a pod the agent must not import that package at all.  Labels must follow pods as they
appear, change and disappear; 410, dropped streams, 500s and outages must never lose labels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, Pod, container_id, make_pod
from helpers import poll_until
from kpod.processors.k8sattributes import discovery, factory
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.discovery import InformerDiscovery
from kpod.processors.k8sattributes.pods import PodStore
from kpod.processors.k8sattributes.processor import UNRESOLVED_METRIC, K8sAttributesProcessor

from kpod.cgroup.index import CgroupIndex
from kpod.component import ComponentUnavailable, Context
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings
from kpod.units import Duration

NODE = "node-a"
CPU = MetricDef("kpod.cpu.usage", Kind.COUNTER, "s", "cpu time")


def cgroup_of(pod: Pod, cid: str) -> CgroupRef:
    """The systemd-driver cgroup path of a container of `pod` (containerd)."""
    uid = pod["metadata"]["uid"].replace("-", "_")
    path = f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid}.slice/cri-containerd-{cid}.scope"
    return CgroupRef(abs(hash(path)) % 10**9, path)


@pytest.fixture
def api() -> Iterator[FakeApiServer]:
    server = FakeApiServer().start()
    try:
        yield server
    finally:
        server.stop()


def config(kubeconfig: str, **overrides: object) -> K8sAttributesConfig:
    values: dict[str, object] = {
        "kubeconfig": kubeconfig,
        "wait_for_sync": Duration(5),
        "watch_timeout": Duration(30),
        "request_timeout": Duration(5),
        "backoff_initial": Duration(0.05),
        "backoff_max": Duration(0.2),
    }
    values.update(overrides)
    return K8sAttributesConfig(**values)  # type: ignore[arg-type]


class Harness:
    """A k8sattributes processor in informer mode, pointed at `api`."""

    def __init__(self, api: FakeApiServer, tmp_path: Path, settings: KpodSettings | None = None, **cfg: object):
        self.settings = settings or KpodSettings()
        self.settings.discovery.mode = "informer"
        self.settings.node_name = NODE
        self.self_metrics = SelfMetrics()
        self.context = Context(
            "k8sattributes", self.settings, CgroupIndex(str(tmp_path)), self.self_metrics, logging.getLogger("test")
        )
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        processor = factory.create(self.context, config(kubeconfig, **cfg))
        assert isinstance(processor, K8sAttributesProcessor)
        self.processor = processor

    @property
    def discovery(self) -> InformerDiscovery:
        assert isinstance(self.processor.discovery, InformerDiscovery)
        return self.processor.discovery

    @property
    def store(self) -> PodStore:
        assert self.processor.store is not None
        return self.processor.store

    def labels(self, cgroup: CgroupRef) -> dict[str, str] | None:
        """The Prometheus labels a point of `cgroup` gets this cycle, None if it is dropped."""
        batch = self.processor.process(Batch([Point(CPU, cgroup, (), 1.0)]))
        if not batch.points:
            return None
        assert batch.points[0].resource is not None
        return dict(batch.points[0].resource.labels)

    def unresolved(self, reason: str) -> float:
        return self.self_metrics.get(UNRESOLVED_METRIC, (("reason", reason),))


@pytest.fixture
def harness(api: FakeApiServer, tmp_path: Path) -> Iterator[Harness]:
    h = Harness(api, tmp_path)
    yield h
    h.processor.shutdown()


def test_pods_appear_change_and_disappear(api: FakeApiServer, tmp_path: Path) -> None:
    settings = KpodSettings()
    settings.filter.include_labels = ["team"]
    web = api.add_pod(make_pod("web-1", namespace="shop", labels={"app": "web", "team": "a"}))
    cid = container_id("shop/web-1/app")
    h = Harness(api, tmp_path, settings)
    try:
        h.processor.start()
        assert h.labels(cgroup_of(web, cid)) == {
            "namespace": "shop",
            "pod": "web-1",
            "container": "app",
            "node": NODE,
            "label_team": "a",
        }
        # A pod created after the list arrives through the watch.
        db = api.add_pod(make_pod("db-1", namespace="shop", labels={"team": "b"}, containers=[("pg", "f" * 64)]))
        assert poll_until(lambda: h.labels(cgroup_of(db, "f" * 64)) is not None)
        assert h.labels(cgroup_of(db, "f" * 64)) == {
            "namespace": "shop",
            "pod": "db-1",
            "container": "pg",
            "node": NODE,
            "label_team": "b",
        }

        # A label change (MODIFIED) shows in the next cycle.
        def relabel(pod: Pod) -> None:
            pod["metadata"]["labels"]["team"] = "c"

        api.update_pod(web["metadata"]["uid"], relabel)
        assert poll_until(lambda: (h.labels(cgroup_of(web, cid)) or {}).get("label_team") == "c")

        # A restarted container: new id in the status, old one in lastState; both resolve.
        new_cid = "e" * 64

        def restart(pod: Pod) -> None:
            status = pod["status"]["containerStatuses"][0]
            status["lastState"] = {"terminated": {"containerID": status["containerID"], "exitCode": 1}}
            status["containerID"] = f"containerd://{new_cid}"

        api.update_pod(web["metadata"]["uid"], restart)
        assert poll_until(lambda: (h.labels(cgroup_of(web, new_cid)) or {}).get("container") == "app")
        assert (h.labels(cgroup_of(web, cid)) or {}).get("container") == "app"

        # DELETED: the pod's labels stay for kpod.cgroup.gone_retention (its removed
        # containers' final counts are still exported), then its cgroups are dropped, counted.
        h.processor.context.cgroups.gone_retention_s = 1.0
        h.labels(cgroup_of(db, "f" * 64))  # a cycle: the processor takes the retention
        api.delete_pod(web["metadata"]["uid"])
        assert poll_until(lambda: web["metadata"]["uid"] not in h.store.snapshot())
        assert (h.labels(cgroup_of(web, new_cid)) or {}).get("pod") == "web-1"
        assert poll_until(lambda: h.labels(cgroup_of(web, new_cid)) is None)
        assert h.unresolved("unknown_pod") >= 1
        assert h.labels(cgroup_of(db, "f" * 64)) is not None
    finally:
        h.processor.shutdown()


def test_only_this_node_is_listed_and_watched(api: FakeApiServer, harness: Harness) -> None:
    here = api.add_pod(make_pod("here-1"))
    there = api.add_pod(make_pod("there-1", node="node-b"))
    harness.processor.start()
    api.add_pod(make_pod("there-2", node="node-b"))
    late = api.add_pod(make_pod("here-2"))
    assert poll_until(lambda: late["metadata"]["uid"] in harness.store.snapshot())
    assert set(harness.store.snapshot()) == {here["metadata"]["uid"], late["metadata"]["uid"]}
    assert there["metadata"]["uid"] not in harness.store.snapshot()
    # Never a cluster-wide request: every list and watch carries this node's field selector.
    assert api.requests
    assert all(query.get("fieldSelector") == f"spec.nodeName={NODE}" for _, query in api.requests)
    assert any(query.get("watch") == "true" and query.get("allowWatchBookmarks") == "true" for _, query in api.requests)
    assert harness.processor.status()["pods"] == len(harness.store) == 2  # what /debug/status shows


def test_410_relists_and_keeps_serving_meanwhile(api: FakeApiServer, harness: Harness) -> None:
    web = api.add_pod(make_pod("web-1"))
    cgroup = cgroup_of(web, container_id("default/web-1/app"))
    harness.processor.start()
    assert harness.labels(cgroup) is not None
    api.list_delay = 1.0  # the relist takes a second: the old pods must be served during it
    added_meanwhile = api.add_pod(make_pod("web-2"))  # reaches us by the watch or by the relist
    api.expire_watches()  # ERROR event, code 410; history compacted
    assert poll_until(lambda: api.requests[-1][1].get("limit") == "500", timeout=5)  # relisting
    assert harness.labels(cgroup) == {"namespace": "default", "pod": "web-1", "container": "app", "node": NODE}
    assert poll_until(lambda: harness.discovery.relists_after_gone == 1 and harness.discovery.lists == 2)
    api.list_delay = 0.0
    assert added_meanwhile["metadata"]["uid"] in harness.store.snapshot()
    # After the relist the watch resumes from the new list's version and sees new events.
    third = api.add_pod(make_pod("web-3"))
    assert poll_until(lambda: third["metadata"]["uid"] in harness.store.snapshot())
    assert harness.discovery.errors == 0


def test_resume_from_compacted_version_gets_410_and_relists(api: FakeApiServer, harness: Harness) -> None:
    api.add_pod(make_pod("web-1"))
    harness.processor.start()
    # The stream breaks and the history is compacted before we come back: resuming from our
    # version is answered with an ERROR 410 event, and we relist.
    api.compact()
    gone = api.add_pod(make_pod("web-2"))
    api.compact()
    api.drop_watches()
    assert poll_until(lambda: harness.discovery.relists_after_gone >= 1)
    assert poll_until(lambda: gone["metadata"]["uid"] in harness.store.snapshot())


def test_watch_timeout_resumes_without_relist(api: FakeApiServer, tmp_path: Path) -> None:
    h = Harness(api, tmp_path, watch_timeout=Duration(1))
    try:
        h.processor.start()
        assert poll_until(lambda: h.discovery.watches >= 3, timeout=8)
        assert h.discovery.lists == 1
        pod = api.add_pod(make_pod("web-1"))
        assert poll_until(lambda: pod["metadata"]["uid"] in h.store.snapshot())
        assert h.discovery.errors == 0
    finally:
        h.processor.shutdown()


def test_bookmarks_move_the_resume_point(api: FakeApiServer, harness: Harness) -> None:
    harness.processor.start()
    # start() returns after the list; a bookmark is only sent to a watch that is open.
    assert poll_until(lambda: api.open_watches == 1)
    api.add_pod(make_pod("elsewhere", node="node-b"))  # moves the server's version, not our pods
    before = harness.discovery.resource_version
    api.send_bookmark()
    assert poll_until(lambda: harness.discovery.resource_version == str(api.resource_version))
    assert harness.discovery.resource_version != before


def test_dropped_connections_and_500s_back_off_then_recover(
    api: FakeApiServer, harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The waits the informer asks for between attempts, not wall-clock gaps (a loaded machine
    stretches those): doubling from backoff_initial, capped at backoff_max, one per failure and
    each followed by the next request; after a success the next failure starts over."""
    pauses: list[tuple[float, int]] = []  # (seconds asked for, requests the server had seen)
    pause = InformerDiscovery._pause

    def recording_pause(discovery: InformerDiscovery, seconds: float) -> bool:
        pauses.append((seconds, len(api.requests)))
        return pause(discovery, seconds)

    monkeypatch.setattr(InformerDiscovery, "_pause", recording_pause)
    web = api.add_pod(make_pod("web-1"))
    cgroup = cgroup_of(web, container_id("default/web-1/app"))
    harness.processor.start()
    assert poll_until(lambda: api.open_watches == 1)
    assert pauses == []
    first = len(api.requests)
    api.fail_next(4, 500)
    api.drop_watches()
    late = api.add_pod(make_pod("web-2"))
    assert poll_until(lambda: late["metadata"]["uid"] in harness.store.snapshot())
    assert harness.labels(cgroup) is not None
    assert harness.discovery.errors == 5  # the broken stream and four 500s
    assert harness.store.last_error == ""
    # backoff_initial 0.05 s, backoff_max 0.2 s: after the broken stream 0.05, then after each
    # 500: 0.1, 0.2, 0.2 (capped), 0.2; each retry resumes the watch (no relist); the fifth is it.
    assert pauses == [(0.05, first), (0.1, first + 1), (0.2, first + 2), (0.2, first + 3), (0.2, first + 4)]
    assert [q.get("watch") for _, q in api.requests[first : first + 5]] == ["true"] * 5
    # Recovered: the next failure waits backoff_initial again.
    assert poll_until(lambda: api.open_watches == 1)
    api.drop_watches()
    assert poll_until(lambda: len(pauses) == 6)
    assert pauses[5] == (0.05, first + 5)
    assert poll_until(lambda: api.open_watches == 1)


def test_outage_keeps_last_labels_and_catches_up(api: FakeApiServer, harness: Harness) -> None:
    web = api.add_pod(make_pod("web-1"))
    old = api.add_pod(make_pod("old-1"))
    cgroup = cgroup_of(web, container_id("default/web-1/app"))
    harness.processor.start()
    expected = harness.labels(cgroup)
    assert expected is not None
    api.stop()
    # During the outage: pods are created and deleted, and we keep serving what we knew.
    during = api.add_pod(make_pod("during-1"))
    api.delete_pod(old["metadata"]["uid"])
    assert poll_until(lambda: harness.store.last_error != "")
    time.sleep(0.5)  # several failed reconnects
    assert harness.labels(cgroup) == expected
    assert old["metadata"]["uid"] in harness.store.snapshot()
    api.start()
    assert poll_until(lambda: during["metadata"]["uid"] in harness.store.snapshot())
    assert poll_until(lambda: old["metadata"]["uid"] not in harness.store.snapshot())
    assert harness.labels(cgroup) == expected
    assert poll_until(lambda: harness.store.last_error == "")


def test_wrong_token_is_an_error_that_keeps_the_pods(api: FakeApiServer, harness: Harness) -> None:
    web = api.add_pod(make_pod("web-1"))
    harness.processor.start()
    assert poll_until(lambda: api.open_watches == 1)  # a watch sent before the rotation must end
    api.token = "rotated"  # our token is no longer accepted
    api.drop_watches()
    assert poll_until(lambda: "401" in harness.store.last_error)
    assert "token" in harness.store.last_error
    assert web["metadata"]["uid"] in harness.store.snapshot()


def test_cycles_before_the_first_list_drop_as_not_synced(api: FakeApiServer, tmp_path: Path) -> None:
    web = api.add_pod(make_pod("web-1"))
    cgroup = cgroup_of(web, container_id("default/web-1/app"))
    api.stop()
    h = Harness(api, tmp_path, wait_for_sync=Duration(0.2))
    try:
        h.processor.start()  # returns after wait_for_sync although nothing answered
        assert h.labels(cgroup) is None
        assert h.unresolved("not_synced") == 1
        api.start()
        assert poll_until(lambda: h.labels(cgroup) is not None)
    finally:
        h.processor.shutdown()


def test_no_api_config_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    settings = KpodSettings()
    settings.discovery.mode = "informer"
    context = Context("k8sattributes", settings, CgroupIndex(str(tmp_path)), SelfMetrics())
    processor = factory.create(context, K8sAttributesConfig())
    with pytest.raises(ComponentUnavailable, match="KUBECONFIG"):
        processor.start()
    processor.shutdown()


def test_shutdown_is_prompt_during_a_long_watch(api: FakeApiServer, harness: Harness) -> None:
    harness.processor.start()
    assert poll_until(lambda: api.open_watches == 1)
    began = time.monotonic()
    harness.processor.shutdown()
    assert time.monotonic() - began < 2.0
    harness.processor.shutdown()  # idempotent


def test_list_is_paginated(api: FakeApiServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kpod.processors.k8sattributes.discovery

    monkeypatch.setattr(kpod.processors.k8sattributes.discovery, "LIST_PAGE_SIZE", 2)
    uids = {api.add_pod(make_pod(f"web-{i}"))["metadata"]["uid"] for i in range(5)}
    h = Harness(api, tmp_path)
    try:
        h.processor.start()
        assert set(h.store.snapshot()) == uids
        lists = [q for _, q in api.requests if q.get("watch") != "true"]
        assert [q.get("limit") for q in lists] == ["2", "2", "2"]
        assert [q.get("continue") for q in lists] == [None, "2", "4"]
    finally:
        h.processor.shutdown()


IN_CLUSTER_CHILD = """
import logging, sys, time
from kpod.processors.k8sattributes import apiserver
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.discovery import InformerDiscovery
from kpod.processors.k8sattributes.pods import PodStore

apiserver.SERVICE_ACCOUNT_DIR = sys.argv[1]
store = PodStore()
informer = InformerDiscovery(store, logging.getLogger("child"), "node-a", K8sAttributesConfig())
informer.start()
deadline = time.monotonic() + 20
while len(store.snapshot()) < int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.05)
print(sorted(p.name for p in store.snapshot().values()))
print(store.last_error)
print(sorted(m for m in sys.modules if m == "kubernetes" or m.startswith(("kubernetes.", "urllib3"))))
informer.stop()
"""


def _service_account(directory: Path, token: str, ca: str) -> Path:
    account = directory / "serviceaccount"
    account.mkdir()
    (account / "token").write_text(token + "\n")
    (account / "ca.crt").write_text(Path(ca).read_text())
    return account


def test_in_cluster_lists_and_watches_over_https_without_the_kubernetes_package(tmp_path: Path) -> None:
    """In a pod: KUBERNETES_SERVICE_HOST/PORT, the mounted token and CA, HTTPS to the API
    server; the pods arrive, and the ~30 MiB `kubernetes` package (and its urllib3) is never
    imported, in a fresh interpreter."""
    import os
    import subprocess
    import sys

    from fake_kubelet import make_certs
    from helpers import server_tls

    certs = make_certs(tmp_path)
    api = FakeApiServer(token="pod-token", tls=server_tls(certs.cert, certs.key)).start()
    try:
        api.add_pod(make_pod("web-1"))
        api.add_pod(make_pod("db-1"))
        api.add_pod(make_pod("elsewhere", node="node-b"))
        account = _service_account(tmp_path, "pod-token", certs.ca)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KPOD_", "KUBE"))}
        env.update(KUBERNETES_SERVICE_HOST="127.0.0.1", KUBERNETES_SERVICE_PORT=str(api.port))
        child = subprocess.run(
            [sys.executable, "-c", IN_CLUSTER_CHILD, str(account), "2"],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert child.returncode == 0, child.stderr
        names, error, imported = child.stdout.splitlines()
        assert names == "['db-1', 'web-1']"
        assert error == ""
        assert imported == "[]"
        assert any(q.get("watch") == "true" for _, q in api.requests)
    finally:
        api.stop()


def test_in_cluster_with_a_foreign_ca_says_the_certificate_is_not_trusted(tmp_path: Path) -> None:
    from fake_kubelet import make_certs
    from helpers import server_tls
    from kpod.processors.k8sattributes import apiserver

    certs = make_certs(tmp_path)
    api = FakeApiServer(token="pod-token", tls=server_tls(certs.cert, certs.key)).start()
    try:
        account = _service_account(tmp_path, "pod-token", certs.other_ca)
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
        server = apiserver.in_cluster(env, str(account))
        with pytest.raises(Exception) as caught:
            apiserver.Request(server, "/api/v1/pods", 5, 5)
        assert "not trusted" in apiserver.describe_error(caught.value)
    finally:
        api.stop()


def test_in_cluster_token_is_read_again_after_rotation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Projected tokens rotate: a token file rewritten by the kubelet is used once it is older
    than TOKEN_REFRESH_S (0 here), and the server accepts the new one."""
    from fake_kubelet import make_certs
    from helpers import server_tls
    from kpod.processors.k8sattributes import apiserver

    monkeypatch.setattr(apiserver, "TOKEN_REFRESH_S", 0.0)
    certs = make_certs(tmp_path)
    api = FakeApiServer(token="first", tls=server_tls(certs.cert, certs.key)).start()
    try:
        account = _service_account(tmp_path, "first", certs.ca)
        env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port)}
        server = apiserver.in_cluster(env, str(account))
        apiserver.Request(server, "/api/v1/pods", 5, 5).close()
        api.token = "second"
        with pytest.raises(apiserver.ApiError, match="401"):
            apiserver.Request(server, "/api/v1/pods", 5, 5)
        (account / "token").write_text("second\n")
        apiserver.Request(server, "/api/v1/pods", 5, 5).close()
    finally:
        api.stop()


def test_in_cluster_without_a_token_is_unavailable(tmp_path: Path) -> None:
    from kpod.processors.k8sattributes import apiserver

    with pytest.raises(ComponentUnavailable, match="token"):
        apiserver.in_cluster({"KUBERNETES_SERVICE_HOST": "10.0.0.1"}, str(tmp_path))


class _EndlessLine:
    """A watch response that sends one good event, then a line that never ends."""

    def chunks(self) -> Iterator[bytes]:
        yield b'{"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}}\n{"type": "ADDED", '
        while True:
            yield b"x" * 65536


def test_a_watch_line_that_never_ends_is_refused_at_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hostile or broken server streams one endless event: the lines before it are read, and
    the endless one fails the watch (which is then retried, the pods kept) at the cap, lowered
    here to 1 MiB, instead of filling the memory."""
    monkeypatch.setattr(discovery, "MAX_VALUE_CHARS", 1 << 20)
    informer = InformerDiscovery.__new__(InformerDiscovery)
    lines = informer._lines(_EndlessLine())
    assert b"BOOKMARK" in next(lines)
    with pytest.raises(ValueError, match=r"^a watch event larger than 1 MiB$"):
        next(lines)
