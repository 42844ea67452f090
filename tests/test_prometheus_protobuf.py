"""The protobuf exposition, read back with classes protoc generates from Prometheus' own
metrics.proto (tests/promproto.py), and compared with the text exposition of the same batch.

Prometheus itself reads it in tests/test_e2e_prometheus.py (native histograms in PromQL).
"""

from __future__ import annotations

import gzip
import http.client
import itertools
import math
import random
from collections.abc import Iterator

import pytest
from helpers import histogram_count_families
from kpod.exporters.prometheus.exposition import Renderer
from kpod.exporters.prometheus.protobuf import (
    BOTH,
    CLASSIC,
    NATIVE,
    PROTOBUF_CONTENT_TYPE,
    ProtobufRenderer,
    histogram_message,
    native_indexes,
    varint,
    zigzag,
)
from kpod.exporters.prometheus.server import OPENMETRICS, PROTOBUF, TEXT, negotiate
from prometheus_client.parser import text_string_to_metric_families
from promproto import families, metrics_pb2, native_buckets, read_varint

from bench.synthetic import HIST_BOUNDS, node_batch
from kpod.model import Batch, CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource

RUNQ = MetricDef("kpod.cpu.runqueue.latency", Kind.HISTOGRAM, "s", "Run-queue latency.")
RESOURCE = Resource((("namespace", "a"), ("pod", "b"), ("container", "c"), ("node", "n")))
# Prometheus 2.42's Accept headers, without and with --enable-feature=native-histograms.
PROM_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
PROM_ACCEPT_NATIVE = (
    "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited,"
    "application/openmetrics-text;version=1.0.0;q=0.8,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def one_histogram(counts: tuple[int, ...], total: float = 1.5, bounds: tuple[float, ...] = HIST_BOUNDS) -> Batch:
    return Batch([Point(RUNQ, CgroupRef(1, "/"), (), HistogramValue(bounds, counts, total), RESOURCE)])


def labels_of(metric: object) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((pair.name, pair.value) for pair in metric.label))  # type: ignore[attr-defined]


def test_varint_and_zigzag_match_the_protobuf_runtime() -> None:
    """Our framing primitives against protobuf's own encoding of the same numbers."""
    pb2 = metrics_pb2()
    for n in (0, 1, 127, 128, 300, 2**21, 2**35 + 7, 2**63 - 1):
        assert pb2.Bucket(cumulative_count=n).SerializeToString() == b"\x08" + varint(n)
        assert read_varint(varint(n), 0) == (n, len(varint(n)))
    for n in (0, -1, 1, -2, 63, -64, 2**30, -(2**31)):  # sint32 (span offsets)
        assert pb2.BucketSpan(offset=n).SerializeToString() == b"\x08" + varint(zigzag(n))
    for n in (0, -1, 2**40, -(2**40), 2**63 - 1, -(2**63)):  # sint64 (deltas), unpacked as proto2 writes them
        assert pb2.Histogram(positive_delta=[n]).SerializeToString() == b"\x68" + varint(zigzag(n))


def test_node_exposition_equals_the_text_exposition() -> None:
    """Every series of a node-sized batch, decoded by the official classes, has the name, type,
    help, labels and values of the text exposition; histograms carry the classic buckets of the
    text and native buckets holding the same counts."""
    batch = node_batch(pods=12)
    text, _, text_series = Renderer().render(batch)
    body, series = ProtobufRenderer(BOTH).render(batch)
    assert series == text_series
    pb2 = metrics_pb2()
    expected = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            expected[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    got = {}
    decoded = families(body)
    assert len(decoded) == len({p.metric for p in batch.points})
    for family in decoded:
        metric_type = pb2.MetricType.Name(family.type)
        assert family.help.startswith("Synthetic ")
        for metric in family.metric:
            labels = labels_of(metric)
            if metric_type == "COUNTER":
                got[(family.name, labels)] = metric.counter.value
            elif metric_type == "GAUGE":
                got[(family.name, labels)] = metric.gauge.value
            else:
                assert metric_type == "HISTOGRAM"
                h = metric.histogram
                got[(family.name + "_count", labels)] = h.sample_count
                got[(family.name + "_sum", labels)] = h.sample_sum
                for bucket in h.bucket:
                    got[(family.name + "_bucket", tuple(sorted((*labels, ("le", repr(bucket.upper_bound))))))] = (
                        bucket.cumulative_count
                    )
                got[(family.name + "_bucket", tuple(sorted((*labels, ("le", "+Inf")))))] = h.sample_count
                # Native: the same counts, bucket by bucket.
                assert h.schema == 0 and h.zero_threshold == HIST_BOUNDS[0]
                natives = native_buckets(h.positive_span, h.positive_delta)
                cumulative = [b.cumulative_count for b in h.bucket] + [h.sample_count]
                per_bucket = [cumulative[0]] + [b - a for a, b in itertools.pairwise(cumulative)]
                assert h.zero_count == per_bucket[0]
                for k, count in enumerate(per_bucket[1:], start=1):
                    index = round(math.log2(HIST_BOUNDS[k])) if k < len(HIST_BOUNDS) else 6
                    assert natives.get(index, 0) == count, (family.name, k)
                assert h.zero_count + sum(natives.values()) == h.sample_count
    # The text renders `le` as Python's repr without a trailing .0 for integers: compare floats.
    normalise = {
        (name, tuple((k, repr(float(v)) if k == "le" and v != "+Inf" else v) for k, v in labels)): value
        for (name, labels), value in expected.items()
    }
    assert got == normalise


@pytest.mark.parametrize("mode", [BOTH, NATIVE, CLASSIC])
def test_the_setting_chooses_the_buckets(mode: str) -> None:
    counts = (4, 0, 2, 3) + (0,) * (len(HIST_BOUNDS) - 4) + (5,)  # zero bucket, two buckets, +Inf
    ((family,),) = [families(ProtobufRenderer(mode).render(one_histogram(counts))[0])]
    h = family.metric[0].histogram
    assert (h.sample_count, h.sample_sum) == (14, 1.5)
    assert len(h.bucket) == (0 if mode == NATIVE else len(HIST_BOUNDS))
    if mode == CLASSIC:
        assert not h.HasField("schema") and not h.positive_span and h.zero_threshold == 0
        return
    assert h.HasField("schema") and h.schema == 0
    assert (h.zero_threshold, h.zero_count) == (2.0**-20, 4)
    # (2^-19, 2^-18] holds 2, (2^-18, 2^-17] holds 3; the +Inf bucket, above 32 s, is index 6.
    natives = native_buckets(h.positive_span, h.positive_delta)
    assert {i: c for i, c in natives.items() if c} == {-18: 2, -17: 3, 6: 5}
    assert [(s.offset, s.length) for s in h.positive_span] == [(-18, 25)]


def test_empty_buckets_inside_the_range_are_zero_deltas_of_one_span() -> None:
    counts = [0] * (len(HIST_BOUNDS) + 1)
    for k, c in ((2, 7), (4, 1), (7, 2), (11, 9)):  # gaps of 1, 2 and 3 empty buckets
        counts[k] = c
    ((family,),) = [families(ProtobufRenderer(NATIVE).render(one_histogram(tuple(counts)))[0])]
    h = family.metric[0].histogram
    assert [(s.offset, s.length) for s in h.positive_span] == [(-18, 10)]
    assert {i: c for i, c in native_buckets(h.positive_span, h.positive_delta).items() if c} == {
        -18: 7, -16: 1, -13: 2, -9: 9}  # fmt: skip
    assert list(h.positive_delta) == [7, -7, 1, -1, 0, 2, -2, 0, 0, 9]
    # Nothing observed above the zero bucket: no span, no delta.
    ((family,),) = [families(ProtobufRenderer(NATIVE).render(one_histogram((5,) + (0,) * len(HIST_BOUNDS)))[0])]
    h = family.metric[0].histogram
    assert not h.positive_span and not h.positive_delta and h.zero_count == 5 == h.sample_count


def test_random_histograms_round_trip() -> None:
    """Any counts: what the official classes decode is what went in."""
    rng = random.Random(18)
    for _ in range(200):
        counts = tuple(rng.choice((0, 0, 0, 1, rng.randrange(10**9))) for _ in range(len(HIST_BOUNDS) + 1))
        ((family,),) = [families(ProtobufRenderer(NATIVE).render(one_histogram(counts))[0])]
        h = family.metric[0].histogram
        natives = native_buckets(h.positive_span, h.positive_delta)
        want = {k - 20: c for k, c in enumerate(counts) if k and c}
        assert {i: c for i, c in natives.items() if c} == want
        assert (h.zero_count, h.sample_count) == (counts[0], sum(counts))


def decoded_histograms(body: bytes) -> list[object]:
    return [metric.histogram for family in families(body) for metric in family.metric]


def reference(value: HistogramValue, mode: str) -> object:
    """What histogram_message() writes (every varint minimal, fields in metrics.proto's order),
    decoded by the official classes."""
    message = metrics_pb2().Histogram()
    first = native_indexes(value.bounds) if mode != CLASSIC else None
    message.ParseFromString(histogram_message(value, mode, first))
    return message


@pytest.mark.parametrize("mode", [BOTH, NATIVE, CLASSIC])
def test_families_encoded_at_once_decode_as_histogram_message_writes(mode: str) -> None:
    """The renderer encodes a whole histogram family at once (histogram_block.py: fixed-width
    varints, its own field order); decoded by the official classes, every series must be the
    message the series-by-series histogram_message() writes, whatever the counts: empty, only
    the zero bucket, one bucket, the +Inf bucket, counts beyond 4-byte varints (the 8-byte
    layout) and beyond 8-byte ones (series by series), a short or long count tuple."""
    rng = random.Random(28)
    # Families of all sizes, each of one magnitude (a family's layout is chosen by its largest
    # count) or mixed.
    for group_of_shapes in histogram_count_families(rng, len(HIST_BOUNDS) + 1):
        values = [HistogramValue(HIST_BOUNDS, counts, rng.random()) for counts in group_of_shapes]
        batch = Batch(
            [Point(RUNQ, CgroupRef(i, "/"), (), value, Resource((("pod", f"p{i}"),))) for i, value in enumerate(values)]
        )
        decoded = decoded_histograms(ProtobufRenderer(mode).render(batch)[0])
        assert decoded == [reference(value, mode) for value in values]


def test_a_family_where_some_series_changed_is_the_family_encoded_anew() -> None:
    """Series that did not change keep their bytes and the changed ones are encoded again in
    place: the exposition decodes as the one a fresh renderer writes (the bytes may differ: a
    family encoded at once writes all of its varints at the width its largest count needs)."""
    rng = random.Random(7)
    renderer = ProtobufRenderer(BOTH)
    batch = node_batch(pods=20, seed=1)
    renderer.render(batch)
    for fraction in (0.0, 0.1, 0.5, 0.9):
        points = list(batch.points)
        for i, point in enumerate(points):
            if isinstance(point.value, HistogramValue) and rng.random() < fraction:
                counts = tuple(rng.randrange(2**30) if c else 0 for c in point.value.counts)  # 8-byte varints
                points[i] = Point(point.metric, point.cgroup, point.attributes, HistogramValue(
                    point.value.bounds, counts, point.value.sum), point.resource)  # fmt: skip
        batch = Batch(points)
        body = renderer.render(batch)[0]
        assert families(body) == families(ProtobufRenderer(BOTH).render(batch)[0]), fraction
        assert renderer.render(batch)[0] == body  # nothing changed: the same bytes


def test_a_histogram_without_native_form_keeps_its_classic_buckets() -> None:
    bounds = (0.001, 0.01, 0.1, 1.0)  # not powers of two
    assert native_indexes(bounds) is None and native_indexes(HIST_BOUNDS) == -19
    ((family,),) = [families(ProtobufRenderer(NATIVE).render(one_histogram((1, 2, 3, 4, 5), bounds=bounds))[0])]
    h = family.metric[0].histogram
    assert [b.cumulative_count for b in h.bucket] == [1, 3, 6, 10] and h.sample_count == 15
    assert not h.HasField("schema") and not h.positive_span


def test_unchanged_series_are_reused_and_changed_ones_are_not() -> None:
    renderer = ProtobufRenderer(BOTH)
    first = node_batch(pods=3, seed=1)
    body, _ = renderer.render(first)
    assert renderer.render(first)[0] == body
    second = node_batch(pods=3, seed=2)
    fresh, _ = ProtobufRenderer(BOTH).render(second)
    assert renderer.render(second)[0] == fresh != body
    # A histogram whose counts stayed and whose sum moved (or the other way round) is new.
    counts = (0, 3, 1) + (0,) * (len(HIST_BOUNDS) - 2)
    for changed in (one_histogram(counts, total=2.5), one_histogram((0, 3, 2, *counts[3:]), total=2.5)):
        renderer.render(one_histogram(counts, total=1.5))
        assert renderer.render(changed)[0] == ProtobufRenderer(BOTH).render(changed)[0]


def test_hostile_label_values_stay_valid_utf8() -> None:
    metric = MetricDef("kpod.fake", Kind.GAUGE, "1", "Fake.")
    hostile = "x\udcff\udcfe"  # bytes that were not UTF-8, decoded with surrogateescape
    resource = Resource((("namespace", 'a"\n'), ("pod", hostile)))
    body, _ = ProtobufRenderer().render(Batch([Point(metric, CgroupRef(1, "/"), (), 1.0, resource)]))
    (family,) = families(body)
    assert dict(labels_of(family.metric[0])) == {"namespace": 'a"\n', "pod": "x\ufffd\ufffd"}


@pytest.mark.parametrize(
    ("accept", "protobuf", "expected"),
    [
        ("", True, TEXT),
        ("*/*", True, TEXT),
        (PROM_ACCEPT, True, OPENMETRICS),
        (PROM_ACCEPT_NATIVE, True, PROTOBUF),
        (PROM_ACCEPT_NATIVE, False, OPENMETRICS),  # histograms: classic offers no protobuf
        ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=text", True, TEXT),
        ("application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited;q=0.2,"
         "text/plain;q=0.5", True, TEXT),
        ("application/openmetrics-text;q=0,text/plain", True, TEXT),
        ("application/json", True, TEXT),
        ("text/plain;q=nan, application/openmetrics-text;q=0.1", True, OPENMETRICS),
    ],
)  # fmt: skip
def test_negotiation(accept: str, protobuf: bool, expected: str) -> None:
    assert negotiate(accept, "", protobuf)[0] == expected


def get(address: tuple[str, int], path: str, headers: dict[str, str]) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(*address, timeout=10)
    connection.request("GET", path, headers=headers)
    response = connection.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    connection.close()
    return response


@pytest.fixture
def exporter() -> Iterator[object]:
    from kpod.exporters.prometheus.config import PrometheusConfig
    from kpod.exporters.prometheus.exporter import PrometheusExporter

    from kpod.cgroup.index import CgroupIndex
    from kpod.component import Context
    from kpod.selfmetrics import SelfMetrics
    from kpod.settings import KpodSettings

    context = Context("prometheus", KpodSettings(), CgroupIndex("/nonexistent"), SelfMetrics())
    instance = PrometheusExporter(context, PrometheusConfig(endpoint="127.0.0.1:0"))
    instance.start()
    yield instance
    instance.shutdown()


def test_a_protobuf_scrape(exporter: object) -> None:
    """Over HTTP, as Prometheus with native histograms asks: the protobuf body, gzipped."""
    batch = node_batch(pods=2)
    exporter.export(batch)  # type: ignore[attr-defined]
    response = get(exporter.address, "/metrics", {"Accept": PROM_ACCEPT_NATIVE, "Accept-Encoding": "gzip"})  # type: ignore[attr-defined]
    assert response.status == 200
    assert response.getheader("Content-Type") == PROTOBUF_CONTENT_TYPE
    body = gzip.decompress(response.body)  # type: ignore[attr-defined]
    assert body == ProtobufRenderer(BOTH).render(batch)[0]
    assert sum(len(f.metric) for f in families(body)) == len(batch)
    plain = get(exporter.address, "/metrics", {"Accept": PROM_ACCEPT})  # type: ignore[attr-defined]
    assert plain.getheader("Content-Type").startswith("application/openmetrics-text")
