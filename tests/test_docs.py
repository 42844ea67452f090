"""docs/METRICS.md and docs/CONFIGURATION.md are generated from the code (`make docs`): they
must equal a fresh generation, cover every receiver, metric, self-metric and setting, and name
only Helm values the chart has."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import yaml
from agent_proc import agent_exposition
from helpers import receiver_classes
from kpod.exporters.prometheus.naming import prometheus_name

from kpod.config.overrides import env_var_name, leaf_paths
from kpod.settings import KpodSettings
from scripts import gen_docs

REPO = Path(__file__).resolve().parents[1]
VALUES = yaml.safe_load((REPO / "deploy" / "helm" / "kpod-metrics" / "values.yaml").read_text())


def _objects_built() -> bool:
    from kpod.kernel import ebpf

    return all(
        os.path.exists(ebpf.object_path(cls.object_name))  # type: ignore[attr-defined]
        for cls in receiver_classes()
        if getattr(cls, "program_specs", ())
    )


def test_generated_docs_are_current() -> None:
    assert _objects_built(), "BPF objects not built: `make setup` builds them (make bpf)"
    for path, text in gen_docs.outputs().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run `make docs`"


def test_every_receiver_and_metric_is_documented() -> None:
    text = (REPO / "docs" / "METRICS.md").read_text()
    for doc in gen_docs.receivers():
        assert f"## `{doc.type}`" in text
        if not getattr(doc.cls, "program_specs", ()):
            assert doc.type in gen_docs.FILE_SOURCES, f"say where receiver {doc.type} reads (FILE_SOURCES)"
        for metric in doc.cls.metrics:
            assert f"| `{metric.name}` | " in text
            assert prometheus_name(metric).removesuffix("_total") in text


def test_running_agents_self_metrics_are_documented(tmp_path: Path) -> None:
    text = (REPO / "docs" / "METRICS.md").read_text()
    receivers = {prometheus_name(m) for cls in receiver_classes() for m in cls.metrics}
    families = set()
    for line in agent_exposition(tmp_path).splitlines():
        match = re.match(r"# TYPE (\w+) ", line)
        if match and match.group(1).startswith("kpod_") and match.group(1) not in receivers:
            families.add(match.group(1))
    assert families, "the agent exposed no self-metrics"
    undocumented = sorted(f for f in families if f"`{f}`" not in text)
    assert not undocumented, f"self-metrics missing from docs/METRICS.md (scripts/gen_docs.py): {undocumented}"


def test_hooks_are_read_from_the_objects() -> None:
    from kpod.receivers.cpu_sched import CpuSchedReceiver

    assert _objects_built(), "BPF objects not built: `make setup` builds them (make bpf)"
    hooks = gen_docs.program_hooks(CpuSchedReceiver)
    assert hooks["kpod.cpu.context.switches"] == "`tp_btf/sched_switch`"
    assert "`tp_btf/sched_wakeup`" in hooks["kpod.cpu.runqueue.latency"]


def test_series_per_profile_grow_with_the_profile() -> None:
    text = (REPO / "docs" / "METRICS.md").read_text()
    rows = dict(re.findall(r"^\| (minimal|standard|comprehensive) \| (\d+) \|$", text, re.M))
    assert int(rows["minimal"]) < int(rows["standard"]) < int(rows["comprehensive"])


def test_every_setting_is_documented_with_its_variable() -> None:
    text = (REPO / "docs" / "CONFIGURATION.md").read_text()
    for path, _ in leaf_paths(KpodSettings):
        dotted = "kpod." + ".".join(path)
        row = next((line for line in text.splitlines() if line.startswith(f"| `{dotted}` |")), None)
        assert row, dotted
        assert f"`{env_var_name(path)}`" in row


def _value_at(path: str) -> Any:
    node: Any = VALUES
    for part in path.split("."):
        assert isinstance(node, dict) and part in node, f"values.yaml has no {path}"
        node = node[part]
    return node


def test_helm_values_named_in_the_docs_exist() -> None:
    named = []
    for text in gen_docs.HELM_VALUES.values():
        named += re.findall(r"`((?:config|otlp|metrics)\.[\w.]+)`", text)
    for component in gen_docs.HELM_COMPONENT_VALUES.values():
        for text in component.values():
            named += re.findall(r"`((?:config|otlp|metrics)\.[\w.]+)`", text)
    assert len(named) > 20
    for path in named:
        _value_at(path)


def test_every_chart_config_value_is_mapped() -> None:
    mapped = " ".join(gen_docs.HELM_VALUES.values())

    def leaves(node: Any, prefix: str) -> list[str]:
        if isinstance(node, dict) and node:
            return [leaf for k, v in node.items() for leaf in leaves(v, f"{prefix}.{k}")]
        return [prefix]

    unmapped = [
        leaf
        for leaf in leaves(VALUES["config"], "config")
        if leaf not in (*PASSED_THROUGH, "config.logLevel", "config.logFormat") and f"`{leaf}`" not in mapped
    ]
    assert not unmapped, unmapped
    # The sections passed through as they are: the reference says where they land.
    reference = gen_docs.configuration_markdown()
    for leaf in PASSED_THROUGH:
        assert f"`{leaf}" in reference, leaf


PASSED_THROUGH = ("config.receivers", "config.pipelineReceivers", "config.processors", "config.pipelineProcessors")


def test_example_comments_are_found() -> None:
    comments = gen_docs.example_comments()
    assert "kpod.profile" in comments and "minimal" in comments["kpod.profile"]
    assert "kpod.discovery.mode" in comments


def test_field_comments_come_from_the_source() -> None:
    @dataclasses.dataclass
    class Sample:
        # Why this exists.
        first: int = 1
        second: str = ""  # trailing note

    assert gen_docs.field_comments(Sample) == {"first": "Why this exists.", "second": "trailing note"}
