"""Core figures: exposition render time, scrape latency over loopback, idle agent RSS.

    .venv/bin/python -m bench.core

Render and scrape use a node-sized batch (bench.synthetic: 110 pods x the comprehensive
profile's series, with histograms).  RSS is read from a real `kpod-metrics run` process.
"""

from __future__ import annotations

import gzip
import http.client
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from kpod.exporters.prometheus.config import PrometheusConfig
from kpod.exporters.prometheus.exporter import PrometheusExporter
from kpod.exporters.prometheus.exposition import TEXT_CONTENT_TYPE, Renderer
from kpod.exporters.prometheus.http import joined
from kpod.exporters.prometheus.protobuf import BOTH, NATIVE, ProtobufRenderer
from kpod.exporters.prometheus.server import TEXT

from bench.render_previous import Renderer as PreviousRenderer
from bench.sections import Measured
from bench.synthetic import HIST_BOUNDS, node_batch
from kpod.cgroup.index import CgroupIndex
from kpod.component import Context
from kpod.model import Batch, Kind, Point
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings

# Targets of issue 2.
RENDER_TARGET_MS = 20.0
SCRAPE_TARGET_MS = 2.0
RSS_TARGET_MIB = 50.0
IDLE_S = 6.0


def render_times(pods: int = 110, rounds: int = 31) -> dict[str, Any]:
    """Median render times, side by side on the same batches: the text renderer before issue
    18's rewrite (bench/render_previous.py) and the current one (the samples once, then the
    OpenMetrics body, which Prometheus asks for, and the text 0.0.4 body too), and the protobuf
    renderer (histograms: both, and native), with every value new each cycle (worst case) and in
    a typical cycle where a third of the series changed.  The renderers take turns on each
    batch, and only the batch being rendered is alive (as in the agent).  Times are CPU time
    (process time: a render is single-threaded), which a busy shared machine inflates less than
    wall time; the OpenMetrics renders' wall times are kept too."""
    previous_renderer = PreviousRenderer()
    text_renderer = Renderer()
    protobuf = {"protobuf": ProtobufRenderer(BOTH), "protobuf_native": ProtobufRenderer(NATIVE)}
    # Each render alone, and with the gzip (level 1) a Prometheus scrape asks for.
    names = ("text_previous", "text", "text_both", "text_gzip", *protobuf, *(f"{name}_gzip" for name in protobuf))

    def timed(batch: Batch, into: dict[str, list[float]], walls: dict[str, list[float]]) -> None:
        began, began_wall = time.process_time(), time.perf_counter()
        previous_renderer.render_parts(batch).openmetrics()
        into["text_previous"].append(time.process_time() - began)
        walls["text_previous"].append(time.perf_counter() - began_wall)
        began, began_wall = time.process_time(), time.perf_counter()
        rendered = text_renderer.render_parts(batch)
        body = rendered.openmetrics()
        one = time.process_time()
        walls["text"].append(time.perf_counter() - began_wall)
        gzip.compress(body, 1)
        into["text_gzip"].append(time.process_time() - began)
        begin_text = time.process_time()
        rendered.text()
        into["text"].append(one - began)
        into["text_both"].append(one - began + time.process_time() - begin_text)
        for name, renderer in protobuf.items():
            began = time.process_time()
            body, _ = renderer.render(batch)
            rendered_at = time.process_time()
            gzip.compress(body, 1)
            into[name].append(rendered_at - began)
            into[f"{name}_gzip"].append(time.process_time() - began)

    changed: dict[str, list[float]] = {name: [] for name in names}
    changed_wall: dict[str, list[float]] = {"text_previous": [], "text": []}
    for seed in range(rounds):
        timed(node_batch(pods, seed=seed), changed, changed_wall)
    base = node_batch(pods, seed=rounds)
    other = node_batch(pods, seed=999)
    partial: dict[str, list[float]] = {name: [] for name in names}
    partial_wall: dict[str, list[float]] = {"text_previous": [], "text": []}
    for round_number in range(rounds):
        points = list(base.points)
        for i in range(round_number % 3, len(points), 3):
            points[i] = other.points[i]
        base.points = points
        timed(base, partial, partial_wall)
    churn = churn_times(pods, rounds, previous_renderer, text_renderer, protobuf["protobuf"])
    text, _, series = Renderer().render(base)
    both, _ = ProtobufRenderer(BOTH).render(base)
    native, _ = ProtobufRenderer(NATIVE).render(base)
    return {
        "rounds": rounds,
        "series": series,
        "histograms": sum(1 for p in base.points if p.metric.kind is Kind.HISTOGRAM),
        "buckets": len(HIST_BOUNDS) + 1,
        "bytes": len(text),
        "gzip_bytes": len(gzip.compress(text, 1)),
        "protobuf_bytes": {"both": len(both), "native": len(native)},
        "protobuf_gzip_bytes": {"both": len(gzip.compress(both, 1)), "native": len(gzip.compress(native, 1))},
        # The first render of each fills the caches: not a cycle's cost.
        "all_changed_ms": {name: statistics.median(v[1:]) * 1000 for name, v in changed.items()},
        "third_changed_ms": {name: statistics.median(v) * 1000 for name, v in partial.items()},
        # Other work on a shared machine only ever adds to a render's CPU time: the least disturbed
        # render is the closest to its own cost.
        "all_changed_min_ms": {name: min(v[1:]) * 1000 for name, v in changed.items()},
        "all_changed_wall_ms": {name: statistics.median(v[1:]) * 1000 for name, v in changed_wall.items()},
        "third_changed_wall_ms": {name: statistics.median(v) * 1000 for name, v in partial_wall.items()},
        "churn_ms": churn,
    }


def _pods(batch: Batch) -> list[list[Point]]:
    """A batch's points by pod (resource), in order."""
    pods: dict[int, list[Point]] = {}
    for point in batch.points:
        pods.setdefault(id(point.resource), []).append(point)
    return list(pods.values())


def churn_times(
    pods: int, rounds: int, previous: PreviousRenderer, text: Renderer, protobuf: ProtobufRenderer
) -> dict[str, float]:
    """CPU medians of a cycle where a pod went away and another came (a series set that changed:
    the renderers rebuild what they keep per family), beside cycles of the same pods, every value
    changed in both.  A node of `pods` pods, one of which is replaced by a new pod every other
    cycle and back: steady, churn, churn, steady, ...; the renderers take turns on each batch."""
    layout = _pods(node_batch(pods + 1, seed=1))
    values = [_pods(node_batch(pods + 1, seed=seed)) for seed in range(2, 9)]

    def batch(left_out: int, cycle: int) -> Batch:
        points = []
        for index, (pod, numbers) in enumerate(zip(layout, values[cycle % len(values)], strict=True)):
            if index != left_out:
                points += [
                    Point(p.metric, p.cgroup, p.attributes, n.value, p.resource)
                    for p, n in zip(pod, numbers, strict=True)
                ]
        return Batch(points)

    renders = {
        "text_previous": lambda b: previous.render_parts(b).openmetrics(),
        "text": lambda b: text.render_parts(b).openmetrics(),
        "protobuf": lambda b: protobuf.render(b),
    }
    taken: dict[str, list[float]] = {f"{name}_{kind}": [] for name in renders for kind in ("steady", "churn")}
    cycle = 0
    for round_number in range(rounds):
        for kind, left_out in (("steady", pods), ("churn", round_number % pods), ("churn", pods), ("steady", pods)):
            one = batch(left_out, cycle)
            cycle += 1
            for name, render in renders.items():
                began = time.process_time()
                render(one)
                taken[f"{name}_{kind}"].append(time.process_time() - began)
    return {name: statistics.median(v[2:]) * 1000 for name, v in taken.items()}


class _StdlibHandler(BaseHTTPRequestHandler):
    """The scrape path as it was before the event loop (issue 19): the standard library's
    ThreadingHTTPServer, a thread per connection, serving the same bytes."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    bodies: dict[bool, bytes] = {}  # gzipped? -> the text exposition

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        gzipped = "gzip" in self.headers.get("Accept-Encoding", "")
        body = self.bodies[gzipped]
        self.send_response(200)
        self.send_header("Content-Type", TEXT_CONTENT_TYPE)
        self.send_header("Content-Length", str(len(body)))
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        self.wfile.write(body)


def _scrapes(address: tuple[str, int], headers: dict[str, str], count: int) -> list[float]:
    connection = http.client.HTTPConnection(*address, timeout=10)
    samples = []
    for _ in range(count):
        began = time.perf_counter()
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        response.read()
        samples.append(time.perf_counter() - began)
    connection.close()
    return samples


def scrape_latency(pods: int = 110, scrapes: int = 400, rounds: int = 10) -> dict[str, float]:
    """Scrape latency of the agent's server and, side by side in the same run, of the standard
    library's threaded server it replaced, serving the same bytes: `rounds` alternating rounds
    of scrapes/rounds GETs per server and encoding, each over one keep-alive connection."""
    context = Context(
        id="prometheus", settings=KpodSettings(), cgroups=CgroupIndex("/nonexistent"), self_metrics=SelfMetrics()
    )
    exporter = PrometheusExporter(context, PrometheusConfig(endpoint="127.0.0.1:0"))
    exporter.start()
    stdlib = ThreadingHTTPServer(("127.0.0.1", 0), _StdlibHandler)
    stdlib.daemon_threads = True
    threading.Thread(target=stdlib.serve_forever, daemon=True).start()
    try:
        exporter.export(node_batch(pods))
        _StdlibHandler.bodies = {gz: joined(exporter.exposition.body(TEXT, gz)) for gz in (False, True)}
        servers = {"": exporter.address, "stdlib_": (str(stdlib.server_address[0]), int(stdlib.server_address[1]))}
        results: dict[str, float] = {"scrapes": scrapes}
        for label, headers in (("plain", {}), ("gzip", {"Accept-Encoding": "gzip"})):
            samples: dict[str, list[float]] = {name: [] for name in servers}
            for _ in range(rounds):
                for name, address in servers.items():
                    samples[name] += _scrapes(address, headers, max(1, scrapes // rounds))
            for name, taken in samples.items():
                taken.sort()
                results[f"{name}{label}_p50_ms"] = statistics.median(taken) * 1000
                results[f"{name}{label}_p99_ms"] = taken[int(len(taken) * 0.99) - 1] * 1000
        return results
    finally:
        exporter.shutdown()
        stdlib.shutdown()
        stdlib.server_close()


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def idle_rss(profile_lines: str, label: str, cycles_s: float = IDLE_S) -> float:
    """RSS (MiB) of a real agent process after it ran cycles for a few seconds."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "config.yaml"
        config.write_text(
            f"kpod: {{{profile_lines}, poll_interval: 500ms, discovery: {{mode: local}}}}\n"
            f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("KPOD_")}
        process = subprocess.Popen(
            [sys.executable, "-m", "kpod.cli", "run", "--config", str(config), "--log-level", "warning"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1).read()
                    break
                except Exception:
                    time.sleep(0.1)
            time.sleep(cycles_s)
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
            rss = _rss_kib(process.pid) / 1024
        finally:
            process.terminate()
            process.wait(timeout=10)
    print(f"  idle RSS ({label}): {rss:.1f} MiB", file=sys.stderr)
    return rss


def measure(pods: int = 110) -> Measured:
    render = render_times(pods)
    return Measured(
        ".venv/bin/python -m bench.core",
        {
            "pods": pods,
            "render": render,
            "scrape": scrape_latency(pods),
            "rss_mib": {
                "minimal": idle_rss("profile: minimal", "minimal profile"),
                "standard": idle_rss("profile: standard", "standard profile"),
            },
        },
    )


def _previous_rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """The previous renderer beside the current one (runs before it was kept have no such figures)."""
    changed, third, least = r["all_changed_ms"], r["third_changed_ms"], r.get("all_changed_min_ms", {})
    if "text_previous" not in changed:
        return []
    wall, third_wall = r["all_changed_wall_ms"], r["third_changed_wall_ms"]
    return [
        ("the same renders by the renderer before issue 18 (bench/render_previous.py): CPU median (min); "
         "current / previous", "-",
         f"{changed['text_previous']:.1f} ms ({least['text_previous']:.1f} ms); "
         f"{changed['text'] / changed['text_previous']:.2f}", True),
        ("the same renders, wall-time medians: current / previous", "-",
         f"{wall['text']:.1f} / {wall['text_previous']:.1f} ms", True),
        ("a third of the series changed, CPU median: previous renderer; wall-time medians: current / previous",
         "-", f"{third['text_previous']:.1f} ms; {third_wall['text']:.1f} / {third_wall['text_previous']:.1f} ms",
         True),
    ]  # fmt: skip


def _churn_rows(r: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """A cycle where a pod was replaced beside one of the same pods (runs before it was measured
    have no such figures)."""
    churn = r.get("churn_ms")
    if not churn:
        return []
    return [
        (f"a pod replaced by another (every value changed), CPU median: {label}; the same pods' cycle",
         "<= 1.15 x the same pods'", f"{churn[name + '_churn']:.1f} ms; {churn[name + '_steady']:.1f} ms "
         f"({churn[name + '_churn'] / churn[name + '_steady']:.2f})",
         churn[name + "_churn"] <= 1.15 * churn[name + "_steady"] if name != "text_previous" else None)
        for name, label in (("text", "OpenMetrics"), ("protobuf", "protobuf (both)"),
                            ("text_previous", "OpenMetrics, the renderer before issue 18"))
    ]  # fmt: skip


def render(data: dict[str, Any]) -> str:
    r, scrape, rss = data["render"], data["scrape"], data["rss_mib"]
    changed, third, least = r["all_changed_ms"], r["third_changed_ms"], r.get("all_changed_min_ms", {})
    table = _table(
        [
            ("render OpenMetrics (what Prometheus asks for), every value changed (worst case), CPU median (min)",
             f"<= {RENDER_TARGET_MS:g} ms", f"{changed['text']:.1f} ms ({least.get('text', float('nan')):.1f} ms)",
             changed["text"] <= RENDER_TARGET_MS),
            *_previous_rows(r),
            ("render OpenMetrics, a third of the series changed (typical cycle), CPU median",
             f"<= {RENDER_TARGET_MS:g} ms", f"{third['text']:.1f} ms", third["text"] <= RENDER_TARGET_MS),
            ("render OpenMetrics and text 0.0.4 (two scrapers, one of each), every value changed, median", "-",
             f"{changed['text_both']:.1f} ms", True),
            ("render protobuf, histograms: both (native + classic), every value changed, median",
             "about OpenMetrics'", f"{changed['protobuf']:.1f} ms ({changed['protobuf'] / changed['text']:.2f} of "
             "OpenMetrics)", changed["protobuf"] <= changed["text"] * 1.25),
            ("render protobuf, histograms: native, every value changed, median",
             "<= OpenMetrics'",
             f"{changed['protobuf_native']:.1f} ms ({changed['protobuf_native'] / changed['text']:.2f} of OpenMetrics)",
             changed["protobuf_native"] <= changed["text"] * 1.1),
            ("render + gzip as a Prometheus scrape asks, every value changed, median: OpenMetrics / protobuf "
             "both / protobuf native", "protobuf <= OpenMetrics",
             f"{changed['text_gzip']:.1f} / {changed['protobuf_gzip']:.1f} / {changed['protobuf_native_gzip']:.1f} ms",
             max(changed["protobuf_gzip"], changed["protobuf_native_gzip"]) <= changed["text_gzip"]),
            ("render protobuf (both / native), a third of the series changed, median", "-",
             f"{third['protobuf']:.1f} / {third['protobuf_native']:.1f} ms", True),
            *_churn_rows(r),
            ("scrape latency over loopback, plain, p50 / p99", f"p50 <= {SCRAPE_TARGET_MS:g} ms",
             f"{scrape['plain_p50_ms']:.2f} / {scrape['plain_p99_ms']:.2f} ms",
             scrape["plain_p50_ms"] <= SCRAPE_TARGET_MS),
            ("scrape latency over loopback, gzip, p50 / p99", f"p50 <= {SCRAPE_TARGET_MS:g} ms",
             f"{scrape['gzip_p50_ms']:.2f} / {scrape['gzip_p99_ms']:.2f} ms",
             scrape["gzip_p50_ms"] <= SCRAPE_TARGET_MS),
            *[
                (f"the same, {label}, on the standard library's threaded server (the server before issue 19), "
                 "p50 / p99", "reference",
                 f"{scrape[f'stdlib_{label}_p50_ms']:.2f} / {scrape[f'stdlib_{label}_p99_ms']:.2f} ms", None)
                for label in ("plain", "gzip") if f"stdlib_{label}_p50_ms" in scrape
            ],
            *[
                (f"idle agent RSS, Prometheus exporter only, {profile} profile", f"<= {RSS_TARGET_MIB:g} MiB",
                 f"{mib:.1f} MiB", mib <= RSS_TARGET_MIB)
                for profile, mib in rss.items()
            ],
        ]
    )  # fmt: skip
    pb, pb_gz = r["protobuf_bytes"], r["protobuf_gzip_bytes"]
    renderers = "four" if "text_previous" in changed else "three"
    return f"""## Core: exposition, scrape, memory

Node-sized batch (bench/synthetic.py): {data["pods"]} pods x the comprehensive profile's series =
{r["series"]:,} series ({r["histograms"]:,} of them histograms with {r["buckets"]} buckets),
{r["bytes"] / 1e6:.1f} MB of text, {r["gzip_bytes"] / 1e6:.2f} MB gzipped (level 1); protobuf
{pb["both"] / 1e6:.2f} MB with native and classic buckets, {pb["native"] / 1e6:.2f} MB native only
({pb_gz["both"] / 1e6:.2f} / {pb_gz["native"] / 1e6:.2f} MB gzipped).  Render: CPU time, median over
{r["rounds"]} renders, the {renderers} renderers taking turns on each batch.  Scrape: {scrape["scrapes"]} GETs of
{_scrapes_how(scrape)}.  Idle RSS: a `kpod-metrics run`
process after {IDLE_S:g} s of cycles.

{table}
"""


def _scrapes_how(scrape: dict[str, float]) -> str:
    if "stdlib_plain_p50_ms" not in scrape:  # a run before the side-by-side servers
        return "/metrics per encoding over one keep-alive loopback connection"
    return ("/metrics per encoding and server over keep-alive loopback connections, the agent's server and the\n"
            "standard library's taking turns in rounds")  # fmt: skip


def _table(rows: list[tuple[str, str, str, bool | None]]) -> str:
    lines = ["| figure | target | measured | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {target} | {measured} | {_met(ok)} |" for name, target, measured, ok in rows]
    return "\n".join(lines)


def _met(ok: bool | None) -> str:
    return "" if ok is None else "yes" if ok else "**no**"


if __name__ == "__main__":
    print(render(measure().data))
