"""Kubelet discovery: /pods over HTTPS with a self-signed CA and a bearer token.

A wrong token, a wrong CA and garbage JSON must each log a clear error and keep the last good
pod list; filters apply exactly as in informer mode (reference pitfall 9).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_apiserver import container_id, make_pod
from fake_kubelet import Certs, FakeKubelet, make_certs
from helpers import poll_until, require_tools
from kpod.processors.k8sattributes import discovery, factory, podlist
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.discovery import KubeletDiscovery
from kpod.processors.k8sattributes.processor import UNRESOLVED_METRIC, K8sAttributesProcessor

from kpod.cgroup.index import CgroupIndex
from kpod.component import ComponentUnavailable, Context
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings
from kpod.units import Duration


@pytest.fixture(autouse=True)
def _openssl() -> None:
    require_tools("openssl")  # test certificates


CPU = MetricDef("kpod.cpu.usage", Kind.COUNTER, "s", "cpu time")
NODE = "node-a"


def cgroup_of(pod: dict, cid: str) -> CgroupRef:
    """The cgroupfs-driver path of a container of `pod`."""
    path = f"/kubepods/besteffort/pod{pod['metadata']['uid']}/{cid}"
    return CgroupRef(abs(hash(path)) % 10**9, path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def kubelet(certs: Certs) -> Iterator[FakeKubelet]:
    server = FakeKubelet(certs=certs).start()
    try:
        yield server
    finally:
        server.stop()


class Harness:
    def __init__(
        self,
        tmp_path: Path,
        url: str,
        ca: str,
        token: str = "kubelet-token",
        settings: KpodSettings | None = None,
        **kubelet: object,
    ) -> None:
        self.settings = settings or KpodSettings()
        self.settings.discovery.mode = "kubelet"
        self.settings.node_name = NODE
        k = self.settings.discovery.kubelet
        k.url = url
        k.poll_interval = Duration(0.1)
        self.ca_file = tmp_path / "ca.crt"
        if Path(ca).exists():
            shutil.copy(ca, self.ca_file)
        k.ca_file = str(self.ca_file)
        self.token_file = tmp_path / "token"
        self.token_file.write_text(token + "\n")
        k.token_file = str(self.token_file)
        for key, value in kubelet.items():
            setattr(k, key, value)
        self.self_metrics = SelfMetrics()
        self.context = Context(
            "k8sattributes", self.settings, CgroupIndex(str(tmp_path)), self.self_metrics, logging.getLogger("test")
        )
        processor = factory.create(self.context, K8sAttributesConfig(wait_for_sync=Duration(3)))
        assert isinstance(processor, K8sAttributesProcessor)
        self.processor = processor

    @property
    def discovery(self) -> KubeletDiscovery:
        assert isinstance(self.processor.discovery, KubeletDiscovery)
        return self.processor.discovery

    def labels(self, cgroup: CgroupRef) -> dict[str, str] | None:
        batch = self.processor.process(Batch([Point(CPU, cgroup, (), 1.0)]))
        if not batch.points:
            return None
        assert batch.points[0].resource is not None
        return dict(batch.points[0].resource.labels)

    def polls_after(self, count: int) -> Callable[[], bool]:
        start = self.discovery.polls + self.discovery.errors
        return lambda: self.discovery.polls + self.discovery.errors >= start + count


@pytest.fixture
def pods(kubelet: FakeKubelet) -> list[dict]:
    kubelet.pods = [make_pod("web-1", namespace="shop", labels={"app": "web"}), make_pod("db-1", namespace="shop")]
    return kubelet.pods


def test_lists_pods_with_token_and_ca(kubelet: FakeKubelet, certs: Certs, pods: list[dict], tmp_path: Path) -> None:
    h = Harness(tmp_path, kubelet.url, certs.ca)
    try:
        h.processor.start()
        assert h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) == {
            "namespace": "shop",
            "pod": "web-1",
            "container": "app",
            "node": NODE,
        }
        # Polling follows changes: a new pod appears, a removed one keeps its labels for
        # kpod.cgroup.gone_retention (its containers' final counts), then is dropped.
        h.processor.context.cgroups.gone_retention_s = 1.0
        new = make_pod("new-1", namespace="shop")
        kubelet.pods = [pods[1], new]
        assert poll_until(lambda: h.labels(cgroup_of(new, container_id("shop/new-1/app"))) is not None)
        assert (h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) or {}).get("pod") == "web-1"
        assert poll_until(lambda: h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) is None)
        before = h.self_metrics.get(UNRESOLVED_METRIC, (("reason", "unknown_pod"),))
        assert h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) is None
        assert h.self_metrics.get(UNRESOLVED_METRIC, (("reason", "unknown_pod"),)) == before + 1
    finally:
        h.processor.shutdown()


def check_error_keeps_pods(
    h: Harness, pods: list[dict], caplog: pytest.LogCaptureFixture, breaking: Callable[[], None], expected: str
) -> None:
    cgroup = cgroup_of(pods[0], container_id("shop/web-1/app"))
    h.processor.start()
    good = h.labels(cgroup)
    assert good is not None and good["pod"] == "web-1"
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        breaking()
        assert poll_until(h.polls_after(3))
    assert expected in h.processor.store.last_error  # type: ignore[union-attr]
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    # One clear line, logged once (not once per poll), naming the problem.
    assert len(errors) == 1 and expected in errors[0], errors
    assert h.labels(cgroup) == good


def test_wrong_token(kubelet: FakeKubelet, certs: Certs, pods: list[dict], tmp_path: Path, caplog) -> None:
    h = Harness(tmp_path, kubelet.url, certs.ca)
    try:
        check_error_keeps_pods(h, pods, caplog, lambda: h.token_file.write_text("stale"), "401 Unauthorized")
        assert "token" in h.processor.store.last_error  # type: ignore[union-attr]
    finally:
        h.processor.shutdown()


def test_wrong_ca(kubelet: FakeKubelet, certs: Certs, pods: list[dict], tmp_path: Path, caplog) -> None:
    h = Harness(tmp_path, kubelet.url, certs.ca)
    try:
        check_error_keeps_pods(
            h, pods, caplog, lambda: shutil.copy(certs.other_ca, h.ca_file), "TLS certificate not trusted"
        )
    finally:
        h.processor.shutdown()


def test_garbage_json(kubelet: FakeKubelet, certs: Certs, pods: list[dict], tmp_path: Path, caplog) -> None:
    h = Harness(tmp_path, kubelet.url, certs.ca)
    try:
        check_error_keeps_pods(h, pods, caplog, lambda: setattr(kubelet, "garbage", True), "response is not JSON")
        # And it recovers when the kubelet answers properly again.
        kubelet.garbage = False
        assert poll_until(lambda: h.processor.store.last_error == "")  # type: ignore[union-attr]
    finally:
        h.processor.shutdown()


def test_wrong_ca_from_the_start_is_not_synced(kubelet: FakeKubelet, certs: Certs, pods: list, tmp_path: Path) -> None:
    h = Harness(tmp_path, kubelet.url, certs.other_ca)
    h.processor.config.wait_for_sync = Duration(0.3)
    try:
        h.processor.start()
        assert h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) is None
        assert h.self_metrics.get(UNRESOLVED_METRIC, (("reason", "not_synced"),)) == 1
    finally:
        h.processor.shutdown()


def test_insecure_skip_verify_accepts_an_untrusted_certificate(
    kubelet: FakeKubelet, certs: Certs, pods: list[dict], tmp_path: Path
) -> None:
    h = Harness(tmp_path, kubelet.url, certs.other_ca, insecure_skip_verify=True)
    try:
        h.processor.start()
        assert h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) is not None
    finally:
        h.processor.shutdown()


def test_plain_http(pods: list[dict], tmp_path: Path) -> None:
    plain = FakeKubelet(token="").start()
    plain.pods = pods
    h = Harness(tmp_path, plain.url, "/nonexistent-ca")
    h.token_file.unlink()  # a local proxy needs no token
    try:
        h.processor.start()
        assert h.labels(cgroup_of(pods[0], container_id("shop/web-1/app"))) is not None
    finally:
        h.processor.shutdown()
        plain.stop()


def test_filters_apply_in_kubelet_mode(kubelet: FakeKubelet, certs: Certs, tmp_path: Path) -> None:
    system = make_pod("coredns-1", namespace="kube-system", labels={"app": "dns"})
    web = make_pod("web-1", namespace="shop", labels={"app": "web", "tier": "front"})
    batch_job = make_pod("job-1", namespace="shop", labels={"app": "batch"})
    kubelet.pods = [system, web, batch_job]
    settings = KpodSettings()  # exclude_namespaces defaults to kube-system, kube-public
    settings.filter.label_selector = "app in (web,dns),tier"
    h = Harness(tmp_path, kubelet.url, certs.ca, settings=settings)
    try:
        h.processor.start()
        assert h.labels(cgroup_of(web, container_id("shop/web-1/app"))) is not None
        assert h.labels(cgroup_of(system, container_id("kube-system/coredns-1/app"))) is None  # namespace
        assert h.labels(cgroup_of(batch_job, container_id("shop/job-1/app"))) is None  # selector
        assert h.self_metrics.get(UNRESOLVED_METRIC, (("reason", "filtered"),)) == 2
    finally:
        h.processor.shutdown()


def test_unexpanded_url_is_unavailable(tmp_path: Path, certs: Certs) -> None:
    h = Harness(tmp_path, "https://${env:NODE_IP}:10250/pods", certs.ca)
    with pytest.raises(ComponentUnavailable, match="environment variable"):
        h.processor.start()
    h.processor.shutdown()


def test_a_body_sent_in_small_pieces_without_a_length(
    kubelet: FakeKubelet, certs: Certs, pods: list[dict], tmp_path: Path
) -> None:
    """The body arrives as it is written (the decoder sees it in pieces, cut anywhere) and
    ends when the kubelet closes the connection."""
    body = json.dumps({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": pods}).encode()
    kubelet.stream = lambda: (body[i : i + 97] for i in range(0, len(body), 97))
    h = Harness(tmp_path, kubelet.url, certs.ca)
    try:
        h.processor.start()
        labels = h.labels(cgroup_of(pods[1], container_id("shop/db-1/app")))
        assert labels is not None and (labels["pod"], labels["namespace"]) == ("db-1", "shop")
    finally:
        h.processor.shutdown()


def endless_list(pods: list[dict]) -> Iterator[bytes]:
    """A PodList whose items never end (the same pods again and again)."""
    yield b'{"kind": "PodList", "items": ['
    item = json.dumps(pods[0]).encode()
    while True:
        yield item + b","


def endless_pod(pods: list[dict]) -> Iterator[bytes]:
    """A PodList whose first pod never ends (an annotation without an end)."""
    yield b'{"kind": "PodList", "items": [{"metadata": {"uid": "x", "annotations": {"a": "'
    while True:
        yield b"x" * 65536


@pytest.mark.parametrize(
    ("stream", "cap", "expected"),
    [
        (endless_list, ("discovery", "MAX_RESPONSE_BYTES", 1 << 20), ": response larger than 1 MiB"),
        (endless_pod, ("podlist", "MAX_VALUE_CHARS", 1 << 20), ": response has a value larger than 1 MiB"),
    ],
)
def test_an_endless_response_is_refused_and_the_pods_stay(
    kubelet: FakeKubelet,
    certs: Certs,
    pods: list[dict],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    stream: Callable[[list[dict]], Iterator[bytes]],
    cap: tuple[str, str, int],
    expected: str,
) -> None:
    """A kubelet (or whatever answers at its address) that never stops sending: the poll stops
    reading at the cap (lowered here to 1 MiB) with one line naming the URL, and the last good
    pods keep their labels."""
    module, name, value = cap
    monkeypatch.setattr(discovery if module == "discovery" else podlist, name, value)
    h = Harness(tmp_path, kubelet.url, certs.ca)
    try:
        check_error_keeps_pods(h, pods, caplog, lambda: setattr(kubelet, "stream", lambda: stream(pods)), expected)
        assert h.processor.store.last_error.startswith(kubelet.url)  # type: ignore[union-attr]
    finally:
        h.processor.shutdown()
