"""Kernel histograms over OTLP: the run-queue latency buckets the cpu_sched BPF map held (as
bpftool dumps the map) arrive at a real gRPC receiver unchanged, as explicit buckets (counts,
bounds, sum, count) or as an exponential histogram of scale 0 (zero bucket and buckets), with
the pod's resource."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from kernel_util import Workload, cgroup_tree, context, kernel_test, points_for, workloads
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.processor import K8sAttributesProcessor
from kpod.receivers.cpu_sched import CpuSchedReceiver
from otlp_receiver import GrpcReceiver, as_exponential, assert_delivered_equal, flatten, make_exporter, total_points

from kpod.component import EmptyConfig
from kpod.kernel import bpfinfo
from kpod.kernel.ebpf import CGROUP_KEY_FIELD
from kpod.model import Batch, HistogramValue

pytestmark = kernel_test


def bpftool_slots(map_id: int, cgroup_id: int) -> tuple[list[int], int]:
    """(slots, sum in ns) of a cgroup's run-queue histogram as bpftool reads the map (BTF-formatted
    JSON): what the kernel holds, read by another program than the agent."""
    dumped = json.loads(subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)],
                                       capture_output=True, text=True, check=True).stdout)  # fmt: skip
    for entry in dumped:
        formatted = entry.get("formatted", entry)
        if int(formatted["key"]["cgroup_id"]) == cgroup_id:
            runq = formatted["value"]["runq"]
            return [int(v) for v in runq["slots"]], int(runq["sum"])
    raise AssertionError(f"cgroup {cgroup_id} not in map {map_id}")


@pytest.mark.parametrize("histograms", ["explicit", "exponential"])
def test_runqueue_histogram_arrives_as_the_kernel_held_it(histograms: str) -> None:
    hog = "end = time.monotonic() + 0.5\nwhile time.monotonic() < end:\n    pass\nprint('done', flush=True)\n"
    cpu = min(os.sched_getaffinity(0))
    receiver_context = context("cpu_sched")
    receiver = CpuSchedReceiver(receiver_context, EmptyConfig())
    # k8sattributes in local mode: the pod's resource attributes from the kubepods path.
    settings = receiver_context.settings
    settings.discovery.mode = "local"
    settings.node_name = "node-k"
    processor = K8sAttributesProcessor(receiver_context, K8sAttributesConfig())
    collector = GrpcReceiver().start()
    exporter = make_exporter(collector, "grpc", histograms=histograms)
    with cgroup_tree() as tree, workloads() as procs:
        pod = tree.pod()
        receiver.start()
        try:
            hogs = [Workload(hog, cpu=cpu) for _ in range(2)]
            procs.extend(hogs)
            for h in hogs:
                tree.move(h.pid, pod.container_dir)
            for h in hogs:
                h.go()
            for h in hogs:
                assert h.readline() == "done"
            receiver_context.cgroups.refresh()
            assert receiver.loaded is not None
            map_id = bpfinfo.map_id(receiver.loaded.obj.maps["sched_cgroups"])
            # The hogs are done (blocked reading stdin), but a last wakeup may still land: a
            # collection between two equal dumps read what the map holds.
            for _ in range(10):
                before = bpftool_slots(map_id, pod.container_id)
                raw = receiver.collect()
                if bpftool_slots(map_id, pod.container_id) == before:
                    break
                time.sleep(0.2)
            map_slots, map_sum = before
        finally:
            receiver.shutdown()
        (point,) = points_for(raw, "kpod.cpu.runqueue.latency", pod.container_id)
        hist = point.value
        assert isinstance(hist, HistogramValue) and hist.count > 0
        kernel_counts = hist.counts  # as read from the map, before any processing
        # Only this pod's points: other cgroups on the machine (other test runs) may come and go,
        # and two of them outside kubepods would be the same series without pod attributes.
        ours = [p for p in raw.points if p.cgroup is not None and p.cgroup.id == pod.container_id]
        batch = processor.process(Batch(ours, raw.time_ns))
        try:
            exporter.export(batch)
            got = collector.wait_for(lambda got: total_points(got) >= len(batch))
            time.sleep(0.1)
            assert_delivered_equal(batch, collector.requests(), histograms)
            (sent,) = [
                r
                for r in flatten(collector.requests())
                if r["name"] == "kpod.cpu.runqueue.latency" and r["resource"].get("k8s.pod.uid") == pod.uid
            ]
            assert list(kernel_counts) == map_slots  # the receiver read the map as bpftool does
            if histograms == "explicit":
                bounds, counts, total, count, _, _ = sent["value"]
                assert list(counts) == map_slots
                assert bounds == hist.bounds
            else:
                got = sent["value"]
                assert got.zero_count == map_slots[0] and got.zero_threshold == hist.bounds[0] and got.scale == 0
                assert got.buckets() == as_exponential(hist)
                assert sum(got.buckets().values()) + got.zero_count == sum(map_slots)
                total, count = got.sum, got.count
            assert count == sum(map_slots)
            assert total == pytest.approx(map_sum / 1e9)
            assert sent["unit"] == "s" and sent["resource"]["k8s.node.name"] == "node-k"
            assert got
        finally:
            exporter.shutdown()
            collector.stop()


def test_bpf_self_metrics_and_map_fill_in_debug_status(tmp_path: Path, clean_env: dict[str, str]) -> None:
    """kpod_bpf_programs_loaded counts the attached programs; /debug/status lists every loaded
    map with its capacity (kpod.bpf.map_max_entries for per-cgroup maps) and fill level."""
    from kpod.agent import build_cgroup_index
    from kpod.config import load_config
    from kpod.kernel.ebpf import REGISTRY
    from kpod.pipeline import Pipeline

    path = tmp_path / "config.yaml"
    path.write_text(
        "kpod: {profile: custom, poll_interval: 1s, discovery: {mode: local}, bpf: {map_max_entries: 4096}}\n"
        "receivers: {cpu_sched: {}, bpf_maps: {}}\n"
        "exporters: {prometheus: {endpoint: '127.0.0.1:0'}}\n"
        "service: {pipelines: {metrics: {receivers: [cpu_sched, bpf_maps], exporters: [prometheus]}}}\n"
    )
    config = load_config(str(path), environ=clean_env)
    pipeline = Pipeline(config, build_cgroup_index(config))
    pipeline.start()
    try:
        pipeline.run_cycle()
        objects = [o for o in REGISTRY.objects() if o.name == "cpu_sched"]
        assert len(objects) == 1, "cpu_sched did not load"
        active = [r.program for r in objects[0].routes if r.active]
        # Every program the agent attached: cpu_sched's and the shared cgroup watch's.
        attached = sum(1 for o in REGISTRY.objects() for r in o.routes if r.active)
        assert {o.name for o in REGISTRY.objects()} == {"cpu_sched", "cgroups"}
        assert pipeline.self_metrics.get("kpod.bpf.programs.loaded") == attached > len(active) > 0
        for program in active:
            assert pipeline.self_metrics.get("kpod.bpf.programs.failed", (("program", program),)) == 0
        status = pipeline.status.snapshot()
        maps = {m["map"]: m for m in status["bpf_maps"] if m["object"] == "cpu_sched"}
        assert set(maps) == set(objects[0].map_names())
        # Its own maps (the cgroup watch's shared ones are reported under their owner, "cgroups").
        own = set(objects[0].map_names())
        cgroup_maps = [n for n, lay in objects[0].layouts.items() if n in own and lay.has_key_field(CGROUP_KEY_FIELD)]
        assert cgroup_maps
        for name in cgroup_maps:
            assert maps[name]["capacity"] == 4096
            assert 0 <= maps[name]["entries"] <= 4096
        details = status["receivers"]["cpu_sched"]["details"]
        assert details["loaded"] is True and set(details["routes"]) >= set(active)
    finally:
        pipeline.shutdown()
