"""OTLP exporter figures: memory while the collector is down, recovery, per-batch cost.

    .venv/bin/python -m bench.otlp [outage seconds, default 120] [--write]

A child process plays the agent: every second it hands the OTLP exporter (gRPC, gzip,
queue_size 10) a fresh node-sized snapshot (bench.synthetic: 110 pods with histograms, plus
the OTel resource attributes k8sattributes sets).  The collector is absent for
the outage; then this process starts a real gRPC MetricsService on the same port and waits for
the child's data to arrive.  The child's RSS is sampled all along: it must plateau once the queue
is full (the oldest batch is dropped, never an unbounded backlog).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import sections
from bench.sections import Measured

REPO = Path(__file__).resolve().parents[1]
INTERVAL_S = 1.0
QUEUE_SIZE = 10
PODS = 110

# The agent side, run in a fresh interpreter so that its RSS is its own.
CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
from bench.synthetic import node_batch
from kpod.agentmetrics import process_stats
from kpod.component import Context
from kpod.exporters.otlp.config import OtlpConfig, TlsConfig
from kpod.exporters.otlp.exporter import OtlpExporter
from kpod.model import Resource
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings
from kpod.units import Duration

port, total_s = int(sys.argv[1]), float(sys.argv[2])
interval, queue_size, pods = float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])

def rss():
    return process_stats()["process.resident_memory.bytes"]

def with_otel(batch):
    cache = {}
    for p in batch.points:
        labels = p.resource.labels
        if labels not in cache:
            d = dict(labels)
            otel = {"k8s.namespace.name": d["namespace"], "k8s.pod.name": d["pod"],
                    "k8s.container.name": d["container"], "k8s.pod.uid": "uid-" + d["pod"],
                    "container.id": "cid-" + d["pod"], "k8s.node.name": d["node"]}
            cache[labels] = Resource(labels, tuple(sorted(otel.items())))
        p.resource = cache[labels]
    return batch

before_import = rss()
settings = KpodSettings(); settings.node_name = "node-1"; settings.poll_interval = Duration(interval)
metrics = SelfMetrics()
config = OtlpConfig(endpoint=f"127.0.0.1:{port}", tls=TlsConfig(insecure=True), queue_size=queue_size,
                    backoff_initial=Duration(1.0), backoff_max=Duration(5.0))
exporter = OtlpExporter(Context("otlp", settings, None, metrics), config)
exporter.start()
after_start = rss()
samples, export_us, queue_max = [], [], 0
began = time.monotonic()
i = 0
while time.monotonic() - began < total_s:
    batch = with_otel(node_batch(pods, seed=i % 7))
    t = time.perf_counter()
    exporter.export(batch)
    export_us.append((time.perf_counter() - t) * 1e6)
    del batch
    queue_max = max(queue_max, exporter.queue_batches())
    waiting = exporter._queue.snapshots()
    raw = sum(1 for item in waiting if item.payloads is None)
    held = sum(len(p.gzipped) for item in waiting for p in (item.payloads or ()))
    now = round(time.monotonic() - began, 1)
    samples.append((now, rss(), exporter.queue_batches(), exporter.sent_points, raw, held))
    i += 1
    time.sleep(max(0.0, began + i * interval - time.monotonic()))
exporter.shutdown()
print(json.dumps({"before_import": before_import, "after_start": after_start, "samples": samples,
                  "export_us": export_us, "queue_max": queue_max, "dropped": exporter.dropped_points,
                  "sent": exporter.sent_points, "failed": exporter.failed_requests, "batches": i}))
"""


def _run(outage_s: float, after_s: float) -> dict[str, object]:
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import free_port
    from otlp_receiver import GrpcReceiver

    port = free_port()
    total = outage_s + after_s
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(port), str(total), str(REPO), str(INTERVAL_S), str(QUEUE_SIZE), str(PODS)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )  # fmt: skip
    began = time.monotonic()
    time.sleep(outage_s)
    receiver = GrpcReceiver(port=port).start()
    back = time.monotonic()
    first_arrival = None
    try:
        deadline = back + after_s
        while time.monotonic() < deadline and first_arrival is None:
            if receiver.requests():
                first_arrival = time.monotonic() - back
            time.sleep(0.05)
        out, _ = child.communicate(timeout=total + 60)
    finally:
        receiver.stop()
        if child.poll() is None:
            child.kill()
    result = json.loads(out.strip().splitlines()[-1])
    result["recovery_s"] = first_arrival
    result["wire_bytes"] = [r.size for r in receiver.requests()]
    result["points_received"] = sum(
        len(getattr(m, m.WhichOneof("data")).data_points)
        for r in receiver.requests()
        for rm in r.request.resource_metrics
        for sm in rm.scope_metrics
        for m in sm.metrics
    )
    result["elapsed"] = time.monotonic() - began
    return result


def _encode_cost() -> tuple[float, int, int]:
    """Median seconds to convert, encode and compress one node batch (the sender thread's CPU
    per cycle), the protobuf size and the batch's points."""
    from kpod.exporters.otlp.encoding import Encoder

    from bench.synthetic import node_batch

    encoder = Encoder({"service.name": "kpod-metrics"}, time.time_ns(), 5000)
    times = []
    size = 0
    for seed in range(7):
        batch = node_batch(PODS, seed=seed)
        began = time.perf_counter()
        encoder.payloads(batch)
        times.append(time.perf_counter() - began)
        size = sum(r.ByteSize() for r, _ in encoder.requests(batch))
    return statistics.median(times), size, len(batch.points)


def measure(outage_s: float = 120.0, after_s: float = 20.0, baseline_s: float = 30.0) -> Measured:
    baseline = _run(0.0, baseline_s)  # the collector up all along: encoding's own working memory
    result = _run(outage_s, after_s)
    encode_s, request_bytes, points = _encode_cost()
    data = {
        "outage_s": outage_s,
        "after_s": after_s,
        "baseline_s": baseline_s,
        "interval_s": INTERVAL_S,
        "queue_size": QUEUE_SIZE,
        "pods": PODS,
        "points": points,
        "baseline": baseline,
        "outage": result,
        "encode_s": encode_s,
        "request_bytes": request_bytes,
    }
    return Measured(f".venv/bin/python -m bench.otlp {outage_s:g}", data)


def render(data: dict[str, Any]) -> str:
    outage_s, queue_size = data["outage_s"], data["queue_size"]
    result, baseline = data["outage"], data["baseline"]
    samples = result["samples"]
    mib = 1 / 2**20
    base_samples = baseline["samples"]
    base_rss = [s[1] for s in base_samples[len(base_samples) // 2 :]]
    down = [s for s in samples if s[0] < outage_s]
    full_at = next((s[0] for s in down if s[2] >= queue_size), None)
    rss_full = [s[1] for s in down if full_at is not None and s[0] >= full_at]
    held_max = max((s[5] for s in down), default=0)
    rss_first = down[0][1] if down else 0
    export_us = sorted(result["export_us"])
    lines = [
        "## OTLP exporter: a collector that is down, then back",
        "",
        f"A child process exports a fresh {data['pods']}-pod snapshot (bench/synthetic.py, {data['points']:,} "
        f"points) every {data['interval_s']:g} s over gRPC (gzip) with `queue_size: {queue_size}`; "
        f"no collector for {outage_s:g} s, "
        f"then a real gRPC MetricsService on the same port for {data['after_s']:g} s.  Baseline: the same child "
        f"with the collector up all along for {data['baseline_s']:g} s.",
        "",
        "| figure | value |",
        "|---|---|",
        f"| RSS before the exporter started (interpreter + kpod + synthetic batch code) | "
        f"{result['before_import'] * mib:.1f} MiB |",
        f"| RSS after start() (gRPC + OTel SDK imported, channel created) | {result['after_start'] * mib:.1f} MiB |",
        f"| baseline, collector up: RSS median over its second half | {statistics.median(base_rss) * mib:.1f} MiB |",
        f"| outage: RSS after the first snapshot | {rss_first * mib:.1f} MiB |",
        f"| outage: queue full ({queue_size} batches) after | {'never' if full_at is None else f'{full_at} s'} |",
        (
            f"| outage: RSS once the queue was full, min / max over the rest of the outage | "
            f"{min(rss_full) * mib:.1f} / {max(rss_full) * mib:.1f} MiB |"
            if rss_full
            else "| outage: RSS once full | n/a (queue never full) |"
        ),
        f"| outage: bytes held by the queue (gzip-compressed requests), max | {held_max / 1e6:.2f} MB |",
        f"| largest queue seen | {result['queue_max']} batches |",
        f"| snapshots handed to export() / points dropped (oldest batches) / failed requests | "
        f"{result['batches']} / {result['dropped']} / {result['failed']} |",
        (
            f"| collector back: first request arrived after | {result['recovery_s']:.2f} s |"
            if result["recovery_s"] is not None
            else "| collector back | no data arrived |"
        ),
        f"| points delivered after recovery | {result['points_received']} in {len(result['wire_bytes'])} requests |",
        f"| export() in the collection loop: median / max | {export_us[len(export_us) // 2]:.0f} / "
        f"{export_us[-1]:.0f} us |",
        f"| sender thread: convert + encode + compress one node snapshot (median) | {data['encode_s'] * 1000:.0f} ms, "
        f"{data['request_bytes'] / 1e6:.2f} MB of protobuf |",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    outage = float(sys.argv[1]) if len(sys.argv) > 1 else 120.0
    measured = measure(outage)
    if "--write" in sys.argv[2:]:
        print(sections.write("otlp", measured).read_text())
    else:
        print(render(measured.data))
    os._exit(0)
