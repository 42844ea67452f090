"""Series per pod, per profile, classic against native histograms, from a real exposition.

    .venv/bin/python -m bench.series [--pods 110] [--write]

The node of bench/scale.py, as root on this host: N kubepods-shaped pods (systemd driver,
burstable, containerd scopes; alternately 2 and 1 containers, so 1.5 N containers), the fake
API server serving them, and in every container one bash process that each second opens a TCP
connection to a listener of this bench, sends a line, reads the answer and closes it, then
waits: scheduling, TCP (connections, bytes, RTT) and some tracked system calls (read, write,
close, connect) in every container, at a negligible load.  For each profile a fresh agent
(`kpod-metrics run`, informer mode, poll 1 s, the Prometheus exporter with its default
`histograms: both`) runs until every pod carries its labels and three more cycles passed; then
one scrape in each exposition:

- text 0.0.4: each sample line is a series as Prometheus stores it without native histograms
  (classic: a histogram is 26 `_bucket` lines, `+Inf`, `_sum` and `_count`);
- protobuf, decoded with the official classes (tests/promproto.py): each Metric is a series as
  Prometheus stores it with native histograms (a histogram is one series).

Series of the node's pods (those with a `pod="scale-N"` label) per pod; per-node series (BPF
maps and programs, self-metrics) are not counted.  docs/METRICS.md prints these figures beside
the spec's estimates (scripts/gen_docs.py reads docs/perf/data/series.json).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import socketserver
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agent_proc import AgentProcess  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402
from helpers import free_port  # noqa: E402

from bench import sections  # noqa: E402
from bench.scale import NAMESPACE, NODE, _Node  # noqa: E402
from bench.sections import Measured, NotMeasured  # noqa: E402

PODS = 110
PROFILES = ("minimal", "standard", "comprehensive")
# The spec's estimates of series per pod (its README, "Metric profiles"), histograms counted once.
SPEC = {"minimal": 20, "standard": 39, "comprehensive": 69}
POLL_S = 1.0
PROTOBUF_ACCEPT = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"
POD_LABEL = re.compile(rb'pod="(scale-\d+)"')
# A container's process: once a second a TCP round trip to the bench's listener, then a wait;
# exits on EOF of its stdin (if the bench dies, so do they).
WORKLOAD = (
    "while :; do "
    "if exec 3<>/dev/tcp/127.0.0.1/{port}; then echo ping >&3; read -t 1 -u 3 _; exec 3>&-; fi; "
    "read -t 1 _ || [ $? -gt 128 ] || break; "
    "done"
)


class _Echo(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            self.wfile.write(self.rfile.readline())


class _Listener(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def _labelled(body: bytes) -> set[bytes]:
    return set(POD_LABEL.findall(body))


def count_series(text: bytes, protobuf: bytes) -> dict[str, int]:
    """Series of the node's pods in each exposition, and the histograms among the native ones."""
    from promproto import families, metrics_pb2

    classic = sum(1 for line in text.split(b"\n") if line and not line.startswith(b"#") and POD_LABEL.search(line))
    native = histograms = 0
    histogram_type = metrics_pb2().MetricType.Value("HISTOGRAM")
    for family in families(protobuf):
        for metric in family.metric:
            if any(pair.name == "pod" and pair.value.startswith("scale-") for pair in metric.label):
                native += 1
                histograms += family.type == histogram_type
    return {"classic": classic, "native": native, "histograms": histograms}


def measure_profile(profile: str, node: _Node, workdir: Path, kubeconfig: str, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    port = free_port()
    config = (
        f"kpod: {{profile: {profile}, poll_interval: {POLL_S:g}s, node_name: {NODE}, discovery: {{mode: informer}},"
        f" cgroup: {{root: {node.root}}}, filter: {{exclude_namespaces: []}}}}\n"
        f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}'}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
    )
    agent = AgentProcess(config, workdir, port).start()
    try:
        agent.wait_ready(90)
        agent.wait_until(lambda: len(_labelled(agent.get("/metrics", timeout=30))) >= node.pods, 120, "labelled")
        cycles = agent.status()["cycles"]
        agent.wait_until(lambda: agent.status()["cycles"] >= cycles + 3, 60, "three more cycles")
        text = agent.get("/metrics", timeout=30)
        protobuf = agent.get("/metrics", headers={"Accept": PROTOBUF_ACCEPT}, timeout=30)
        counts = count_series(text, protobuf)
        counts["labelled_pods"] = len(_labelled(text))
        log(f"  {profile}: {counts}")
        return counts
    finally:
        agent.stop()


def measure(pods: int = PODS) -> Measured:
    if os.geteuid() != 0:
        raise NotMeasured("bench.series needs root (it makes pod cgroups and runs the eBPF receivers)")
    workdir = Path(tempfile.mkdtemp(prefix="kpod-series-"))
    listener = _Listener(("127.0.0.1", 0), _Echo)
    threading.Thread(target=listener.serve_forever, name="series-echo", daemon=True).start()
    api = FakeApiServer().start()
    node: _Node | None = None
    results: dict[str, dict[str, int]] = {}
    try:
        node = _Node(api, WORKLOAD.format(port=listener.server_address[1]))
        node.grow(pods)
        kubeconfig = api.write_kubeconfig(str(workdir / "kubeconfig"))
        time.sleep(2 * POLL_S)  # every container did its first round trip
        for profile in PROFILES:
            results[profile] = measure_profile(profile, node, workdir, kubeconfig, lambda m: print(m, file=sys.stderr))
        containers = node.containers
    finally:
        if node is not None:
            node.close()
        api.stop()
        listener.shutdown()
        listener.server_close()
        for path in sorted(workdir.glob("*"), reverse=True):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            workdir.rmdir()
    data = {
        "pods": pods,
        "containers": containers,
        "namespace": NAMESPACE,
        "poll_s": POLL_S,
        "spec": SPEC,
        "profiles": results,
    }
    return Measured(f".venv/bin/python -m bench.series --pods {pods}", data)


def per_pod(data: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Series per pod for each profile: classic, native, histograms (native series)."""
    pods = data["pods"]
    return {
        profile: {key: counts[key] / pods for key in ("classic", "native", "histograms")}
        for profile, counts in data["profiles"].items()
    }


def render(data: dict[str, Any]) -> str:
    rows = per_pod(data)
    lines = [
        "## Series per pod, per profile: classic and native histograms (bench/series.py)",
        "",
        f"{data['pods']} pods ({data['containers']} containers: alternately 2 and 1 per pod), every container "
        "doing one TCP round trip and a wait each second; one agent per profile (informer mode, poll "
        f"{data['poll_s']:g} s); series of the node's pods in one text scrape (classic) and one protobuf scrape "
        "(native), per pod.",
        "",
        "| profile | spec's estimate | classic | native | histograms (native series) | pods labelled |",
        "|---|---|---|---|---|---|",
    ]
    for profile, counts in data["profiles"].items():
        row = rows[profile]
        lines.append(
            f"| {profile} | ~{data['spec'][profile]} | {row['classic']:.1f} | {row['native']:.1f} "
            f"| {row['histograms']:.1f} | {counts['labelled_pods']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=PODS)
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/series.md")
    args = parser.parse_args()
    try:
        measured = measure(args.pods)
    except NotMeasured as reason:
        raise SystemExit(str(reason)) from None
    if args.write:
        print(sections.write("series", measured).read_text())
    else:
        print(render(measured.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
