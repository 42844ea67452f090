"""The alerting and recording rules behave as intended: `promtool test rules` on synthetic series
named as the agent exports them (tests/promtool/kpod-metrics.rules.test.yaml), and the same tests
fail when a rule's threshold is changed (so they do test something)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from helpers import require_tools

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "helm" / "kpod-metrics" / "files" / "kpod-metrics.rules.yaml"
UNIT_TESTS = REPO / "tests" / "promtool" / "kpod-metrics.rules.test.yaml"

@pytest.fixture(autouse=True)
def _promtool() -> None:
    require_tools("promtool")


def _promtool_test(tests: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)


def test_rule_unit_tests_pass() -> None:
    result = _promtool_test(UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r}
    tested = {
        case["alertname"]
        for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert alerts - tested == set(), f"alerts never shown to fire: {sorted(alerts - tested)}"


@pytest.mark.parametrize(
    ("original", "changed"),
    [
        (
            "namespace_pod:kpod_net_tcp_retransmit_ratio:rate5m > 0.05",
            "namespace_pod:kpod_net_tcp_retransmit_ratio:rate5m > 0.5",
        ),
        (
            "namespace_pod:kpod_cpu_runqueue_latency_seconds:p99_5m > 0.05",
            "namespace_pod:kpod_cpu_runqueue_latency_seconds:p99_5m > 0.5",
        ),
        ("histogram_quantile(0.99, namespace_pod", "histogram_quantile(0.9, namespace_pod"),
        ("(increase(kpod_mem_oom_kills_total[10m])) > 0", "(increase(kpod_mem_oom_kills_total[10m])) > 1"),
        # A container born and killed between two of the agent's cycles first shows up at 1.
        ("unless kpod_mem_oom_kills_total offset 10m", "unless kpod_mem_oom_kills_total"),
        # One alert per filesystem, not per container that mounts it.
        ("max by (node, device, fstype) (", "max by (node, device, fstype, pod) ("),
        # A down target of another namespace in the same job is no agent.
        ("and on (job, namespace)", "and on (job)"),
    ],
)
def test_unit_tests_catch_a_changed_rule(tmp_path: Path, original: str, changed: str) -> None:
    text = RULES.read_text()
    assert original in text
    rules = tmp_path / "rules.yaml"
    rules.write_text(text.replace(original, changed))
    tests = yaml.safe_load(UNIT_TESTS.read_text())
    tests["rule_files"] = [str(rules)]
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    assert _promtool_test(path).returncode != 0
