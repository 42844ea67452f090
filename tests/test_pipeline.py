"""The pipeline: plugins through entry points, lifecycle order, isolation of failing receivers."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kpod.cgroup.index import CgroupIndex
from kpod.config import load_config
from kpod.model import Batch, CgroupRef
from kpod.pipeline import Pipeline
from kpod.registry import Registry


def plugin_config(tmp_path: Path, env: dict[str, str], receivers: dict[str, str], extra: str = "") -> Any:
    declared = "".join(f"  {rid}: {settings}\n" for rid, settings in receivers.items())
    text = (
        "kpod: {profile: custom, poll_interval: 1s}\n"
        f"receivers:\n{declared}"
        "processors:\n  recording/one: {}\n  recording/two: {}\n"
        "exporters:\n  recording/a: {}\n  recording/b: {}\n"
        "service:\n  pipelines:\n    metrics:\n"
        f"      receivers: [{', '.join(receivers)}]\n"
        "      processors: [recording/one, recording/two]\n"
        "      exporters: [recording/a, recording/b]\n" + extra
    )
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(str(path), environ=env)


def empty_index(tmp_path: Path) -> CgroupIndex:
    root = tmp_path / "cgroup"
    root.mkdir(exist_ok=True)
    return CgroupIndex(str(root))


def test_third_party_plugin_is_found_through_entry_points(test_plugin: Path) -> None:
    registry = Registry()
    assert "constant" in registry.types("receiver")
    assert "cgroup_cpu" in registry.types("receiver")  # built-ins register the same way
    factory = registry.factory("receiver", "constant")
    assert factory.type == "constant"


def test_lifecycle_order_and_fan_out(tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]) -> None:
    import kpod_testplugin as plugin

    config = plugin_config(tmp_path, clean_env, {"constant/x": "{value: 7}", "constant/y": "{value: 9}"})
    pipeline = Pipeline(config, empty_index(tmp_path))
    pipeline.start()
    batch = pipeline.run_cycle()
    pipeline.shutdown()
    pipeline.shutdown()  # idempotent
    assert plugin.EVENTS == [
        ("start", "recording/a"),
        ("start", "recording/b"),
        ("start", "recording/one"),
        ("start", "recording/two"),
        ("start", "constant/x"),
        ("start", "constant/y"),
        ("shutdown", "constant/y"),
        ("shutdown", "constant/x"),
        ("shutdown", "recording/two"),
        ("shutdown", "recording/one"),
        ("shutdown", "recording/b"),
        ("shutdown", "recording/a"),
    ]
    values = {p.attributes[0][1]: p.value for p in batch.points if p.metric.name == "test.constant"}
    assert values == {"constant/x": 7, "constant/y": 9}
    # Processors ran in order; both exporters got the same points.
    point = next(p for p in batch.points if p.metric.name == "test.constant")
    assert [v for k, v in point.attributes if k == "seen_by"] == ["recording/one", "recording/two"]
    first, second = plugin.RecordingExporter.batches
    assert len(first) == len(second) == len(batch)


def test_one_point_per_series_reaches_the_exporters(
    tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]
) -> None:
    """Two receivers emitting one series (as a pod's sandbox and pod-level cgroups do once
    labelled): the pipeline adds them up once, after the processors, for every exporter."""
    import kpod_testplugin as plugin

    receivers = {"constant/x": "{value: 7, source: same}", "constant/y": "{value: 9, source: same}",
                 "constant/z": "{value: 1}"}  # fmt: skip
    pipeline = Pipeline(plugin_config(tmp_path, clean_env, receivers), empty_index(tmp_path))
    pipeline.start()
    try:
        pipeline.run_cycle()
    finally:
        pipeline.shutdown()
    for exported in plugin.RecordingExporter.batches:
        values = {dict(p.attributes)["source"]: p.value for p in exported if p.metric.name == "test.constant"}
        assert values == {"same": 16, "constant/z": 1}
        assert sum(p.metric.name == "test.constant" for p in exported) == 2


def test_failing_receiver_does_not_stop_the_others(
    tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]
) -> None:
    config = plugin_config(
        tmp_path,
        clean_env,
        {"constant/good": "{value: 1}", "constant/bad": "{fail_collect: true}", "constant/dead": "{fail_start: true}"},
    )
    pipeline = Pipeline(config, empty_index(tmp_path))
    pipeline.start()
    try:
        for _ in range(3):
            batch = pipeline.run_cycle()
            pipeline.receivers[1].next_due = 0  # retry now instead of after the backoff
    finally:
        pipeline.shutdown()
    names = {p.attributes[0][1] for p in batch.points if p.metric.name == "test.constant"}
    assert names == {"constant/good"}
    errors = pipeline.self_metrics
    assert errors.get("kpod.collection.errors", (("receiver", "constant/bad"),)) == 3
    assert errors.get("kpod.collection.errors", (("receiver", "constant/dead"),)) == 1  # backing off
    assert errors.get("kpod.collection.errors", (("receiver", "constant/good"),)) == 0
    status = pipeline.status.receivers
    assert status["constant/bad"].state == "failing" and "boom" in status["constant/bad"].reason
    assert status["constant/dead"].state == "failing" and "configured to fail" in status["constant/dead"].reason
    assert status["constant/good"].state == "running"


def test_failing_processor_skips_the_export_and_is_counted(
    tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]
) -> None:
    import kpod_testplugin as plugin

    config = plugin_config(tmp_path, clean_env, {"constant/x": "{}"})
    config.processors[1].config.fail = True
    pipeline = Pipeline(config, empty_index(tmp_path))
    pipeline.start()
    try:
        pipeline.run_cycle()
        pipeline.run_cycle()
    finally:
        pipeline.shutdown()
    assert plugin.RecordingExporter.batches == []  # nothing half-processed went out
    assert pipeline.self_metrics.get("kpod.processor.errors", (("processor", "recording/two"),)) == 2
    assert not pipeline.status.first_cycle_done.is_set()


def test_hanging_receiver_is_abandoned_and_never_overlaps(
    tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]
) -> None:
    config = plugin_config(tmp_path, clean_env, {"constant/slow": "{hang_collect_s: 1.5}", "constant/fast": "{}"})
    pipeline = Pipeline(config, empty_index(tmp_path))
    pipeline.start()
    try:
        began = time.monotonic()
        batch = pipeline.run_cycle(timeout_s=0.3)
        assert time.monotonic() - began < 1.2  # the cycle did not wait for the hung receiver
        assert {p.attributes[0][1] for p in batch.points if p.metric.name == "test.constant"} == {"constant/fast"}
        slow = pipeline.receivers[0]
        assert slow.busy.is_set()
        slow.next_due = 0
        pipeline.run_cycle(timeout_s=0.3)  # still busy: not started a second time
        assert pipeline.self_metrics.get("kpod.collection.errors", (("receiver", "constant/slow"),)) == 1
        assert "timed out" in pipeline.status.receivers["constant/slow"].reason
    finally:
        pipeline.shutdown()


def test_receivers_collect_one_after_another_in_one_thread(
    tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]
) -> None:
    """The GIL serialises receivers' Python work, so a thread each costs CPU and overlaps little:
    an ordinary cycle collects every due receiver in one collecting thread (not the cycle's
    own), one at a time, each under its own name there."""
    receivers = {f"constant/r{i}": f"{{value: {i}}}" for i in range(4)}
    pipeline = Pipeline(plugin_config(tmp_path, clean_env, receivers), empty_index(tmp_path))
    seen: list[tuple[str, int, str]] = []  # (receiver, thread ident, thread name) as each collects
    active = [0, 0]  # (now, most at once)
    for running in pipeline.receivers:
        collect = running.receiver.collect

        def recording(collect=collect, rid=running.id) -> Batch:  # type: ignore[no-untyped-def]
            active[0] += 1
            active[1] = max(active)
            thread = threading.current_thread()
            seen.append((rid, thread.ident or 0, thread.name))
            try:
                time.sleep(0.005)
                return collect()
            finally:
                active[0] -= 1

        running.receiver.collect = recording  # type: ignore[method-assign]
    pipeline.start()
    try:
        batch = pipeline.run_cycle(timeout_s=5)
    finally:
        pipeline.shutdown()
    assert sorted(rid for rid, _, _ in seen) == sorted(receivers)
    assert len({ident for _, ident, _ in seen}) == 1 and seen[0][1] != threading.get_ident()
    assert [name for _, _, name in seen] == [f"collect-{rid}" for rid, _, _ in seen]
    assert active[1] == 1
    values = {p.attributes[0][1]: p.value for p in batch.points if p.metric.name == "test.constant"}
    assert values == {rid: float(rid[-1]) for rid in receivers}


def test_per_receiver_interval_keeps_last_values_between_collections(
    tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]
) -> None:
    config = plugin_config(
        tmp_path, clean_env, {"constant/hourly": "{value: 5, interval: 1h}", "constant/often": "{interval: 100ms}"}
    )
    pipeline = Pipeline(config, empty_index(tmp_path))
    pipeline.start()
    try:
        batches = []
        for _ in range(3):
            batches.append(pipeline.run_cycle())
            time.sleep(0.15)
    finally:
        pipeline.shutdown()
    hourly, often = (running.receiver for running in pipeline.receivers)
    assert (hourly.collects, often.collects) == (1, 3)  # type: ignore[attr-defined]
    for batch in batches:  # the hourly receiver's last values stay in every cycle's batch
        sources = {p.attributes[0][1] for p in batch.points if p.metric.name == "test.constant"}
        assert sources == {"constant/hourly", "constant/often"}


def test_series_of_a_removed_cgroup_leave_after_the_retention(
    tmp_path: Path, clean_env: dict[str, str], real_cgroup_root: str
) -> None:
    """Real cgroups: cgroup_cpu reports a cgroup while it exists, and not after rmdir."""
    import os

    text = (
        "kpod: {profile: custom, discovery: {mode: local}}\nreceivers:\n  cgroup_cpu: {}\n"
        "exporters:\n  prometheus: {endpoint: '127.0.0.1:0'}\n"
        "service:\n  pipelines:\n    metrics:\n      receivers: [cgroup_cpu]\n      processors: []\n"
        "      exporters: [prometheus]\n"
    )
    path = tmp_path / "config.yaml"
    path.write_text(text)
    config = load_config(str(path), environ=clean_env)
    leaf = os.path.join(real_cgroup_root, "kpod-test-series.scope")
    os.mkdir(leaf)
    pipeline = Pipeline(config, CgroupIndex(real_cgroup_root))
    pipeline.start()
    try:
        batch = pipeline.run_cycle()
        paths = {p.cgroup.path for p in batch.points if p.cgroup}
        relative = leaf[len(real_cgroup_root.rstrip("/")):]
        assert relative in paths
        leaf_id = os.stat(leaf).st_ino
        os.rmdir(leaf)
        # Gone: its last values are still exported for the retention...
        batch = pipeline.run_cycle()
        assert relative in {p.cgroup.path for p in batch.points if p.cgroup}
        assert pipeline.cgroups.ref(leaf_id) == CgroupRef(leaf_id, relative, gone=True)
        # ...and leave with the first cycle after it.
        pipeline.cgroups.gone_retention_s = 0.0
        batch = pipeline.run_cycle()
        assert relative not in {p.cgroup.path for p in batch.points if p.cgroup}
    finally:
        pipeline.shutdown()
        if os.path.isdir(leaf):
            os.rmdir(leaf)


@pytest.fixture
def real_cgroup_root() -> Any:
    """A cgroup2 directory of our own to use as the agent's root (never the host's tree)."""
    import os

    from kpod.cgroup.mounts import parse_mountinfo_cgroups

    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    with open("/proc/self/mountinfo") as handle:
        mounts = parse_mountinfo_cgroups(handle.read())
    if not mounts.unified:
        pytest.skip("no cgroup2 mount on this host")
    root = os.path.join(mounts.unified, f"kpod-test-{os.getpid()}")
    os.mkdir(root)
    try:
        yield root
    finally:
        for directory in sorted((d for d, _, _ in os.walk(root)), key=len, reverse=True):
            os.rmdir(directory)
        assert not os.path.exists(root)
