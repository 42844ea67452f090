"""Every PromQL expression of the dashboard and the rules names only series the agent exports.

The exported names come from real expositions produced here:
  - every registered receiver's own metric definitions (`Receiver.metrics`), one point each
    with its attribute keys and the Kubernetes resource labels, rendered by the exporter's
    Renderer (histograms as real _bucket/_sum/_count series), and
  - a running agent's /metrics (`kpod-metrics run`, local discovery), for the self-metrics the
    pipeline adds (kpod_collection_*, kpod_series, kpod_build_info, ...).
Names with a colon must be recording rules of the rules file; `up` is Prometheus' own.  Label
names used in matchers and groupings must be labels of those series (or target labels), and
every expression must parse (promtool).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_proc import agent_exposition
from helpers import receiver_classes, require_tools
from kpod.exporters.prometheus.exposition import Renderer

from kpod.model import Batch, HistogramValue, Kind, Point, Resource
from scripts import gen_dashboard

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "deploy" / "grafana" / "kpod-metrics.json"
RULES = REPO / "deploy" / "helm" / "kpod-metrics" / "files" / "kpod-metrics.rules.yaml"
RESOURCE_LABELS = ("namespace", "pod", "container", "node")
# Series Prometheus makes itself, and labels it attaches to every scraped series.
PROMETHEUS_SERIES = {"up"}
TARGET_LABELS = {"job", "instance", "node", "namespace", "pod", "container", "service", "endpoint"}

KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
            "group_right", "inf", "nan", "atan2", "start", "end"}  # fmt: skip
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
MATCHERS = re.compile(r"\{([^}]*)\}")


# ----------------------------------------------------------------------------- PromQL scanning


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (functions, keywords, labels and numbers excluded)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = MATCHERS.sub("", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = GROUPING.sub("", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*", text):
        if text[match.end() :].lstrip().startswith("("):
            continue  # a function call (sum, rate, histogram_quantile, ...)
        if match.group(0) not in KEYWORDS:
            names.add(match.group(0))
    return names


def label_names(expr: str) -> set[str]:
    """Label names used in matchers and in by/without/on/ignoring/group_* clauses."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found = set()
    for match in MATCHERS.finditer(text):
        found.update(re.findall(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)", match.group(1)))
    for match in GROUPING.finditer(text):
        found.update(w.strip() for w in match.group(2).split(",") if w.strip())
    return found


def test_scanner_finds_names_and_labels() -> None:
    expr = (
        'topk(10, histogram_quantile(0.99, sum by (syscall, le) (rate(kpod_syscall_latency_seconds_bucket'
        '{node=~"$node", pod!="a b"}[$__rate_interval])))) / on (node) group_left ns:rec:rate5m offset 5m'
        " and bool up > 1e3"
    )  # fmt: skip
    assert metric_names(expr) == {"kpod_syscall_latency_seconds_bucket", "ns:rec:rate5m", "up"}
    assert label_names(expr) == {"syscall", "le", "node", "pod"}


# ----------------------------------------------------------------------------- expressions


def dashboard_expressions() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    return exprs


def dashboard_variable_queries() -> list[tuple[str, str]]:
    """(metric selector, label) of each label_values(...) variable."""
    board = json.loads(DASHBOARD.read_text())
    out = []
    for var in board["templating"]["list"]:
        if var["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert match, var["query"]
        out.append((match.group(1), match.group(2)))
    return out


def rule_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def recorded() -> dict[str, str]:
    return {r["record"]: r["expr"] for g in rule_groups() for r in g["rules"] if "record" in r}


def rule_expressions() -> list[str]:
    return [r["expr"] for g in rule_groups() for r in g["rules"]]


# ----------------------------------------------------------------------------- exported series


def definitions_exposition() -> str:
    """Every receiver's metric definitions as one point each, rendered like the exporter does."""
    resource = Resource(tuple((k, f"{k}-1") for k in RESOURCE_LABELS))
    batch = Batch()
    seen = set()
    for cls in receiver_classes():
        for metric in cls.metrics:
            if metric in seen:
                continue
            seen.add(metric)
            attrs = tuple(sorted((k, "x") for k in metric.attribute_keys))
            value: float | HistogramValue = (
                HistogramValue((0.001, 0.01), (1, 2, 3), 0.5) if metric.kind is Kind.HISTOGRAM else 1.0
            )
            batch.add(Point(metric, None, attrs, value, resource))
    text, _, _ = Renderer().render(batch)
    return text.decode()


def sample_names_and_labels(text: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition("{")
        if not rest:
            name = line.split(" ", 1)[0]
            labels: set[str] = set()
        else:
            labels = set(re.findall(r'(\w+)="', rest.rsplit("}", 1)[0]))
        out.setdefault(name, set()).update(labels)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    names = sample_names_and_labels(definitions_exposition())
    for name, labels in sample_names_and_labels(agent_exposition(tmp_path_factory.mktemp("agent"))).items():
        names.setdefault(name, set()).update(labels)
    return names


# ----------------------------------------------------------------------------- the checks


def test_exposition_sources_are_real(exported: dict[str, set[str]]) -> None:
    # Both sources contributed: receivers' families (histograms as buckets) and self-metrics.
    assert "kpod_cpu_runqueue_latency_seconds_bucket" in exported
    assert "le" in exported["kpod_cpu_runqueue_latency_seconds_bucket"]
    assert {"kpod_series", "kpod_build_info", "kpod_collection_errors_total"} <= set(exported)


def _check(expr: str, exported: dict[str, set[str]], rules: dict[str, str]) -> list[str]:
    problems = []
    known_labels = set(TARGET_LABELS) | {"le"}
    for name in metric_names(expr):
        if ":" in name:
            if name not in rules:
                problems.append(f"{name}: not a recording rule of {RULES.name}")
            continue
        if name in PROMETHEUS_SERIES:
            continue
        if name not in exported:
            problems.append(f"{name}: not exported by the agent")
            continue
        known_labels |= exported[name]
    for name in metric_names(expr):
        if ":" in name and name in rules:
            known_labels |= {lbl for n in metric_names(rules[name]) for lbl in exported.get(n, set())}
            known_labels |= label_names(rules[name])
    for label in label_names(expr) - known_labels:
        problems.append(f"label {label!r}: no selected series has it")
    return problems


def test_dashboard_names_only_exported_series(exported: dict[str, set[str]]) -> None:
    exprs = dashboard_expressions()
    assert len(exprs) >= 30
    problems = {e: p for e in exprs if (p := _check(e, exported, recorded()))}
    assert not problems, json.dumps(problems, indent=1)


def test_dashboard_variables_use_exported_labels(exported: dict[str, set[str]]) -> None:
    variables = dashboard_variable_queries()
    assert [label for _, label in variables] == ["node", "namespace", "pod"]
    for selector, label in variables:
        (name,) = metric_names(selector)
        assert name in exported and label in exported[name], (name, label)


def test_rules_name_only_exported_series(exported: dict[str, set[str]]) -> None:
    problems = {e: p for e in rule_expressions() if (p := _check(e, exported, recorded()))}
    assert not problems, json.dumps(problems, indent=1)


def test_histogram_quantiles_read_buckets(exported: dict[str, set[str]]) -> None:
    """histogram_quantile over raw series only ever reads _bucket series (pitfall 2 of the reference)."""
    for expr in dashboard_expressions() + rule_expressions():
        if "histogram_quantile" not in expr:
            continue
        raw = {n for n in metric_names(expr) if ":" not in n}
        assert all(n.endswith("_bucket") for n in raw), expr


def test_scanner_would_catch_a_wrong_name(exported: dict[str, set[str]]) -> None:
    """The check can fail: misspelled or unexported names and labels are reported."""
    assert _check("rate(kpod_net_tcp_bytes_sent[5m])", exported, recorded())  # missing _total
    assert _check("kpod_cpu_runqueue_latency_seconds_bucket", exported, recorded()) == []
    assert _check('sum by (iface) (rate(kpod_net_iface_rx_bytes_total{pod="a"}[5m]))', exported, recorded())
    assert _check("namespace_pod:nothing:rate5m", exported, recorded())


def test_rules_file_passes_promtool() -> None:
    require_tools("promtool")
    result = subprocess.run(["promtool", "check", "rules", str(RULES)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, is valid PromQL."""
    require_tools("promtool")
    rules = []
    for i, expr in enumerate(dashboard_expressions()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$__range", "1h")
        concrete = re.sub(r"\$\{?\w+\}?", ".*", concrete)
        rules.append({"record": f"dashboard:query_{i}:check", "expr": concrete})
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_the_generated_one() -> None:
    assert DASHBOARD.read_text() == gen_dashboard.render(), "run `make manifests`"


def test_dashboard_covers_the_issue() -> None:
    board = json.loads(DASHBOARD.read_text())
    text = " ".join(dashboard_expressions()).lower()
    for needle in (
        "kpod_cpu_runqueue_latency_seconds:p99", "kpod_cpu_runqueue_latency_seconds:p50",
        "kpod_cpu_context_switches_total", "kpod_net_tcp_bytes_sent_total", "kpod_net_tcp_retransmits_total",
        "kpod_net_tcp_rtt_seconds_bucket", "kpod_mem_oom_kills_total", "kpod_mem_major_page_faults_total",
        "kpod_syscall_latency_seconds_bucket", "kpod_disk_read_bytes_total", "kpod_net_iface_rx_bytes_total",
        "kpod_fs_fill_ratio", "kpod_collection_errors_total",
    ):  # fmt: skip
        assert needle in text, needle
    # Every panel's datasource is the variable, and panel ids are unique.
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "node", "namespace", "pod"}


def test_rule_unit_tests_use_exported_series(exported: dict[str, set[str]]) -> None:
    """The promtool unit tests of the rules feed series named and labelled like the agent's."""
    tests = yaml.safe_load((REPO / "tests" / "promtool" / "kpod-metrics.rules.test.yaml").read_text())
    for test in tests["tests"]:
        for item in test["input_series"]:
            name, _, labels = item["series"].partition("{")
            if name in PROMETHEUS_SERIES:
                continue
            assert name in exported, name
            used = set(re.findall(r"(\w+)=", labels))
            assert used <= exported[name] | TARGET_LABELS, (name, used - exported[name])
            # And every label of the agent's own (device and fstype of a filesystem, map, ...):
            # a rule that folds by them must be tested with them.
            own = exported[name] - TARGET_LABELS
            assert own <= used, (name, own - used)
