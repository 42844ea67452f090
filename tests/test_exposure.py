"""Exposure: the metrics listener's TLS and bearer token, secrets never logged, and no shell
command anywhere in the agent's code."""

from __future__ import annotations

import ast
import contextlib
import http.client
import json
import logging
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_proc import AgentProcess
from helpers import free_port

from kpod.cgroup.index import CgroupIndex
from kpod.component import Context
from kpod.config import ConfigError, load_config
from kpod.model import Batch, Kind, MetricDef, Point
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings
from kpod.status import AgentStatus

REPO = Path(__file__).resolve().parents[1]
TOKEN = "s3cr3t-token-d41d8cd98f00b204"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (openssl, argument list, no shell)."""
    directory = tmp_path_factory.mktemp("tls")
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def make_exporter(**config: object) -> object:
    from kpod.exporters.prometheus.config import PrometheusConfig, TlsSettings
    from kpod.exporters.prometheus.exporter import PrometheusExporter

    tls = config.pop("tls", None)
    context = Context(
        id="prometheus", settings=KpodSettings(), cgroups=CgroupIndex("/nonexistent"),
        self_metrics=SelfMetrics(), status=AgentStatus(poll_interval_s=1.0), logger=logging.getLogger("kpod"),
    )  # fmt: skip
    settings = PrometheusConfig(endpoint="127.0.0.1:0", tls=tls or TlsSettings(), **config)  # type: ignore[arg-type]
    settings.validate()
    exporter = PrometheusExporter(context, settings)
    exporter.start()
    exporter.export(Batch([Point(MetricDef("kpod.test.up", Kind.GAUGE, "1", "x"), None, (), 1.0)]))
    return exporter


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


@pytest.fixture
def protected(token_file: Path) -> Iterator[object]:
    exporter = make_exporter(bearer_token_file=str(token_file))
    yield exporter
    exporter.shutdown()  # type: ignore[attr-defined]


def get(exporter: object, path: str, headers: dict[str, str] | None = None,
        context: ssl.SSLContext | None = None) -> tuple[int, bytes]:  # fmt: skip
    host, port = exporter.address  # type: ignore[attr-defined]
    if context is not None:
        connection: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=10, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=10)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_bearer_token_protects_metrics_and_status_but_not_probes(protected: object) -> None:
    for path in ("/metrics", "/actuator/prometheus", "/debug/status"):
        assert get(protected, path)[0] == 401
        assert get(protected, path, {"Authorization": "Bearer wrong"})[0] == 401
        assert get(protected, path, {"Authorization": f"Basic {TOKEN}"})[0] == 401
        assert get(protected, path, {"Authorization": f"Bearer {TOKEN}x"})[0] == 401
        assert get(protected, path, {"Authorization": f"Bearer {TOKEN}"})[0] == 200, path
    assert b"kpod_test_up 1" in get(protected, "/metrics", {"Authorization": f"Bearer {TOKEN}"})[1]
    # The kubelet's probes carry no token: they get the agent's state, never a 401.
    assert get(protected, "/healthz") == (200, b"ok\n")
    status, body = get(protected, "/readyz")
    assert status == 503 and json.loads(body)["ready"] is False  # no collection cycle yet
    protected.context.status.cycle_done()  # type: ignore[attr-defined]
    status, body = get(protected, "/readyz")
    assert status == 200 and json.loads(body)["ready"] is True


def test_rotated_token_is_picked_up_without_a_restart(protected: object, token_file: Path) -> None:
    assert get(protected, "/metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 200
    replacement = token_file.with_name("token.new")
    replacement.write_text("rotated-token\n")
    replacement.replace(token_file)  # how a projected volume swaps the file: a new inode
    assert get(protected, "/metrics", {"Authorization": f"Bearer {TOKEN}"})[0] == 401
    assert get(protected, "/metrics", {"Authorization": "Bearer rotated-token"})[0] == 200


def test_tls_serves_https_and_survives_plain_http_clients(certificate: tuple[Path, Path]) -> None:
    from kpod.exporters.prometheus.config import TlsSettings

    cert, key = certificate
    exporter = make_exporter(tls=TlsSettings(cert_file=str(cert), key_file=str(key)))
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        status, body = get(exporter, "/metrics", context=trusting)
        assert status == 200 and b"kpod_test_up 1" in body
        # A plain-HTTP client gets no metrics...
        with pytest.raises((http.client.HTTPException, OSError)):
            get(exporter, "/metrics")
        # ...a client that connects and sends nothing does not block others...
        with socket.create_connection(exporter.address, timeout=5):  # type: ignore[attr-defined]
            assert get(exporter, "/healthz", context=trusting)[0] == 200
        # ...and a client that does not trust the certificate cannot be fooled into it.
        with pytest.raises(ssl.SSLError):
            get(exporter, "/metrics", context=ssl.create_default_context())
        assert get(exporter, "/metrics", context=trusting)[0] == 200
    finally:
        exporter.shutdown()  # type: ignore[attr-defined]


def test_tls_serves_a_node_exposition_as_rendered(certificate: tuple[Path, Path]) -> None:
    """A node's exposition is served in the parts it was rendered in (hundreds of them, more
    than one TLS send of 64 KiB takes): over TLS it arrives as the renderer made it, plain and
    gzipped, in either format."""
    import gzip

    from kpod.exporters.prometheus.config import TlsSettings
    from kpod.exporters.prometheus.exposition import Renderer

    from bench.synthetic import node_batch

    cert, key = certificate
    exporter = make_exporter(tls=TlsSettings(cert_file=str(cert), key_file=str(key)))
    try:
        batch = node_batch(pods=20)
        exporter.export(batch)  # type: ignore[attr-defined]
        text, openmetrics, _ = Renderer().render(batch)
        assert len(text) > 10 * 64 * 1024
        trusting = ssl.create_default_context(cafile=str(cert))
        om = {"Accept": "application/openmetrics-text;version=1.0.0"}
        assert get(exporter, "/metrics", context=trusting) == (200, text)
        assert get(exporter, "/metrics", om, context=trusting) == (200, openmetrics)
        status, zipped = get(exporter, "/metrics", {**om, "Accept-Encoding": "gzip"}, context=trusting)
        assert status == 200 and gzip.decompress(zipped) == openmetrics
    finally:
        exporter.shutdown()  # type: ignore[attr-defined]


def test_tls_with_token_together(certificate: tuple[Path, Path], token_file: Path) -> None:
    from kpod.exporters.prometheus.config import TlsSettings

    cert, key = certificate
    exporter = make_exporter(tls=TlsSettings(cert_file=str(cert), key_file=str(key)),
                             bearer_token_file=str(token_file))  # fmt: skip
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        assert get(exporter, "/metrics", context=trusting)[0] == 401
        assert get(exporter, "/metrics", {"Authorization": f"Bearer {TOKEN}"}, context=trusting)[0] == 200
    finally:
        exporter.shutdown()  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("prometheus", "expected"),
    [
        ("{tls: {cert_file: /x.pem}}", "tls: set both cert_file and key_file, or neither"),
        ("{tls: {key_file: /x.pem}}", "tls: set both cert_file and key_file, or neither"),
        ("{tls: {cert: /x.pem}}", "exporters.prometheus.tls.cert: unknown key"),
        ("{bearer_token_file: 5}", "exporters.prometheus.bearer_token_file: expected a string"),
    ],
)
def test_bad_exposure_config_is_one_line(tmp_path: Path, prometheus: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"exporters:\n  prometheus: {prometheus}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_unreadable_secrets_stop_the_agent_with_one_line(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, _ = certificate
    for prometheus, expected in (
        (f"{{tls: {{cert_file: '{cert}', key_file: '{tmp_path}/missing.pem'}}}}", "tls: cannot load"),
        (f"{{bearer_token_file: '{tmp_path}/missing-token'}}", "bearer_token_file"),
    ):
        port = free_port()
        config = (
            "kpod: {profile: custom, discovery: {mode: local}}\nreceivers:\n  cgroup_cpu: {}\n"
            f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}', "
            f"{prometheus[1:-1]}}}\n"
            "service:\n  pipelines:\n    metrics: {receivers: [cgroup_cpu], exporters: [prometheus]}\n"
        )
        agent = AgentProcess(config, tmp_path, port).start()
        assert agent.process is not None
        code = agent.process.wait(30)
        log = agent.log()
        assert code == 1, log
        assert expected in log and "Traceback" not in log, log


def test_tokens_and_headers_are_never_logged(tmp_path: Path, token_file: Path) -> None:
    """The agent at debug level, scraped with the right token, a wrong one and odd headers:
    neither token nor header value shows up in its log."""
    port = free_port()
    config = (
        "kpod: {profile: custom, poll_interval: 200ms, discovery: {mode: local}}\nreceivers:\n  cgroup_cpu: {}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}', bearer_token_file: '{token_file}'}}\n"
        "service:\n  pipelines:\n    metrics: {receivers: [cgroup_cpu], exporters: [prometheus]}\n"
    )
    agent = AgentProcess(config, tmp_path, port)
    agent.start()
    try:
        agent.wait_ready()
        wrong = "wrong-token-8f14e45fceea167a"
        for headers in ({"Authorization": f"Bearer {TOKEN}"}, {"Authorization": f"Bearer {wrong}"},
                        {"Cookie": "session=c00k1e-value"}, {}):  # fmt: skip
            with contextlib.suppress(Exception):  # the 401s
                agent.get("/metrics", headers=headers)
        # A malformed request line must not be echoed into the log either.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(f"GARBAGE /{TOKEN} HTTP/9\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            raw.recv(1024)
    finally:
        assert agent.stop() == 0
    log = agent.log()
    assert "bearer token required" in log  # the listener says it is protected...
    for secret in (TOKEN, wrong, "c00k1e-value"):
        assert secret not in log  # ...but never with what


# ------------------------------------------------------------------------------ no shell

AGENT_PACKAGES = ("kpod", "receivers", "processors", "exporters")
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "execlp"), ("os", "execv"),
               ("os", "execvp"), ("os", "execve"), ("os", "spawnl"), ("os", "spawnv"), ("os", "posix_spawn"),
               ("pty", "spawn"), ("commands", "getoutput"), ("subprocess", "getoutput"),
               ("subprocess", "getstatusoutput")}  # fmt: skip


def shell_uses(source: str, filename: str) -> list[str]:
    """Every place in `source` that runs a shell, or could: os.system & co., shell= anything but
    False, and a subprocess call whose command is not a literal list (a string, or a list built
    elsewhere, is where pod data or config values could become a command)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
            call = (func.value.id, func.attr)
            literal_argv = bool(node.args) and isinstance(node.args[0], ast.List | ast.Tuple)
            if call in SHELL_CALLS or (func.value.id == "subprocess" and not literal_argv):
                found.append(f"{filename}:{node.lineno}: {call[0]}.{call[1]}")
        for keyword in node.keywords:
            value = keyword.value
            if keyword.arg == "shell" and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{filename}:{node.lineno}: shell=")
    return found


def test_the_detector_finds_shell_commands() -> None:
    """The check below can fail: it finds each way of running a command."""
    source = (
        "import os, subprocess\nos.system('ls ' + pod)\nsubprocess.run(cmd, shell=True)\n"
        "subprocess.check_output(argv)\nos.popen(x)\nfoo(shell=flag)\nsubprocess.run(['ls', '-l'])\n"
    )
    # Six findings (shell=True counts twice: a string command and the flag); the literal
    # argument list on the last line is not one.
    assert len(shell_uses(source, "x.py")) == 6


def test_agent_code_runs_no_shell_and_no_program() -> None:
    """No command is built from pod data or config values: no shell, and no program run from
    anything but a literal argument list."""
    found: list[str] = []
    files = [path for package in AGENT_PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 20
    for path in files:
        found += shell_uses(path.read_text(), str(path.relative_to(REPO)))
        text = path.read_text()
        assert "import pty" not in text and "from pty" not in text, path
    assert not found, found
