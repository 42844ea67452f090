"""`kpod-metrics check` tests pod discovery, the likeliest first failure in a cluster.

Against tests/fake_apiserver.py served over HTTPS (a throwaway CA, tests/fake_kubelet.make_certs)
and tests/fake_kubelet.py: the right token and CA pass; a wrong token, a CA that did not sign the
server's certificate, and RBAC's 403 (list, or watch only) each give exit status 1 and exactly one
discovery line that says what failed and the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, make_pod
from fake_kubelet import Certs, FakeKubelet, make_certs
from helpers import require_tools, server_tls

from kpod.cli import main

NODE = "node-a"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require_tools("openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def api(certs: Certs) -> Iterator[FakeApiServer]:
    server = FakeApiServer(tls=server_tls(certs.cert, certs.key))
    server.add_pod(make_pod("web-1", node=NODE))
    with server:
        yield server


def run_check(tmp_path: Path, capsys: pytest.CaptureFixture[str], kpod: str,
              processors: str = "") -> tuple[int, list[str]]:  # fmt: skip
    """Exit status and the k8sattributes (discovery) lines of `kpod-metrics check` with this config."""
    config = tmp_path / "config.yaml"
    config.write_text(f"kpod:\n  profile: minimal\n  node_name: {NODE}\n  bpf: {{enabled: false}}\n{kpod}" + processors)
    capsys.readouterr()
    status = main(["check", "--config", str(config)])
    out = capsys.readouterr().out.splitlines()
    return status, [line for line in out if line.startswith("k8sattributes:")]


def informer(kubeconfig: str) -> tuple[str, str]:
    return "  discovery: {mode: informer}\n", f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}'}}\n"


def test_informer_passes_with_the_right_token_and_ca(api: FakeApiServer, certs: Certs, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    status, lines = run_check(tmp_path, capsys, *informer(api.write_kubeconfig(str(tmp_path / "kc"), certs.ca)))
    assert status == 0, lines
    (line,) = lines
    assert line.startswith("k8sattributes: informer: API server "), line  # as docs/TROUBLESHOOTING.md shows it
    assert "accepts the token" in line and "may list and watch the pods of node 'node-a'" in line, line
    # It really asked: a list with the node's field selector, then a watch.
    asked = [(path, q.get("fieldSelector"), q.get("watch")) for path, q in api.requests]
    assert asked == [("/api/v1/pods", f"spec.nodeName={NODE}", None), ("/api/v1/pods", f"spec.nodeName={NODE}", "true")]


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong token", ["refused the token (401 Unauthorized)", "fix: mount a valid service account token"]),
        ("wrong CA", ["certificate is not trusted by", "fix: the CA must be the cluster's"]),
        ("no list", ["may not list the pods of node 'node-a' (403 Forbidden)", "cannot list resource",
                     "fix: bind a ClusterRole"]),
        ("no watch", ["may not watch the pods of node 'node-a' (403 Forbidden)", "fix: bind a ClusterRole"]),
        ("down", ["cannot reach the API server", "fix: check KUBERNETES_SERVICE_HOST/PORT"]),
    ],
)  # fmt: skip
def test_informer_failure_is_one_line_with_the_fix(api: FakeApiServer, certs: Certs, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str], case: str,
                                                   expected: list[str]) -> None:  # fmt: skip
    ca = certs.other_ca if case == "wrong CA" else certs.ca
    kubeconfig = api.write_kubeconfig(str(tmp_path / "kc"), ca, token="stolen" if case == "wrong token" else None)
    api.forbidden_verbs = {"no list": {"list"}, "no watch": {"watch"}}.get(case, set())
    if case == "down":
        api.stop()
    status, lines = run_check(tmp_path, capsys, *informer(kubeconfig))
    assert status == 1
    (line,) = lines
    for text in expected:
        assert text in line, line


@pytest.fixture
def kubelet(certs: Certs) -> Iterator[FakeKubelet]:
    server = FakeKubelet(token="kubelet-token", certs=certs)
    server.pods = [make_pod("web-1", node=NODE), make_pod("web-2", node=NODE)]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def kubelet_config(kubelet: FakeKubelet, tmp_path: Path, ca: str, token: str = "kubelet-token") -> str:
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    return (
        f"  discovery:\n    mode: kubelet\n    kubelet: {{url: '{kubelet.url}', token_file: '{token_file}',"
        f" ca_file: '{ca}'}}\n"
    )


def test_kubelet_passes_with_tls_verified(kubelet: FakeKubelet, certs: Certs, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    status, lines = run_check(tmp_path, capsys, kubelet_config(kubelet, tmp_path, certs.ca))
    assert status == 0, lines
    (line,) = lines
    assert line.startswith("k8sattributes: kubelet: "), line
    assert "answers with 2 pods" in line and f"its certificate verifies against {certs.ca}" in line, line


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong token", ["HTTP 401", "fix: the kubelet must accept service account tokens"]),
        ("wrong CA", ["TLS certificate not trusted", "fix: kpod.discovery.kubelet.ca_file must be the CA"]),
        ("forbidden", ["HTTP 403", "fix: RBAC get on nodes/pods", "nodes/proxy"]),
    ],
)
def test_kubelet_failure_is_one_line_with_the_fix(kubelet: FakeKubelet, certs: Certs, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], case: str,
                                                  expected: list[str]) -> None:  # fmt: skip
    kubelet.forbidden = case == "forbidden"
    config = kubelet_config(kubelet, tmp_path, certs.other_ca if case == "wrong CA" else certs.ca,
                            "stolen" if case == "wrong token" else "kubelet-token")  # fmt: skip
    status, lines = run_check(tmp_path, capsys, config)
    assert status == 1
    (line,) = lines
    for text in expected:
        assert text in line, line


def test_kubelet_url_with_an_unset_variable_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """The default url is https://${env:NODE_IP}:10250/pods: without NODE_IP, check says so
    (instead of polling https://:10250/pods)."""
    monkeypatch.delenv("NODE_IP", raising=False)
    status, lines = run_check(tmp_path, capsys, "  discovery: {mode: kubelet}\n")
    assert status == 1
    (line,) = lines
    assert "'https://:10250/pods' (environment variable NODE_IP is not set)" in line, line
    assert "fix: set it" in line, line
