"""The OTLP encoder's bytes, byte for byte, against the plain encoding of tests/otlp_reference.py:
caches, packing and request assembly may change how the bytes are made, never which bytes."""

from __future__ import annotations

import gzip
import random

import pytest
from helpers import histogram_count_families
from kpod.exporters.otlp.encoding import Encoder
from otlp_receiver import self_point, with_otel
from otlp_reference import reference_requests

from bench.synthetic import HIST_BOUNDS, node_batch
from kpod.kernel.ebpf import hist_bounds
from kpod.model import Batch, CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource

BASE = {"service.name": "kpod-metrics", "host.name": "node-x"}
START_NS = 1_600_000_000_000_000_000


def varied_batch(seed: int) -> Batch:
    """A node batch (OTel resources, every kind of point), and what is rarer: the agent's own
    points (no resource), two resources with Prometheus labels only (they become point
    attributes, overriding a point's own), a point's own start time, text to replace, histograms of bounds
    that are not powers of two, of counts beyond 4- and 8-byte varints, of short and long count
    tuples, and points of the wrong kind (skipped)."""
    rng = random.Random(seed)
    batch = with_otel(node_batch(pods=12, seed=seed))
    batch.time_ns = 1_700_000_000_123_456_789 + seed
    batch.add(self_point("kpod.test.agent.gauge", 3.5))
    bare = Resource((("cgroup", "/system.slice/x"), ("unit", "x\udcff.service")))
    counter = MetricDef("kpod.test.counter", Kind.COUNTER, "By", "Bytes \u00e9\udcff.", ("dir",))
    latency = MetricDef("kpod.test.latency", Kind.HISTOGRAM, "s", "Latency.")
    cgroup = CgroupRef(9, "/system.slice/x")
    batch.add(Point(counter, cgroup, (("dir", "rx"),), 7, bare))
    batch.add(Point(counter, cgroup, (("dir", "tx"), ("unit", "own")), 2.5, bare, start_time_ns=123_456))
    batch.add(Point(counter, cgroup, (), HistogramValue(HIST_BOUNDS, (1,) * 27, 1.0), bare))  # wrong kind
    batch.add(Point(latency, cgroup, (), 5, bare))  # wrong kind
    odd = (0.001, 0.005, 0.01, 0.5)
    batch.add(Point(latency, cgroup, (("route", "odd"),), HistogramValue(odd, (1, 0, 3, 0, 2), 0.25), bare))
    # Families (one bounds tuple each) whose counts need 4-byte, 8-byte and minimal varints.
    families = histogram_count_families(rng, len(HIST_BOUNDS) + 1)
    for name, counts_family in zip(("small", "mixed"), (families[0], families[1][:60]), strict=True):
        bounds = hist_bounds(20, 27)  # a tuple of its own
        for i, counts in enumerate(counts_family):
            value = HistogramValue(bounds, counts, rng.random())
            batch.add(Point(latency, cgroup, (("family", name), ("n", str(i))), value, bare, start_time_ns=i))
    # A second resource of Prometheus labels only: in the same ResourceMetrics as the first (no
    # OTel attributes either), its points told apart by its own labels.
    other = Resource((("cgroup", "/system.slice/y"),))
    for resource in (other, bare):
        batch.add(Point(counter, cgroup, (("dir", "rx"),), 11, resource))
        batch.add(Point(latency, cgroup, (("family", "small"), ("n", "0")), HistogramValue(HIST_BOUNDS, (1,) * 27, 2.0),
                        resource))  # fmt: skip
        batch.add(Point(latency, cgroup, (("route", "odd"),), HistogramValue(odd, (0, 1, 0, 0, 2), 0.5), resource))
    wide = hist_bounds(20, 27)
    for i in range(5):
        counts = tuple(rng.randrange(2**40) if 2 <= k <= 9 else 0 for k in range(27))
        batch.add(Point(latency, cgroup, (("family", "wide"), ("n", str(i))), HistogramValue(wide, counts, 9.5), bare))
    return batch


@pytest.mark.parametrize("histograms", ["explicit", "exponential"])
@pytest.mark.parametrize("max_points", [10**6, 333, 1])
def test_requests_are_the_plain_encoding_byte_for_byte(histograms: str, max_points: int) -> None:
    encoder = Encoder(BASE, START_NS, max_points, histograms)
    for seed in (1, 2, 1):  # a second snapshot, then the first again: what the caches kept
        batch = varied_batch(seed)
        expected = reference_requests(batch, BASE, START_NS, max_points, histograms)
        got = encoder.requests(batch)
        assert [points for _, points in got] == [points for _, points in expected]
        assert sum(points for _, points in got) == len(batch) - 2  # the two of the wrong kind
        for index, ((body, _), (want, _)) in enumerate(zip(got, expected, strict=True)):
            assert body == want, f"request {index}: first difference at byte {_first_difference(body, want)}"
    payloads = encoder.payloads(batch)
    assert [(gzip.decompress(p.gzipped), p.points) for p in payloads] == expected


def _first_difference(a: bytes, b: bytes) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
