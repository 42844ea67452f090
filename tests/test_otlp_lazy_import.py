"""The OTLP modules (about 30 MB) are imported only when an OTLP exporter is configured."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import free_port

REPO = Path(__file__).resolve().parents[1]

# Runs the real agent for two cycles in a fresh interpreter, then reports what got imported.
PROBE = """
import json, sys
from kpod.cli import main
code = main(["run", "--config", sys.argv[1], "--cycles", "2", "--log-level", "warning"])
heavy = sorted(m for m in sys.modules if m.startswith(("opentelemetry.exporter", "opentelemetry.sdk", "grpc")))
print(json.dumps({"code": code, "heavy": heavy}))
"""


def run_agent(tmp_path: Path, exporters: str, pipeline: str) -> dict[str, object]:
    config = tmp_path / "config.yaml"
    config.write_text(
        "kpod: {profile: custom, poll_interval: 100ms, discovery: {mode: local}}\n"
        "receivers: {cgroup_cpu: {}}\n"
        f"exporters:\n{exporters}"
        f"service: {{pipelines: {{metrics: {{receivers: [cgroup_cpu], exporters: [{pipeline}]}}}}}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPOD_") and k != "KUBERNETES_SERVICE_HOST"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(config)], capture_output=True, text=True, timeout=60, env=env, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_prometheus_only_agent_never_imports_the_otlp_modules(tmp_path: Path) -> None:
    result = run_agent(tmp_path, f"  prometheus: {{endpoint: '127.0.0.1:{free_port()}'}}\n", "prometheus")
    assert result["code"] == 0
    assert result["heavy"] == []


def test_an_otlp_exporter_imports_them(tmp_path: Path) -> None:
    """The probe can see the modules when they are used (so the test above can fail)."""
    exporters = (
        f"  prometheus: {{endpoint: '127.0.0.1:{free_port()}'}}\n"
        f"  otlp: {{endpoint: '127.0.0.1:{free_port()}', tls: {{insecure: true}}}}\n"
    )
    result = run_agent(tmp_path, exporters, "prometheus, otlp")
    assert result["code"] == 0
    heavy = result["heavy"]
    assert isinstance(heavy, list)
    assert "grpc" in heavy
    # The requests are encoded directly (exporters/otlp/encoding.py): neither the SDK's data
    # classes nor the exporter package's encoder are ever loaded.
    assert not [m for m in heavy if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))], heavy
