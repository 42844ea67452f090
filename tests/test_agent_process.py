"""The agent as a user runs it: `kpod-metrics run` in its own process, a plugin from YAML,
clean shutdown on SIGTERM, `check`."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from helpers import free_port, require_tools
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

REPO = Path(__file__).resolve().parents[1]


def wait_for(url: str, timeout_s: float = 15.0) -> bytes:
    deadline = time.monotonic() + timeout_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.read()
        except Exception as error:  # not up yet, or not ready (503)
            last_error = error
            time.sleep(0.1)
    raise AssertionError(f"{url} did not answer: {last_error}")


def agent_env(plugin_dir: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPOD_") and k != "KUBERNETES_SERVICE_HOST"}
    if plugin_dir is not None:
        env["PYTHONPATH"] = str(plugin_dir)
    return env


def start_agent(config: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kpod.cli", "run", "--config", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def stop(process: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, float, str]:
    began = time.monotonic()
    process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return process.returncode, time.monotonic() - began, stderr


def test_plugin_receiver_from_yaml_and_clean_sigterm(tmp_path: Path, test_plugin: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        "kpod: {profile: custom, poll_interval: 200ms, discovery: {mode: local}}\n"
        "receivers:\n  constant/answer: {value: 42}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        "service:\n  pipelines:\n    metrics:\n      receivers: [constant/answer]\n      exporters: [prometheus]\n"
    )
    process = start_agent(config, agent_env(test_plugin))
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz")
        body = wait_for(f"http://127.0.0.1:{port}/metrics").decode()
    finally:
        code, took, stderr = stop(process)
    assert 'test_constant_total{' in body and 'source="constant/answer"} 42' in body, body
    assert "kpod_build_info{" in body
    assert code == 0, stderr
    assert took < 5.0
    assert "Traceback" not in stderr
    # The listener is closed: the port can be bound again at once.
    with socket.socket() as again:
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_sigint_also_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        "kpod: {profile: custom, poll_interval: 1s, discovery: {mode: local}}\n"
        "receivers:\n  cgroup_cpu: {}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        "service:\n  pipelines:\n    metrics:\n      receivers: [cgroup_cpu]\n      exporters: [prometheus]\n"
    )
    process = start_agent(config, agent_env())
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz")
    finally:
        code, took, stderr = stop(process, signal.SIGINT)
    assert code == 0, stderr
    assert took < 5.0


def test_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = tmp_path / "config.yaml"
        config.write_text(
            "kpod: {profile: custom, discovery: {mode: local}}\nreceivers:\n  cgroup_cpu: {}\n"
            f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
            "service:\n  pipelines:\n    metrics:\n      receivers: [cgroup_cpu]\n      exporters: [prometheus]\n"
        )
        result = subprocess.run(
            [sys.executable, "-m", "kpod.cli", "run", "--config", str(config)],
            capture_output=True, text=True, timeout=30, env=agent_env(),
        )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


def test_check_reports_node_and_receivers(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        "kpod: {profile: custom, discovery: {mode: local}}\nreceivers:\n  cgroup_cpu: {}\n"
        "service:\n  pipelines:\n    metrics:\n      receivers: [cgroup_cpu]\n      exporters: [prometheus]\n"
        "exporters:\n  prometheus: {}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "kpod.cli", "check", "--config", str(config)],
        capture_output=True, text=True, timeout=30, env=agent_env(),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"kernel:       {os.uname().release}" in out
    assert "cgroups:" in out and "BTF:" in out and "capabilities:" in out and "tracefs:" in out
    # The route follows the cpu controller: cgroup2's cpu.stat, or the v1 cpuacct and cpu files.
    (line,) = [line for line in out.splitlines() if line.strip().startswith("cgroup_cpu ")]
    routes = ("ok: cpu.stat (cgroup2 cpu controller)", "ok: cpuacct.usage + cpu.stat (v1 cpuacct and cpu controllers)")
    assert line.split(None, 1)[1] in routes, line


def test_real_exposition_of_every_receiver_passes_promtool(tmp_path: Path) -> None:
    """The comprehensive profile on this host (eBPF receivers when root with BTF, cgroup
    receivers always): what a scraper really gets is lint-clean, in both formats."""
    require_tools("promtool")
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        "kpod: {profile: comprehensive, poll_interval: 300ms, discovery: {mode: local}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
    )
    process = start_agent(config, agent_env())
    try:
        wait_for(f"http://127.0.0.1:{port}/readyz")
        time.sleep(1.0)  # a few cycles with kernel data in the maps
        text = wait_for(f"http://127.0.0.1:{port}/metrics")
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            openmetrics = response.read().decode()
    finally:
        code, _, stderr = stop(process)
    assert code == 0, stderr
    assert b"kpod_cpu_usage_seconds_total" in text
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    families = list(openmetrics_families(openmetrics))
    assert any(f.name == "kpod_cpu_usage_seconds" for f in families)
