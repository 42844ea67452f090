"""The one naming rule from the model's dotted names to Prometheus names.

Dots become underscores; a metric whose unit is seconds ends in `_seconds`; a counter ends in
`_total` (never doubled).  So kpod.cpu.runqueue.latency (histogram, s) is
kpod_cpu_runqueue_latency_seconds_bucket/_sum/_count, and kpod.bpf.map.update.errors.total
(counter) is kpod_bpf_map_update_errors_total.  scripts/gen_docs.py names the metrics of
docs/METRICS.md with these functions.
"""

from __future__ import annotations

import re

from kpod.model import Kind, MetricDef

_INVALID_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_:]")
_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def family_name(metric: MetricDef) -> str:
    """The Prometheus name without the counter's `_total` (OpenMetrics' family name)."""
    name = _INVALID_NAME_CHARS.sub("_", metric.name.replace(".", "_"))
    if name.endswith("_total") and metric.kind is Kind.COUNTER:
        name = name[: -len("_total")]
    if metric.unit == "s" and not name.endswith("_seconds"):
        name += "_seconds"
    return name


def prometheus_name(metric: MetricDef) -> str:
    """The name of the metric's samples in the text format (counters end in _total)."""
    name = family_name(metric)
    return name + "_total" if metric.kind is Kind.COUNTER else name


def label_name(key: str) -> str:
    """A valid label name for an attribute key (k8s.pod.name -> k8s_pod_name)."""
    name = _INVALID_LABEL_CHARS.sub("_", key)
    return "_" + name if name[:1].isdigit() else name
