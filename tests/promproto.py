"""Prometheus' metrics.proto as Python classes, compiled by protoc at test time.

The agent writes the protobuf exposition by hand (exporters/prometheus/protobuf.py); tests read
it back with these classes, generated from the official definitions (tests/proto/), so that a
mistake in our encoder cannot be mirrored by a decoder of our own.
"""

from __future__ import annotations

import functools
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any

PROTO_DIR = Path(__file__).resolve().parent / "proto"
PROTO = "io/prometheus/client/metrics.proto"
_TMP = tempfile.TemporaryDirectory(prefix="kpod-promproto-")


@functools.cache
def metrics_pb2() -> ModuleType:
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/timestamp.proto
    out = Path(_TMP.name)
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--python_out={out}", PROTO],
        check=True,
    )
    # Loaded under a name of its own: the package path starts with `io`, which is the stdlib's.
    spec = importlib.util.spec_from_file_location("prometheus_metrics_pb2", out / PROTO.replace(".proto", "_pb2.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The framing only (a varint length before each message); the messages are protobuf's."""
    shift = result = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def families(body: bytes) -> list[Any]:
    """The MetricFamily messages of a varint-delimited protobuf exposition."""
    pb2 = metrics_pb2()
    out, pos = [], 0
    while pos < len(body):
        length, pos = read_varint(body, pos)
        family = pb2.MetricFamily()
        family.ParseFromString(body[pos : pos + length])
        out.append(family)
        pos += length
    assert pos == len(body), "the last message runs past the end"
    return out


def native_buckets(spans: Any, deltas: Any) -> dict[int, int]:
    """Absolute counts by bucket index from spans and deltas, as metrics.proto defines them: the
    first span's offset is its start index, a later span's the gap after the previous one; each
    delta is the count minus the previous bucket's."""
    buckets: dict[int, int] = {}
    index, count, k = 0, 0, 0
    for span in spans:
        index += span.offset  # from 0 for the first span, from one past the previous span's end
        for _ in range(span.length):
            count += deltas[k]
            buckets[index] = count
            index += 1
            k += 1
    assert k == len(deltas), "spans and deltas disagree"
    return buckets
