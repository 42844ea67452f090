"""Generate docs/METRICS.md and docs/CONFIGURATION.md from the code (`make docs`).

METRICS.md comes from each registered receiver's own metric definitions (`Receiver.metrics`),
the eBPF receivers' program specs (the hook of each program is read from the compiled object's
section, through libbpf), the profiles table (kpod.profiles) and the pipeline's self-metrics.
CONFIGURATION.md comes from the settings dataclasses (kpod.settings, every component's config
class), their defaults, the KPOD_* names kpod.config derives, the comments of
config.example.yaml, and the chart's values.  tests/test_docs.py fails when either is stale.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import json
import re
import sys
import typing
from pathlib import Path
from typing import Any

import yaml
from kpod.exporters.prometheus.naming import family_name, prometheus_name

from kpod import pipeline, profiles, scheduler
from kpod.component import Receiver
from kpod.config.overrides import env_var_name, leaf_paths
from kpod.kernel import syscalls
from kpod.model import Kind, MetricDef
from kpod.settings import KpodSettings
from kpod.units import Duration

REPO = Path(__file__).resolve().parents[1]

METRICS_MD = REPO / "docs" / "METRICS.md"
CONFIGURATION_MD = REPO / "docs" / "CONFIGURATION.md"
VALUES = REPO / "deploy" / "helm" / "kpod-metrics" / "values.yaml"
EXAMPLE = REPO / "config.example.yaml"
RESOURCE_LABELS = ("namespace", "pod", "container", "node")

# Where the cgroup-file receivers read (eBPF receivers' hooks are read from their objects).
# A new receiver without an entry here fails tests/test_docs.py: say where its data comes from.
FILE_SOURCES = {
    "cgroup_cpu": "cgroup2 `cpu.stat` (`usage_usec`, `nr_periods`, `nr_throttled`, `throttled_usec`) where the cpu "
    "controller is on cgroup2; else (hybrid and v1 nodes) v1 `cpuacct.usage` and the cpu controller's `cpu.stat` "
    "(`nr_periods`, `nr_throttled`, `throttled_time`)",
    "cgroup_memory": "cgroup2 `memory.current` and `memory.stat` (`inactive_file`); v1 `memory.usage_in_bytes`",
    "disk": "cgroup2 `io.stat` (`rbytes`, `wbytes`, `rios`, `wios`); v1 `blkio.throttle.io_service*`",
    "net_iface": "`<proc_root>/<pid>/net/dev` of one process per pod network namespace",
    "filesystem": "`statvfs` of the mounts in `<proc_root>/<pid>/mountinfo`, each looked up inside "
    "`<proc_root>/<pid>/root` (no symlink followed, the mount checked) by a worker process under a deadline",
    "pressure": "cgroup2 `cpu.pressure`, `memory.pressure`, `io.pressure` (`total=`)",
    "bpf_maps": "BPF map iteration (`bpf(BPF_MAP_GET_NEXT_KEY)`) and the objects' `*_errors` maps",
}

# Series per label set for one pod, under the assumptions stated in METRICS.md.
ATTRIBUTE_VALUES = {"syscall": None, "direction": 2, "kind": 2, "device": 1, "interface": 1, "mountpoint": 1}
# Emitted once per pod (on the pod cgroup), not per container.
PER_POD_RECEIVERS = {"net_iface"}
# Not about pods at all: one series per BPF map or program of the node.
PER_NODE_RECEIVERS = {"bpf_maps"}
PER_NODE_METRICS = {"kpod.bpf.program.run.seconds", "kpod.bpf.program.runs"}


# ----------------------------------------------------------------------------- receivers


@dataclasses.dataclass
class ReceiverDoc:
    type: str
    cls: type[Receiver]
    description: str
    requires_bpf: bool


def receivers() -> list[ReceiverDoc]:
    """Every registered receiver plugin, in entry-point order."""
    found = []
    for entry in sorted(importlib.metadata.entry_points(group="kpod.receivers"), key=lambda e: e.name):
        factory = entry.load()
        module = sys.modules[factory.create.__module__]
        classes = [
            c for c in vars(module).values()
            if inspect.isclass(c) and issubclass(c, Receiver) and c.__module__ == module.__name__ and c.metrics
        ]  # fmt: skip
        if not classes:
            raise SystemExit(f"gen_docs: receiver {entry.name} has no Receiver class with `metrics`")
        found.append(ReceiverDoc(factory.type, classes[0], factory.description, factory.requires_bpf))
    return found


def program_hooks(cls: type[Receiver]) -> dict[str, str]:
    """metric name -> the hooks feeding it: alternatives (programs with the same feeds, first
    available wins) joined by "or", hooks that work together (entry and exit) by "+"."""
    specs = getattr(cls, "program_specs", ())
    if not specs:
        return {}
    from kpod.kernel import ebpf, libbpf

    path = ebpf.object_path(cls.object_name)  # type: ignore[attr-defined]
    try:
        with libbpf.BpfObject.open(path) as obj:
            sections = {name: program.section for name, program in obj.programs.items()}
    except (OSError, libbpf.LibbpfError) as error:
        raise SystemExit(f"gen_docs: cannot read {path} ({error}): run `make bpf` first") from None
    groups: dict[tuple[str, ...], list[str]] = {}
    for spec in specs:
        hook = "perf_event " + _perf_name(spec.perf_event) if spec.perf_event else sections.get(spec.program, "?")
        group = groups.setdefault(spec.feeds, [])
        if hook not in group:
            group.append(hook)
    out: dict[str, str] = {}
    for metric in cls.metrics:
        parts = []
        for feeds, hooks in groups.items():
            # A feed names a metric, "<metric> (<what>)", or a family "<prefix>.* (<what>)".
            names = [f.split(" ", 1)[0] for f in feeds]
            if any(n == metric.name or (n.endswith(".*") and metric.name.startswith(n[:-1])) for n in names):
                parts.append(" or ".join(f"`{h}`" for h in hooks))
        if parts:
            out[metric.name] = " + ".join(parts)
    return out


def _perf_name(event: tuple[int, int]) -> str:
    from kpod.kernel import libbpf

    names = {getattr(libbpf, n): n for n in dir(libbpf) if n.startswith("PERF_COUNT_SW_")}
    return (
        names.get(event[1], f"type={event[0]} config={event[1]}")
        if event[0] == libbpf.PERF_TYPE_SOFTWARE
        else str(event)
    )


def histogram_buckets() -> int:
    """Buckets of the kernel's histograms (KPOD_HIST_SLOTS in bpf/kpod.bpf.h), +Inf included."""
    match = re.search(r"KPOD_HIST_SLOTS\s*=\s*(\d+)", (REPO / "bpf" / "kpod.bpf.h").read_text())
    if not match:
        raise SystemExit("gen_docs: KPOD_HIST_SLOTS not found in bpf/kpod.bpf.h")
    return int(match.group(1))


def series_per_label_set(metric: MetricDef, tracked_syscalls: int) -> int:
    per = histogram_buckets() + 2 if metric.kind is Kind.HISTOGRAM else 1  # buckets, _sum, _count
    for key in metric.attribute_keys:
        count = ATTRIBUTE_VALUES.get(key, 1)
        per *= tracked_syscalls if count is None else count
    return per


def profile_metrics(profile: str, docs: list[ReceiverDoc]) -> list[tuple[ReceiverDoc, MetricDef]]:
    """The metrics a profile emits (the memory receiver's overrides switch major faults off)."""
    by_type = {d.type: d for d in docs}
    out = []
    for type_name, overrides in profiles.profile_receivers(profile):
        doc = by_type.get(type_name)
        if doc is None:
            continue
        for metric in doc.cls.metrics:
            if type_name == "memory" and overrides.get("major_faults") is False and "major" in metric.name:
                continue
            out.append((doc, metric))
    return out


def self_metrics() -> list[tuple[str, str, str, str, tuple[str, ...]]]:
    """(prometheus name, type, unit, description, labels) of the pipeline's own metrics."""
    from kpod.exporters.prometheus import exporter as prometheus
    from kpod.processors.k8sattributes import processor as k8sattributes
    from kpod.receivers import filesystem

    from kpod import selfmetrics
    from kpod.cgroup import files

    exporter = ("exporter",)
    defs = [
        (scheduler.COLLECTION_ERRORS, Kind.COUNTER, "1", scheduler.COLLECTION_ERRORS_HELP, ("receiver",)),
        *[(m.name, m.kind, m.unit, m.description, m.attribute_keys)
          for m in (scheduler.COLLECTION_DURATION, pipeline.SERIES, pipeline.BUILD_INFO, pipeline.CYCLES,
                    pipeline.LAST_CYCLE, pipeline.PROCESSOR_ERRORS, pipeline.CGROUPS_UNREADABLE,
                    pipeline.CGROUP_LONG_PATHS)],
        (pipeline.PARSER_SKIPPED, Kind.COUNTER, "1", pipeline.PARSER_SKIPPED_HELP, ("parser",)),
        (k8sattributes.UNRESOLVED_METRIC, Kind.COUNTER, "1", k8sattributes.UNRESOLVED_HELP, ("reason",)),
        (k8sattributes.PODS_METRIC, Kind.GAUGE, "1", k8sattributes.PODS_HELP, ()),
        (selfmetrics.EXPORTER_SENT_POINTS, Kind.COUNTER, "1", selfmetrics.EXPORTER_SENT_POINTS_HELP, exporter),
        (selfmetrics.EXPORTER_FAILED_REQUESTS, Kind.COUNTER, "1", selfmetrics.EXPORTER_FAILED_REQUESTS_HELP, exporter),
        (selfmetrics.EXPORTER_DROPPED_POINTS, Kind.COUNTER, "1", selfmetrics.EXPORTER_DROPPED_POINTS_HELP, exporter),
        (selfmetrics.EXPORTER_QUEUE_BATCHES, Kind.GAUGE, "1", selfmetrics.EXPORTER_QUEUE_BATCHES_HELP, exporter),
        (prometheus.HTTP_REFUSED, Kind.COUNTER, "1", prometheus.HTTP_REFUSED_HELP, (*exporter, "reason")),
        (files.VANISHED_READS, Kind.COUNTER, "1", files.VANISHED_READS_HELP, ("receiver",)),
        (files.SERIES_DROPPED, Kind.COUNTER, "1", files.SERIES_DROPPED_HELP, ("receiver", "reason")),
        (filesystem.STUCK_MOUNTS, Kind.GAUGE, "1", filesystem.STUCK_MOUNTS_HELP, ("receiver",)),
        (filesystem.PROBE_TIMEOUTS, Kind.COUNTER, "1", filesystem.PROBE_TIMEOUTS_HELP, ("receiver",)),
    ]  # fmt: skip
    try:  # the agent's process and BPF program self-metrics, where that module exists
        from kpod import agentmetrics
    except ImportError:
        agentmetrics = None  # type: ignore[assignment]
    if agentmetrics is not None:
        defs.append((agentmetrics.BPF_LOADED, Kind.GAUGE, "1", "BPF programs attached by this process.", ()))
        defs.append((agentmetrics.BPF_FAILED, Kind.GAUGE, "1", agentmetrics.BPF_FAILED_HELP, ("program",)))
        for name, (help_text, unit) in getattr(agentmetrics, "_PROCESS_HELP", {}).items():
            kind = Kind.COUNTER if name == agentmetrics.CPU else Kind.GAUGE
            defs.append((name, kind, unit, help_text, ()))
    out = []
    for name, kind, unit, description, keys in defs:
        metric = MetricDef(name, kind, unit, description, keys)
        out.append((prometheus_name(metric), kind.value, unit, description, keys))
    return out


def _prom_names(metric: MetricDef) -> str:
    if metric.kind is Kind.HISTOGRAM:
        family = family_name(metric)
        return f"`{family}_bucket` `_sum` `_count`"
    return f"`{prometheus_name(metric)}`"


def metrics_markdown() -> str:
    docs = receivers()
    # Empty setting = the architecture's default set; x86_64's and arm64's are the same size.
    tracked = len(KpodSettings().syscall.tracked_syscalls or syscalls.default_tracked("x86_64"))
    profile_names = [p for p in profiles.PROFILES if p != "custom"]
    in_profiles: dict[MetricDef, list[str]] = {}
    for profile in profile_names:
        for _, metric in profile_metrics(profile, docs):
            in_profiles.setdefault(metric, [])
            if profile not in in_profiles[metric]:
                in_profiles[metric].append(profile)

    lines = [
        "# Metrics",
        "",
        "<!-- Generated by `make docs` (scripts/gen_docs.py) from the receivers' metric definitions. Do not edit. -->",
        "",
        "Every per-pod series carries `namespace`, `pod`, `container` and `node` (added by the k8sattributes",
        "processor from the point's cgroup), plus the metric's own labels listed below.  Names: the spec's dotted",
        "name in OTLP; in Prometheus dots become underscores, counters end in `_total`, seconds in `_seconds`,",
        "histograms are real `_bucket`/`_sum`/`_count` series whose buckets the kernel counts at powers of two",
        "seconds (`le` from 2^-20 s, 0.95 us, to 32 s, then `+Inf`).  Values are the kernel's cumulative",
        "counters as read, never re-added per cycle.",
        "",
        "When containers die, restart or live briefly (docs/LIFECYCLE.md): a container whose cgroup is removed keeps",
        "its series, with its final values and its labels, for `kpod.cgroup.gone_retention` (default 2 m), then they",
        "leave `/metrics`; a container that lived between two cycles appears with its counts at the next one; a",
        "restarted container (same pod and name, new cgroup) continues its counters from the old instance's final",
        "values, so they never decrease within the agent's run (an agent restart starts them at 0: a counter reset).",
        "`kpod_mem_oom_kills_total` exists at 0 for every container the agent knows.",
        "",
    ]
    for doc in docs:
        hooks = program_hooks(doc.cls)
        lines += [f"## `{doc.type}`", "", doc.description.rstrip(".") + ".", ""]
        if not hooks:
            lines += [f"Source: {FILE_SOURCES.get(doc.type, '(undocumented)')}.", ""]
        lines += [
            "| metric | Prometheus | type | unit | labels | source | profiles |",
            "|---|---|---|---|---|---|---|",
        ]
        for metric in doc.cls.metrics:
            if metric.name in PER_NODE_METRICS:
                source = "bpf_stats of each loaded program (`kernel.bpf_stats_enabled=1`)"
            elif hooks:
                source = hooks.get(metric.name, "(no hook)")
            else:
                source = "see above"
            labels = ", ".join(f"`{k}`" for k in metric.attribute_keys) or "-"
            where = in_profiles.get(metric, [])
            lines.append(
                f"| `{metric.name}` | {_prom_names(metric)} | {metric.kind.value} | {metric.unit} | {labels} | "
                f"{source} | {', '.join(where) or 'custom only'} |"
            )
        lines.append("")

    lines += [
        "## Agent self-metrics",
        "",
        "No pod labels (the scrape adds the agent's own target labels; the chart's ServiceMonitor adds `node`).",
        "",
        "| Prometheus | type | unit | labels | description |",
        "|---|---|---|---|---|",
    ]
    for name, kind, unit, description, keys in self_metrics():
        labels = ", ".join(f"`{k}`" for k in keys) or "-"
        lines.append(f"| `{name}` | {kind} | {unit} | {labels} | {description} |")
    lines.append("")

    buckets = histogram_buckets()
    lines += [
        "## Histograms: classic and native",
        "",
        "The kernel counts each latency into the bucket of its power of two of seconds (`bpf/kpod.bpf.h`):",
        "a zero bucket up to 2^-20 s (0.95 us), then (2^(i-1), 2^i] s for i = -19 .. 5, then everything",
        f"above 32 s: {buckets} buckets.  These are exactly the buckets of a Prometheus native histogram of",
        "schema 0 and of an OpenTelemetry exponential histogram of scale 0, so each histogram is exported as:",
        "",
        "- classic buckets (`_bucket{le}` per bound, `+Inf`, `_sum`, `_count`: 29 series) in the text and",
        "  OpenMetrics expositions, always, and in the protobuf exposition unless `histograms: native`;",
        "- a native histogram (one series: schema 0, zero bucket with threshold 2^-20 s, spans and deltas) in",
        "  the protobuf exposition (`application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily;",
        "  encoding=delimited`), unless `histograms: classic`.  Prometheus asks for it when native histograms",
        "  are on: 2.40 to 3.7 with `--enable-feature=native-histograms`, 3.8 and later with",
        "  `scrape_native_histograms: true` (global or per scrape config).  With both kinds in the exposition",
        "  Prometheus keeps the native one, and the classic one too with `scrape_classic_histograms: true`",
        "  (2.45 to 2.x) or `always_scrape_classic_histograms: true` (3.x).",
        "",
        "The prometheus exporter's `histograms` setting: `both` (default: every Prometheus gets what it can",
        "read), `native` (protobuf without classic buckets: smaller), `classic` (no protobuf exposition at all:",
        "every scraper gets text or OpenMetrics, as before native histograms).  The OTLP exporter's",
        "`histograms` setting picks explicit-bucket (default) or exponential histograms (docs/otlp.md).",
        "",
        "Exactness: every bucket boundary is exact in both forms, the counts and the sum are the kernel's.  The",
        "one difference is above the last bound: the classic `+Inf` bucket says \"above 32 s\", while a native",
        "histogram has no such bucket and counts those values in (32 s, 64 s]; a quantile that lands there",
        "reads at most 64 s natively and 32 s classically (Prometheus returns the last finite bound), whatever",
        "the real values were.  Only blocking system calls (`epoll_wait`, `futex`, reads of idle sockets) wait",
        "that long; run-queue latency and RTT do not.",
        "",
        "## Series per pod, per profile",
        "",
        "Assumptions: one application container, one block device, one interface besides `lo` (excluded),",
        f"one filesystem per container, both `direction`s and both PSI `kind`s, the {tracked} default tracked",
        f"syscalls, histograms of {buckets} buckets (+ `_sum` and `_count`).  The pod's sandbox (pause) cgroup",
        "adds the cgroup-file series of one more container; eBPF series exist only for cgroups that had the",
        "event.  Per-node series (BPF maps and programs, self-metrics) are not counted.",
        "",
        "| profile | per container | per pod (once) | total per pod |",
        "|---|---|---|---|",
    ]
    for profile in profile_names:
        per_container = per_pod = 0
        for doc, metric in profile_metrics(profile, docs):
            if doc.type in PER_NODE_RECEIVERS or metric.name in PER_NODE_METRICS:
                continue
            count = series_per_label_set(metric, tracked)
            if doc.type in PER_POD_RECEIVERS:
                per_pod += count
            else:
                per_container += count
        lines.append(f"| {profile} | {per_container} | {per_pod} | {per_container + per_pod} |")
    native: dict[str, int] = {}
    for profile in profile_names:
        total = 0
        for doc, metric in profile_metrics(profile, docs):
            if doc.type in PER_NODE_RECEIVERS or metric.name in PER_NODE_METRICS:
                continue
            count = series_per_label_set(metric, tracked)
            if metric.kind is Kind.HISTOGRAM:
                count //= buckets + 2
            total += count
        native[profile] = total
    lines += [
        "",
        "Most of it is histogram buckets.  With native histograms (the protobuf exposition, above) a",
        "histogram is one series, and the same profiles come to the following, comparable with the",
        "reference implementation's ~20 / 39 / 69:",
        "",
        "| profile | series per pod, native histograms |",
        "|---|---|",
        *(f"| {profile} | {total} |" for profile, total in native.items()),
        "",
        *measured_series_table(),
    ]
    return "\n".join(lines)


def measured_series_table() -> list[str]:
    """Series per pod measured from real expositions (bench/series.py's kept figures)."""
    kept = REPO / "docs" / "perf" / "data" / "series.json"
    header = ["### Measured: a real exposition at 110 pods", ""]
    if not kept.exists():
        return [*header, "Not measured yet: `python -m bench series` as root.", ""]
    record = json.loads(kept.read_text())
    data, run = record["data"], record["run"]
    pods = data["pods"]
    lines = [
        *header,
        f"Run `{run['id']}` ([perf/series.md](perf/series.md), `bench/series.py`): {pods} pods with "
        f"{data['containers']} containers (alternately 2 and 1 per pod), each container doing a TCP round trip",
        "and a wait every second, one agent per profile; the series carrying one of those pods' labels in a",
        "text scrape (classic histograms) and in a protobuf scrape (native histograms), divided by the pods.",
        "eBPF series exist only for what the containers did (no `accept4`, `epoll_wait`, `futex`... here).",
        "",
        "| profile | spec's estimate | classic | native | histograms per pod |",
        "|---|---|---|---|---|",
    ]
    for profile, counts in data["profiles"].items():
        lines.append(
            f"| {profile} | ~{data['spec'][profile]} | {counts['classic'] / pods:.1f} | {counts['native'] / pods:.1f} "
            f"| {counts['histograms'] / pods:.1f} |"
        )
    lines.append("")
    return lines


# ----------------------------------------------------------------------------- configuration

# kpod.* key -> (Helm value that sets it, note).  A key missing here has no chart value:
# set it with extraEnv (its KPOD_* variable).
HELM_VALUES: dict[str, str] = {
    "profile": "`config.profile`",
    "poll_interval": "`config.pollInterval` (milliseconds)",
    "node_name": "set to `${env:NODE_NAME}` (downward API `spec.nodeName`)",
    "discovery.mode": "`config.discovery.mode`",
    "discovery.kubelet.url": "set to `https://${env:NODE_IP}:10250/pods` (downward API `status.hostIP`)",
    "discovery.kubelet.poll_interval": "`config.discovery.kubeletPollInterval` (seconds)",
    "discovery.kubelet.insecure_skip_verify": "`config.discovery.kubeletInsecureSkipVerify`",
    "cgroup.root": "`config.cgroup.root` (also the mount path of the host's /sys/fs/cgroup)",
    "cgroup.proc_root": "`config.cgroup.procRoot` (also the mount path of the host's /proc)",
    "filter.namespaces": "`config.filter.namespaces`",
    "filter.exclude_namespaces": "`config.filter.excludeNamespaces`",
    "filter.label_selector": "`config.filter.labelSelector`",
    "filter.include_labels": "`config.filter.includeLabels`",
    "bpf.enabled": "`config.bpf.enabled`",
    "bpf.map_max_entries": "`config.bpf.mapMaxEntries`",
    "syscall.tracked_syscalls": "`config.syscall.trackedSyscalls`",
}
# Component settings the chart sets (component id -> {key: Helm value}); others go through
# `config.receivers` (receivers) or are not exposed.
HELM_COMPONENT_VALUES: dict[str, dict[str, str]] = {
    "prometheus": {
        "endpoint": "`0.0.0.0:` + `metrics.port`",
        "tls.cert_file": "`metrics.tlsSecretName` (tls.crt)", "tls.key_file": "`metrics.tlsSecretName` (tls.key)",
        "bearer_token_file": "`metrics.bearerTokenSecret` (its `key`)",
    },
    "otlp": {
        "endpoint": "`otlp.endpoint`", "protocol": "`otlp.protocol`", "headers": "`otlp.headers`",
        "tls.insecure": "`otlp.insecure`", "tls.ca_file": "`otlp.tlsSecretName` (ca.crt)",
        "tls.cert_file": "`otlp.tlsSecretName` (tls.crt) with `otlp.tlsClientCert`",
        "tls.key_file": "`otlp.tlsSecretName` (tls.key) with `otlp.tlsClientCert`",
        "compression": "`otlp.compression`", "timeout": "`otlp.timeout`", "interval": "`otlp.interval`",
    },
}  # fmt: skip


def example_comments() -> dict[str, str]:
    """Dotted key -> the comment lines right above it in config.example.yaml."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] = []
    for line in EXAMPLE.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^(\s*)([A-Za-z_][\w/.-]*):", line)
        if not match:
            pending = []
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        key = ".".join(name for _, name in stack)
        if pending:
            comments[key] = " ".join(pending)
        pending = []
    return comments


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the comment lines right above it (or after it) in the dataclass's source."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in source.splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            pending.append(stripped.lstrip("#").strip())
            continue
        match = re.match(r"^\s+([a-z_][a-z0-9_]*)\s*:", line)
        if match:
            trailing = stripped.split("  # ", 1)[1] if "  # " in stripped else ""
            text = " ".join(pending) or trailing
            if text:
                out[match.group(1)] = text
        pending = []
    return out


def _meaning(cls: type, path: tuple[str, ...]) -> str:
    """The comment on the field at `path` of dataclass `cls` (nested dataclasses followed)."""
    for part in path[:-1]:
        cls = typing.get_type_hints(cls)[part]
    return field_comments(cls).get(path[-1], "")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _type_text(tp: Any) -> str:
    if tp is Duration:
        return "duration"
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_text(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"map of {_type_text(typing.get_args(tp)[1])}"
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return f"{_type_text(args[0])} (optional)"
    return getattr(tp, "__name__", str(tp))


def _default(instance: Any, path: tuple[str, ...]) -> str:
    value = instance
    for part in path:
        value = getattr(value, part)
    if isinstance(value, Duration):
        return f"`{value}`"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    if value == "" or value is None:
        return '`""`' if value == "" else "(none)"
    if isinstance(value, dict):
        return "`{}`" if not value else f"`{value}`"
    return f"`{value}`"


def _component_leaves(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp) and tp is not Duration:
            out.extend(_component_leaves(tp, (*prefix, f.name)))
        else:
            out.append(((*prefix, f.name), tp))
    return out


def configuration_markdown() -> str:
    comments = example_comments()
    defaults = KpodSettings()
    lines = [
        "# Configuration",
        "",
        "<!-- Generated by `make docs` (scripts/gen_docs.py) from kpod/settings.py, the component config",
        "     classes, config.example.yaml and the Helm chart's values. Do not edit. -->",
        "",
        "The agent reads one YAML file (`kpod-metrics run --config FILE`) with four sections: `kpod:`",
        "(below), `receivers:`, `processors:` and `exporters:` (component settings, below), and",
        "`service.pipelines.metrics` (which components run).  `config.example.yaml` shows every key with its",
        "default.  Precedence: defaults < the file < `KPOD_*` environment variables.  `${env:VAR}` and",
        "`${env:VAR:-default}` are substituted in string values.  A list in an environment variable is",
        "comma-separated.  Durations: `30s`, `500ms`, `2m`, `1h`, or an integer of milliseconds.",
        "",
        "In the Helm chart the file is the ConfigMap rendered from `values.yaml`; keys without a chart value",
        "can still be set through `extraEnv` with their `KPOD_*` variable.",
        "",
        "## `kpod:`",
        "",
        "| key | type | default | environment | Helm value | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for path, tp in leaf_paths(KpodSettings):
        dotted = ".".join(path)
        meaning = comments.get("kpod." + dotted) or _meaning(KpodSettings, path)
        helm_value = HELM_VALUES.get(dotted, "- (extraEnv)")
        lines.append(
            f"| `kpod.{dotted}` | {_type_text(tp)} | {_default(defaults, path)} | `{env_var_name(path)}` | "
            f"{helm_value} | {_cell(meaning)} |"
        )
    lines.append("")
    from kpod.registry import Registry

    registry = Registry()
    for kind, section, group in (
        ("receiver", "receivers", "kpod.receivers"),
        ("processor", "processors", "kpod.processors"),
        ("exporter", "exporters", "kpod.exporters"),
    ):
        lines += [f"## `{section}:`", ""]
        if kind == "receiver":
            lines += [
                "Every receiver also takes `interval` (a duration: collect less often than `kpod.poll_interval`).",
                "Helm: `config.receivers` is passed through as this section.",
                "",
            ]
        names = sorted(e.name for e in importlib.metadata.entry_points(group=group))
        lines += ["| component | key | type | default | Helm value | meaning |", "|---|---|---|---|---|---|"]
        for name in names:
            factory = registry.factory(kind, name)
            config = factory.config_class()
            leaves = _component_leaves(factory.config_class)
            if not leaves:
                lines.append(f"| `{name}` | (no settings) | | | | |")
                continue
            for path, tp in leaves:
                dotted = ".".join(path)
                helm_value = HELM_COMPONENT_VALUES.get(name, {}).get(dotted)
                if helm_value is None:
                    section = {"receiver": "receivers", "processor": "processors"}.get(kind)
                    helm_value = f"`config.{section}.{name}.{dotted}`" if section else "-"
                meaning = _cell(_meaning(factory.config_class, path))
                default = _default(config, path)
                lines.append(f"| `{name}` | `{dotted}` | {_type_text(tp)} | {default} | {helm_value} | {meaning} |")
        lines.append("")
    lines += [
        "## `service:`",
        "",
        "| key | default | Helm value |",
        "|---|---|---|",
        "| `service.pipelines.metrics.receivers` | `[]` (the profile's receivers; `custom`: only these) |"
        " `config.pipelineReceivers` |",
        "| `service.pipelines.metrics.processors` | `[]` (= `[k8sattributes]`) |"
        " `k8sattributes`, then `config.pipelineProcessors` |",
        "| `service.pipelines.metrics.exporters` | `[prometheus]` | `prometheus`, plus `otlp` when `otlp.enabled` |",
        "",
        "## Chart-only values",
        "",
        "Values of `deploy/helm/kpod-metrics/values.yaml` that shape the Kubernetes objects rather than the",
        "agent's file (each is commented there, and `values.schema.json` checks its type):",
        "",
    ]
    values = yaml.safe_load(VALUES.read_text())
    lines.append(", ".join(f"`{k}`" for k in values if k not in ("config", "otlp")) + ".")
    lines.append("")
    return "\n".join(lines)


def outputs() -> dict[Path, str]:
    return {METRICS_MD: metrics_markdown(), CONFIGURATION_MD: configuration_markdown()}


def main() -> int:
    for path, text in outputs().items():
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
