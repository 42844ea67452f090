"""OTLP exporter figures: memory while the collector is down, recovery, encoding cost per route.

    .venv/bin/python -m bench.otlp [outage seconds, default 120] [--write]

A child process plays the agent: every second it hands the OTLP exporter (gRPC, gzip,
queue_size 10) a fresh node-sized snapshot (bench.synthetic: 110 pods with histograms, plus
the OTel resource attributes k8sattributes sets).  The collector is absent for
the outage; then this process starts a real gRPC MetricsService on the same port and waits for
the child's data to arrive.  The child's RSS is sampled all along: it must plateau once the queue
is full (the oldest batch is dropped, never an unbounded backlog).  Then the sender thread's
CPU per snapshot, the direct encoding (explicit and exponential) beside the SDK route it replaced.

    .venv/bin/python -c 'from bench.otlp import encode_costs, render_encoding; print(render_encoding(encode_costs()))'
                                                      (the encoding part alone: seconds, not minutes)
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


ROUTES = ("sdk", "explicit", "exponential")


def encode_costs(pods: int = PODS, rounds: int = 7) -> dict[str, Any]:
    """CPU seconds (process time) to encode one node snapshot, per route, side by side: the SDK
    route the exporter took before (bench/otlp_sdk.py: SDK data classes + encode_metrics) and
    the direct encoding (explicit and exponential histograms); each alone (`requests()`) and
    with the queue's gzip (`payloads()`, what the sender thread does per snapshot).  The routes
    take turns on the same batches; medians over rounds."""
    sys.path.insert(0, str(REPO / "tests"))
    from kpod.exporters.otlp.encoding import Encoder
    from otlp_receiver import with_otel

    from bench.otlp_sdk import SdkEncoder
    from bench.synthetic import node_batch

    base = {"service.name": "kpod-metrics", "host.name": "bench"}
    encoders = {
        "sdk": SdkEncoder(base, time.time_ns(), 5000),
        "explicit": Encoder(base, time.time_ns(), 5000, "explicit"),
        "exponential": Encoder(base, time.time_ns(), 5000, "exponential"),
    }
    batches = [with_otel(node_batch(pods, seed=seed)) for seed in range(rounds + 1)]
    for encoder in encoders.values():
        encoder.payloads(batches[-1])  # warm: imports, caches of a previous cycle
    encode: dict[str, list[float]] = {route: [] for route in ROUTES}
    with_gzip: dict[str, list[float]] = {route: [] for route in ROUTES}
    for batch in batches[:rounds]:
        for route, encoder in encoders.items():
            began = time.process_time()
            encoder.requests(batch)
            encode[route].append(time.process_time() - began)
            began = time.process_time()
            encoder.payloads(batch)
            with_gzip[route].append(time.process_time() - began)
    sizes = {
        "sdk": sum(r.ByteSize() for r, _ in encoders["sdk"].requests(batches[0])),
        **{route: sum(len(r) for r, _ in encoders[route].requests(batches[0])) for route in ROUTES[1:]},
    }
    gzipped = {route: sum(len(p.gzipped) for p in encoders[route].payloads(batches[0])) for route in ROUTES}
    return {
        "pods": pods,
        "rounds": rounds,
        "points": len(batches[0]),
        "encode_s": {route: statistics.median(v) for route, v in encode.items()},
        "gzip_s": {route: statistics.median(v) for route, v in with_gzip.items()},
        "bytes": sizes,
        "gzip_bytes": gzipped,
    }


def measure(outage_s: float = 120.0, after_s: float = 20.0, baseline_s: float = 30.0) -> Measured:
    baseline = _run(0.0, baseline_s)  # the collector up all along: encoding's own working memory
    result = _run(outage_s, after_s)
    encoding = encode_costs()
    data = {
        "outage_s": outage_s,
        "after_s": after_s,
        "baseline_s": baseline_s,
        "interval_s": INTERVAL_S,
        "queue_size": QUEUE_SIZE,
        "pods": PODS,
        "points": encoding["points"],
        "baseline": baseline,
        "outage": result,
        "encoding": encoding,
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
        f"| RSS after start() (gRPC and the OTLP protobuf modules imported, channel created) | "
        f"{result['after_start'] * mib:.1f} MiB |",
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
    ]
    return "\n".join(lines) + "\n\n" + render_encoding(data["encoding"])


def render_encoding(encoding: dict[str, Any]) -> str:
    lines = [
        f"Encoding one {encoding['pods']}-pod snapshot ({encoding['points']:,} points) in the sender thread, CPU "
        f"time (process time), median of {encoding['rounds']} rounds, the routes taking turns on the same batches:",
        "",
        "| route | encode | encode + gzip (level 1) | protobuf | gzipped |",
        "|---|---|---|---|---|",
    ]
    names = {
        "sdk": "SDK data classes + encode_metrics (the route before, bench/otlp_sdk.py)",
        "explicit": "direct encoding, explicit-bucket histograms (default)",
        "exponential": "direct encoding, exponential histograms",
    }
    for route, name in names.items():
        lines.append(
            f"| {name} | {encoding['encode_s'][route] * 1000:.1f} ms | {encoding['gzip_s'][route] * 1000:.1f} ms "
            f"| {encoding['bytes'][route] / 1e6:.2f} MB | {encoding['gzip_bytes'][route] / 1e6:.3f} MB |"
        )
    sdk = encoding["gzip_s"]["sdk"]
    lines += [
        "",
        f"Direct / SDK route, encode + gzip: explicit {encoding['gzip_s']['explicit'] / sdk:.2f}, "
        f"exponential {encoding['gzip_s']['exponential'] / sdk:.2f}.  Target (issue 18): <= 30 ms of CPU per "
        f"snapshot: {'met' if encoding['gzip_s']['explicit'] <= 0.030 else '**missed**'} (explicit, with gzip).",
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
