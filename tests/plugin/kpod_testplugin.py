"""A third-party plugin, as a package outside kpod would ship one (installed by the tests
through a dist-info entry_points.txt on sys.path, exactly how pip would expose it)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from kpod.component import Context, Exporter, Factory, Processor, Receiver
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point

CONSTANT = MetricDef("test.constant", Kind.COUNTER, "1", "A counter a plugin receiver emits.", ("source",))

# Every lifecycle call of the components below, in order: ("start"|"shutdown", component id).
EVENTS: list[tuple[str, str]] = []


@dataclass
class ConstantConfig:
    value: int = 42
    fail_collect: bool = False
    hang_collect_s: float = 0.0
    fail_start: bool = False
    # The `source` attribute; empty: the receiver's id (so two receivers give two series).
    source: str = ""


class ConstantReceiver(Receiver):
    metrics = (CONSTANT,)

    def start(self) -> None:
        EVENTS.append(("start", self.id))
        if self.config.fail_start:
            raise RuntimeError("configured to fail")

    def shutdown(self) -> None:
        EVENTS.append(("shutdown", self.id))

    collects = 0

    def collect(self) -> Batch:
        self.collects += 1
        if self.config.fail_collect:
            raise RuntimeError("boom")
        if self.config.hang_collect_s:
            time.sleep(self.config.hang_collect_s)
        # Charged to the first cgroup of the tree the agent watches (in tests, an empty one).
        workloads = self.context.cgroups.workloads()
        ref: CgroupRef | None = workloads[0] if workloads else None
        return Batch([Point(CONSTANT, ref, (("source", self.config.source or self.id),), self.config.value)])


@dataclass
class RecordingConfig:
    fail: bool = False


class RecordingProcessor(Processor):
    mutates_data = True

    def start(self) -> None:
        EVENTS.append(("start", self.id))

    def shutdown(self) -> None:
        EVENTS.append(("shutdown", self.id))

    def process(self, batch: Batch) -> Batch:
        if self.config.fail:
            raise RuntimeError("processor broke")
        for point in batch.points:
            point.attributes = (*point.attributes, ("seen_by", self.id))
        return batch


class RecordingExporter(Exporter):
    lock = threading.Lock()
    batches: list[Batch] = []

    def start(self) -> None:
        EVENTS.append(("start", self.id))

    def shutdown(self) -> None:
        EVENTS.append(("shutdown", self.id))

    def export(self, batch: Batch) -> None:
        with self.lock:
            RecordingExporter.batches.append(batch)


def _create_constant(context: Context, config: ConstantConfig) -> ConstantReceiver:
    return ConstantReceiver(context, config)


constant = Factory("constant", "receiver", ConstantConfig, _create_constant, "test plugin receiver")
recording_processor = Factory("recording", "processor", RecordingConfig, RecordingProcessor)
recording_exporter = Factory("recording", "exporter", RecordingConfig, RecordingExporter)

# A settings check of the plugin's own (entry point group kpod.settings_checks): refuses one
# node name, so that a test can see it run.
REFUSED_NODE_NAME = "refused-by-testplugin"


def check_node_name(node_name: str) -> None:
    if node_name == REFUSED_NODE_NAME:
        raise ValueError(f"the test plugin refuses node name {REFUSED_NODE_NAME!r}")
