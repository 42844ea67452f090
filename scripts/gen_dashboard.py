"""Write deploy/grafana/kpod-metrics.json, the Grafana dashboard (`make manifests`).

Generated rather than hand-edited so that every panel's query is one readable line here, the
layout stays regular, and a test can compare the committed JSON with a fresh build.  The
run-queue, syscall-latency, retransmit-ratio and filesystem-fill panels read the recording rules
of deploy/helm/kpod-metrics/files/kpod-metrics.rules.yaml (install them with the chart's
prometheusRule.enabled, or as a Prometheus rule file).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "deploy" / "grafana" / "kpod-metrics.json"

# Every per-pod query carries the three dashboard variables.
SEL = 'node=~"$node", namespace=~"$namespace", pod=~"$pod"'
# The agent's own series: node comes from the scrape's relabeling (ServiceMonitor/PodMonitor).
AGENT_SEL = 'node=~"$node"'
RI = "$__rate_interval"
# The scrape targets that are agents, whatever their job is called (as the KpodAgentDown alert).
AGENT_TARGETS = "group by (job, namespace) (max_over_time(kpod_build_info[30m]))"


def target(expr: str, legend: str, ref: str) -> dict[str, Any]:
    return {
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "expr": expr,
        "legendFormat": legend,
        "refId": ref,
    }


class Layout:
    """Panels in rows of two (12 columns each), with collapsible-looking row headers."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0
        self.x = 0
        self.next_id = 1

    def row(self, title: str) -> None:
        if self.x:
            self.y += 8
            self.x = 0
        self.panels.append(
            {"type": "row", "title": title, "id": self._id(), "collapsed": False,
             "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []}
        )  # fmt: skip
        self.y += 1

    def panel(
        self,
        title: str,
        queries: list[tuple[str, str]],
        unit: str,
        description: str = "",
        kind: str = "timeseries",
        width: int = 12,
    ) -> None:
        if self.x + width > 24:
            self.y += 8
            self.x = 0
        refs = "ABCDEFGH"
        panel: dict[str, Any] = {
            "type": kind,
            "title": title,
            "id": self._id(),
            "description": description,
            "datasource": {"type": "prometheus", "uid": "${datasource}"},
            "gridPos": {"h": 8, "w": width, "x": self.x, "y": self.y},
            "targets": [target(expr, legend, refs[i]) for i, (expr, legend) in enumerate(queries)],
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {"legend": {"displayMode": "table", "placement": "right", "calcs": ["mean", "max"]}},
        }
        if kind == "timeseries":
            panel["fieldConfig"]["defaults"]["custom"] = {"fillOpacity": 10, "lineWidth": 1}
        if kind == "bargauge":
            panel["options"] = {"displayMode": "gradient", "orientation": "horizontal", "showUnfilled": True}
            for t in panel["targets"]:
                t["instant"] = True
        self.panels.append(panel)
        self.x += width
        if self.x >= 24:
            self.x = 0
            self.y += 8

    def _id(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def variable(name: str, label: str, query: str) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def build() -> dict[str, Any]:
    lay = Layout()

    lay.row("CPU")
    lay.panel(
        "Run-queue latency p99 by pod",
        [(f"namespace_pod:kpod_cpu_runqueue_latency_seconds:p99_5m{{{SEL}}}", "{{namespace}}/{{pod}}")],
        "s",
        "Time the pod's tasks waited for a CPU after becoming runnable (recording rule over the _bucket series).",
    )
    lay.panel(
        "Run-queue latency p50 by pod",
        [(f"namespace_pod:kpod_cpu_runqueue_latency_seconds:p50_5m{{{SEL}}}", "{{namespace}}/{{pod}}")],
        "s",
    )
    lay.panel(
        "Context switches by pod",
        [(f"sum by (namespace, pod) (rate(kpod_cpu_context_switches_total{{{SEL}}}[{RI}]))", "{{namespace}}/{{pod}}")],
        "ops",
    )
    lay.panel(
        "CPU usage and throttling by pod",
        [
            (
                f"sum by (namespace, pod) (rate(kpod_cpu_usage_seconds_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} used",
            ),
            (
                f"sum by (namespace, pod) (rate(kpod_cpu_throttled_seconds_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} throttled",
            ),
        ],
        "percentunit",
        "CPU seconds per second (1 = one full CPU).",
    )

    lay.row("TCP")
    lay.panel(
        "TCP bytes sent and received by pod",
        [
            (
                f"sum by (namespace, pod) (rate(kpod_net_tcp_bytes_sent_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} sent",
            ),
            (
                f"-sum by (namespace, pod) (rate(kpod_net_tcp_bytes_received_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} received",
            ),
        ],
        "Bps",
        "Bytes as returned by send/recv on the pod's TCP sockets; received is drawn below zero.",
    )
    lay.panel(
        "TCP retransmits by pod",
        [
            (f"sum by (namespace, pod) (rate(kpod_net_tcp_retransmits_total{{{SEL}}}[{RI}]))", "{{namespace}}/{{pod}}"),
        ],
        "pps",
        "Segments retransmitted per second, listeners' SYN-ACKs included, as the kernel counts them (TcpRetransSegs).",
    )
    lay.panel(
        "TCP retransmit ratio by pod",
        [(f"namespace_pod:kpod_net_tcp_retransmit_ratio:rate5m{{{SEL}}}", "{{namespace}}/{{pod}}")],
        "percentunit",
        "Bytes retransmitted per byte sent on the pod's TCP sockets (recording rule).",
    )
    lay.panel(
        "TCP smoothed RTT p50 / p99 by pod",
        [
            (
                "histogram_quantile(0.99, sum by (namespace, pod, le) "
                f"(rate(kpod_net_tcp_rtt_seconds_bucket{{{SEL}}}[{RI}])))",
                "{{namespace}}/{{pod}} p99",
            ),
            (
                "histogram_quantile(0.50, sum by (namespace, pod, le) "
                f"(rate(kpod_net_tcp_rtt_seconds_bucket{{{SEL}}}[{RI}])))",
                "{{namespace}}/{{pod}} p50",
            ),
        ],
        "s",
    )
    lay.panel(
        "TCP connections by pod and direction",
        [
            (
                f"sum by (namespace, pod, direction) (rate(kpod_net_tcp_connections_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} {{direction}}",
            )
        ],
        "cps",
    )

    lay.row("Interfaces")
    lay.panel(
        "Interface throughput by pod",
        [
            (
                f"sum by (namespace, pod, interface) (rate(kpod_net_iface_rx_bytes_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} {{interface}} rx",
            ),
            (
                f"-sum by (namespace, pod, interface) (rate(kpod_net_iface_tx_bytes_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} {{interface}} tx",
            ),
        ],
        "Bps",
        "Counters of the pod's network namespace (read once per pod); transmit is drawn below zero.",
    )
    lay.panel(
        "Interface drops and errors by pod",
        [
            (
                f"sum by (namespace, pod) (rate(kpod_net_iface_rx_drops_total{{{SEL}}}[{RI}]) "
                f"+ rate(kpod_net_iface_tx_drops_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} drops",
            ),
            (
                f"sum by (namespace, pod) (rate(kpod_net_iface_rx_errors_total{{{SEL}}}[{RI}]) "
                f"+ rate(kpod_net_iface_tx_errors_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} errors",
            ),
        ],
        "pps",
    )

    lay.row("Memory")
    lay.panel(
        "OOM kills by container",
        [
            (
                f"sum by (namespace, pod, container) (increase(kpod_mem_oom_kills_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}}/{{container}}",
            )
        ],
        "short",
        "Tasks killed by the OOM killer, charged to the victim's container.",
    )
    lay.panel(
        "Major page faults by pod",
        [(f"sum by (namespace, pod) (rate(kpod_mem_major_page_faults_total{{{SEL}}}[{RI}]))", "{{namespace}}/{{pod}}")],
        "ops",
        "Faults that had to read from disk.",
    )
    lay.panel(
        "Memory working set by pod",
        [(f"sum by (namespace, pod) (kpod_mem_working_set_bytes{{{SEL}}})", "{{namespace}}/{{pod}}")],
        "bytes",
    )
    lay.panel(
        "Pressure stall (some) by pod",
        [
            (
                f'sum by (namespace, pod) (rate(kpod_pressure_cpu_waiting_seconds_total{{{SEL}, kind="some"}}[{RI}]))',
                "{{namespace}}/{{pod}} cpu",
            ),
            (
                "sum by (namespace, pod) "
                f'(rate(kpod_pressure_memory_waiting_seconds_total{{{SEL}, kind="some"}}[{RI}]))',
                "{{namespace}}/{{pod}} memory",
            ),
            (
                f'sum by (namespace, pod) (rate(kpod_pressure_io_waiting_seconds_total{{{SEL}, kind="some"}}[{RI}]))',
                "{{namespace}}/{{pod}} io",
            ),
        ],
        "percentunit",
    )

    lay.row("Syscalls (comprehensive profile)")
    lay.panel(
        "Top syscalls by p99 latency",
        [
            (
                "topk(10, histogram_quantile(0.99, sum by (syscall, le) "
                f"(namespace_pod_syscall:kpod_syscall_latency_seconds_bucket:rate5m{{{SEL}}})))",
                "{{syscall}}",
            )
        ],
        "s",
        "Entry-to-exit time of the tracked syscalls of the selected pods (recording rule over _bucket).",
        kind="bargauge",
    )
    lay.panel(
        "Top syscalls by rate",
        [
            (f"topk(10, sum by (syscall) (rate(kpod_syscall_count_total{{{SEL}}}[{RI}])))", "{{syscall}} calls"),
            (f"topk(10, sum by (syscall) (rate(kpod_syscall_errors_total{{{SEL}}}[{RI}])))", "{{syscall}} errors"),
        ],
        "ops",
    )

    lay.row("Disk and filesystems")
    lay.panel(
        "Disk throughput by pod",
        [
            (
                f"sum by (namespace, pod, device) (rate(kpod_disk_read_bytes_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} {{device}} read",
            ),
            (
                f"-sum by (namespace, pod, device) (rate(kpod_disk_written_bytes_total{{{SEL}}}[{RI}]))",
                "{{namespace}}/{{pod}} {{device}} written",
            ),
        ],
        "Bps",
        "Written is drawn below zero.",
    )
    lay.panel(
        "Disk operations by pod",
        [
            (f"sum by (namespace, pod) (rate(kpod_disk_reads_total{{{SEL}}}[{RI}]))", "{{namespace}}/{{pod}} reads"),
            (f"-sum by (namespace, pod) (rate(kpod_disk_writes_total{{{SEL}}}[{RI}]))", "{{namespace}}/{{pod}} writes"),
        ],
        "iops",
    )
    lay.panel(
        "Filesystem fill by mountpoint",
        [
            (
                f"topk(20, namespace_pod_mountpoint:kpod_fs_fill_ratio{{{SEL}}})",
                "{{namespace}}/{{pod}}/{{container}} {{mountpoint}} on {{device}}",
            )
        ],
        "percentunit",
        "Used / capacity of each container filesystem (statvfs), fullest first. Containers on the same "
        "device share one disk: see the next panel.",
        kind="bargauge",
    )
    lay.panel(
        "Filesystems by fill",
        [
            (
                f"topk(20, node_device:kpod_fs_fill_ratio{{{AGENT_SEL}}})",
                "{{node}} {{device}} ({{fstype}})",
            )
        ],
        "percentunit",
        "Each filesystem of the node once (root overlays count as their upper layer's disk), fullest "
        "first: what KpodFilesystemFull alerts on.",
        kind="bargauge",
    )

    lay.row("Agent health")
    lay.panel(
        "Agents up",
        [(f"up and on (job, namespace) {AGENT_TARGETS}", "{{instance}}")],
        "short",
        "1 while the agent is scraped (the targets of jobs that reported kpod_build_info, whatever their name).",
    )
    lay.panel(
        "Collection duration by receiver",
        [(f"max by (node, receiver) (kpod_collection_duration_seconds{{{AGENT_SEL}}})", "{{node}} {{receiver}}")],
        "s",
    )
    lay.panel(
        "Collection errors by receiver",
        [
            (
                f"sum by (node, receiver) (rate(kpod_collection_errors_total{{{AGENT_SEL}}}[{RI}]))",
                "{{node}} {{receiver}}",
            )
        ],
        "ops",
        "Files that could not be read or collections that failed; /debug/status says why.",
    )
    lay.panel("Series per agent", [(f"kpod_series{{{AGENT_SEL}}}", "{{node}}")], "short")
    lay.panel(
        "BPF map fill",
        [
            (
                f"max by (node, map) (kpod_bpf_map_entries{{{AGENT_SEL}}} / on (node, map) "
                f"(kpod_bpf_map_capacity{{{AGENT_SEL}}} > 0))",
                "{{node}} {{map}}",
            ),
        ],
        "percentunit",
        "Entries in use per hash map (arrays preallocate every slot and are never full, so they are not "
        "shown). At 100 % new cgroups are not counted: raise config.bpf.mapMaxEntries.",
    )
    lay.panel(
        "BPF program CPU time",
        [
            (
                f"sum by (node, program) (rate(kpod_bpf_program_run_seconds_total{{{AGENT_SEL}}}[{RI}]))",
                "{{node}} {{program}}",
            )
        ],
        "percentunit",
        "Kernel time in each program (needs sysctl kernel.bpf_stats_enabled=1).",
    )

    return {
        "title": "kpod-metrics: per-pod kernel metrics",
        "uid": "kpod-metrics",
        "description": "Run-queue latency, TCP, memory events, syscalls, disk, interfaces and filesystems per pod",
        "tags": ["kpod-metrics", "kubernetes", "ebpf"],
        "editable": True,
        "graphTooltip": 1,
        "refresh": "1m",
        "schemaVersion": 39,
        "time": {"from": "now-3h", "to": "now"},
        "timezone": "browser",
        "version": 1,
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                variable("node", "Node", "label_values(kpod_cpu_usage_seconds_total, node)"),
                variable(
                    "namespace", "Namespace", 'label_values(kpod_cpu_usage_seconds_total{node=~"$node"}, namespace)'
                ),
                variable(
                    "pod",
                    "Pod",
                    'label_values(kpod_cpu_usage_seconds_total{node=~"$node", namespace=~"$namespace"}, pod)',
                ),
            ]
        },
        "panels": lay.panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


def main() -> int:
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
