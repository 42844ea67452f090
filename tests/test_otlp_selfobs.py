"""Self-observability with an OTLP exporter in the pipeline: exporter, discovery and process
self-metrics on /metrics, /readyz following discovery, /debug/status for bug reports."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fake_kubelet import FakeKubelet
from helpers import free_port, require_tools
from prometheus_client.parser import text_string_to_metric_families

from kpod.agent import build_cgroup_index
from kpod.agentmetrics import process_stats
from kpod.config import load_config
from kpod.pipeline import Pipeline
from kpod.status import AgentStatus

POD_COUNT = 3


def pod_json(index: int) -> dict[str, Any]:
    return {
        "metadata": {"uid": f"0a1b2c3d-0000-4000-8000-{index:012d}", "name": f"web-{index}", "namespace": "default"},
        "spec": {"nodeName": "node-s", "containers": [{"name": "app"}]},
        "status": {"phase": "Running"},
    }


def get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


class Runner:
    """Runs pipeline cycles every `interval` in a thread, like the agent's loop."""

    def __init__(self, pipeline: Pipeline, interval: float) -> None:
        self.pipeline = pipeline
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            self.pipeline.run_cycle()
            self.stop.wait(self.interval)

    def wait_until(self, predicate: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise AssertionError("condition not met in time")


@pytest.fixture
def agent(tmp_path: Path, clean_env: dict[str, str]) -> Any:
    kubelet = FakeKubelet(token="secret")
    kubelet.pods = [pod_json(i) for i in range(POD_COUNT)]
    kubelet.start()
    token = tmp_path / "token"
    token.write_text("secret")
    collector_port = free_port()  # nothing listens: the collector is down all along
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        "kpod:\n"
        "  profile: custom\n  poll_interval: 200ms\n  node_name: node-s\n"
        "  discovery:\n    mode: kubelet\n    failure_window: 1s\n"
        f"    kubelet: {{url: '{kubelet.url}', poll_interval: 100ms, token_file: '{token}'}}\n"
        "receivers: {cgroup_cpu: {}}\n"
        "processors: {k8sattributes: {wait_for_sync: 2s}}\n"
        "exporters:\n"
        "  prometheus: {endpoint: '127.0.0.1:0'}\n"
        f"  otlp/down: {{endpoint: '127.0.0.1:{collector_port}', tls: {{insecure: true}}, queue_size: 2,"
        " backoff_initial: 50ms, backoff_max: 100ms, timeout: 500ms}\n"
        "service: {pipelines: {metrics: {receivers: [cgroup_cpu], processors: [k8sattributes],"
        " exporters: [prometheus, otlp/down]}}}\n"
    )
    config = load_config(str(config_path), environ=clean_env)
    pipeline = Pipeline(config, build_cgroup_index(config))
    pipeline.start()
    runner = Runner(pipeline, 0.2)
    runner.thread.start()
    try:
        yield runner, kubelet
    finally:
        runner.stop.set()
        runner.thread.join(10)
        pipeline.shutdown()
        kubelet.stop()


def test_exporter_discovery_and_process_self_metrics(agent: Any, tmp_path: Path) -> None:
    runner, _ = agent
    pipeline: Pipeline = runner.pipeline
    address = pipeline.exporters[0].address  # type: ignore[attr-defined]
    down = (("exporter", "otlp/down"),)
    # The exposition shows the self-metrics as of the cycle before it was rendered.
    runner.wait_until(
        lambda: samples(get(address, "/metrics")[1].decode()).get(("kpod_exporter_dropped_points_total", down), 0) > 0
    )
    code, body = get(address, "/metrics")
    assert code == 200
    found = samples(body.decode())
    prom = (("exporter", "prometheus"),)
    assert found[("kpod_exporter_failed_requests_total", down)] >= 1
    assert found[("kpod_exporter_dropped_points_total", down)] >= 1
    assert found[("kpod_exporter_sent_points_total", down)] == 0
    assert 0 <= found[("kpod_exporter_queue_batches", down)] <= 2
    assert found[("kpod_exporter_sent_points_total", prom)] > 0
    assert found[("kpod_pods_discovered", ())] == POD_COUNT
    # Process metrics as client libraries name them, read from /proc/self.
    rss = found[("process_resident_memory_bytes", ())]
    with open("/proc/self/status") as handle:
        vm_rss = next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS:"))
    assert 0.7 * vm_rss <= rss <= 1.3 * vm_rss
    assert found[("process_cpu_seconds_total", ())] > 0
    assert abs(found[("process_open_fds", ())] - len(os.listdir("/proc/self/fd"))) < 50
    assert time.time() - 86400 < found[("process_start_time_seconds", ())] <= time.time()
    assert found[("process_max_fds", ())] > 0
    require_tools("promtool")
    exposition = tmp_path / "metrics.txt"
    exposition.write_bytes(body)
    with exposition.open("rb") as handle:
        lint = subprocess.run(["promtool", "check", "metrics"], stdin=handle, capture_output=True, timeout=30)
    problems = [ln for ln in lint.stderr.decode().splitlines() if "process_" in ln or "kpod_exporter" in ln]
    assert not problems, problems


def test_readyz_follows_discovery_healthz_does_not(agent: Any) -> None:
    runner, kubelet = agent
    pipeline: Pipeline = runner.pipeline
    address = pipeline.exporters[0].address  # type: ignore[attr-defined]
    runner.wait_until(lambda: get(address, "/readyz")[0] == 200)
    kubelet.token = "rotated"  # our token is now rejected: discovery fails, the last pods stay
    began = time.monotonic()
    runner.wait_until(lambda: get(address, "/readyz")[0] == 503)
    assert time.monotonic() - began >= 1.0  # not before the 1 s window
    code, body = get(address, "/readyz")
    answer = json.loads(body)
    assert code == 503 and answer["ready"] is False
    assert "discovery" in answer["reason"] and "401" in answer["reason"]
    assert get(address, "/healthz")[0] == 200  # liveness is not readiness
    kubelet.token = "secret"
    runner.wait_until(lambda: get(address, "/readyz")[0] == 200)


def test_debug_status_is_a_bug_report(agent: Any) -> None:
    runner, _ = agent
    pipeline: Pipeline = runner.pipeline
    address = pipeline.exporters[0].address  # type: ignore[attr-defined]
    runner.wait_until(lambda: pipeline.exporters[1].failed_requests > 0)  # type: ignore[attr-defined]
    code, body = get(address, "/debug/status")
    assert code == 200
    status = json.loads(body)
    assert status["version"] and status["profile"] == "custom"
    cgroup_cpu = status["receivers"]["cgroup_cpu"]
    assert cgroup_cpu["state"] == "running" and cgroup_cpu["route"]
    assert cgroup_cpu["last_collect_unix"] > time.time() - 60
    assert status["pods_known"] == POD_COUNT
    assert status["processors"]["k8sattributes"]["pods"] == POD_COUNT
    otlp = status["exporters"]["otlp/down"]
    assert otlp["queue_size"] == 2 and 0 <= otlp["queue_batches"] <= 2
    assert otlp["last_error"] and otlp["dropped_points"] >= 0
    assert status["exporters"]["prometheus"]["listening"] is True
    assert isinstance(status["bpf_maps"], list)
    assert status["discovery"]["ok"] is True and status["ready"] is True


def test_discovery_window_zero_never_unready() -> None:
    status = AgentStatus(poll_interval_s=10)
    status.cycle_done()
    status.discovery_failed("API server 500")
    assert status.ready() == (True, "ok")  # window 0: discovery does not count
    status.discovery_failure_window_s = 0.05
    time.sleep(0.1)
    ready, reason = status.ready()
    assert not ready and "API server 500" in reason
    status.discovery_recovered()
    assert status.ready() == (True, "ok")


def test_process_stats_of_another_process() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/comm").read_text().strip() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.01)  # still between fork and exec
        time.sleep(0.05)
        stats = process_stats(pid=str(child.pid))
        assert stats["process.open_fds"] >= 3
        assert stats["process.resident_memory.bytes"] > 0
        assert stats["process.start_time.seconds"] == pytest.approx(time.time(), abs=30)
    finally:
        child.kill()
        child.wait()


def test_process_open_fds_counts_every_descriptor() -> None:
    """process_open_fds of a process with exactly 3 + 300 descriptors (the stat of its fd
    directory since Linux 6.2, its listing before: either must count every one)."""
    extra = [os.open("/", os.O_PATH | os.O_CLOEXEC) for _ in range(300)]
    try:
        child = subprocess.Popen(["sleep", "30"], pass_fds=extra)
    finally:
        for fd in extra:
            os.close(fd)
    try:
        # Asleep: past the dynamic loader's and the locale's files, which it opens and closes.
        deadline = time.monotonic() + 5
        while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
            assert time.monotonic() < deadline, "sleep never slept"
            time.sleep(0.01)
        assert process_stats(pid=str(child.pid))["process.open_fds"] == 3 + 300
    finally:
        child.kill()
        child.wait()
