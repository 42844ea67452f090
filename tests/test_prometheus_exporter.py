"""The Prometheus side: naming rule, escaping, promtool-clean exposition, the HTTP endpoints."""

from __future__ import annotations

import gzip
import http.client
import json
import random
import subprocess

import pytest
from helpers import require_tools
from kpod.exporters.prometheus import exposition
from kpod.exporters.prometheus.exposition import Rendered, Renderer, escape_label_value, format_value
from kpod.exporters.prometheus.naming import family_name, prometheus_name
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from bench.synthetic import HIST_BOUNDS, node_batch
from kpod.component import Context
from kpod.model import Batch, CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource, merge_duplicates
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings
from kpod.status import AgentStatus


@pytest.mark.parametrize(
    ("name", "kind", "unit", "expected"),
    [
        ("kpod.cpu.runqueue.latency", Kind.HISTOGRAM, "s", "kpod_cpu_runqueue_latency_seconds"),
        ("kpod.cpu.context.switches", Kind.COUNTER, "1", "kpod_cpu_context_switches_total"),
        ("kpod.net.tcp.bytes.sent", Kind.COUNTER, "By", "kpod_net_tcp_bytes_sent_total"),
        ("kpod.syscall.count", Kind.COUNTER, "1", "kpod_syscall_count_total"),
        ("kpod.disk.read.bytes", Kind.COUNTER, "By", "kpod_disk_read_bytes_total"),
        ("kpod.fs.usage.bytes", Kind.GAUGE, "By", "kpod_fs_usage_bytes"),
        ("kpod.bpf.map.update.errors.total", Kind.COUNTER, "1", "kpod_bpf_map_update_errors_total"),
        ("kpod.cpu.usage.seconds", Kind.COUNTER, "s", "kpod_cpu_usage_seconds_total"),
        ("kpod.collection.duration", Kind.GAUGE, "s", "kpod_collection_duration_seconds"),
    ],
)
def test_naming_rule(name: str, kind: Kind, unit: str, expected: str) -> None:
    metric = MetricDef(name, kind, unit, "x")
    assert prometheus_name(metric) == expected
    assert family_name(metric) == expected.removesuffix("_total")


def test_label_values_are_escaped_and_cannot_inject_series() -> None:
    metric = MetricDef("kpod.test.value", Kind.GAUGE, "1", "help with \\ and\nnewline")
    hostile = 'a"b\\c\nkpod_fake{pod="x"} 1'
    bad_utf8 = b"caf\xe9".decode("utf-8", "surrogateescape")
    resource = Resource((("namespace", hostile), ("pod", bad_utf8), ("container", ""), ("node", "n")))
    batch = Batch([Point(metric, CgroupRef(5, "/x"), (("interface", "eth0"),), 1.0, resource)])
    text, _, series = Renderer().render(batch)
    assert series == 1
    families = list(text_string_to_metric_families(text.decode()))
    assert [f.name for f in families] == ["kpod_test_value"]
    (sample,) = families[0].samples
    assert sample.labels["namespace"] == hostile
    assert sample.labels["pod"] == "caf\ufffd"
    assert escape_label_value('x"y') == 'x\\"y'
    # The newline in the value is escaped: no line of the body starts a series of its own.
    assert not any(line.startswith(b"kpod_fake") for line in text.splitlines())


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    metric = MetricDef("kpod.cpu.runqueue.latency", Kind.HISTOGRAM, "s", "Run-queue latency.")
    counts = (0, 2, 3) + (0,) * (len(HIST_BOUNDS) - 3) + (1,)
    value = HistogramValue(HIST_BOUNDS, counts, 0.25)
    resource = Resource((("namespace", "a"), ("pod", "b"), ("container", "c"), ("node", "n")))
    text, _, _ = Renderer().render(Batch([Point(metric, CgroupRef(1, "/"), (), value, resource)]))
    (family,) = text_string_to_metric_families(text.decode())
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    # The kernel's bounds: powers of two seconds, from the zero bucket's 2^-20 s.
    assert buckets["9.5367431640625e-07"] == 0
    assert buckets["1.9073486328125e-06"] == 2
    assert buckets["3.814697265625e-06"] == 5
    assert buckets["0.5"] == buckets["32"] == 5
    assert buckets["+Inf"] == 6
    assert len(buckets) == len(HIST_BOUNDS) + 1
    count = next(s.value for s in family.samples if s.name.endswith("_count"))
    total = next(s.value for s in family.samples if s.name.endswith("_sum"))
    assert (count, total) == (6, 0.25)


def test_duplicate_label_sets_are_added_not_repeated() -> None:
    """A pod's sandbox and pod-level cgroups both carry container="": the pipeline's merge makes
    them one series, summed; the renderer never repeats a series, even when handed one twice."""
    metric = MetricDef("kpod.cpu.context.switches", Kind.COUNTER, "1", "Switches.")
    resource = Resource((("namespace", "a"), ("pod", "b"), ("container", ""), ("node", "n")))
    points = [Point(metric, CgroupRef(1, "/p"), (), 3, resource), Point(metric, CgroupRef(2, "/p/s"), (), 4, resource)]
    text, _, series = Renderer().render(Batch(merge_duplicates(points)))
    assert series == 1
    assert b'kpod_cpu_context_switches_total{namespace="a",pod="b",container="",node="n"} 7\n' in text
    unmerged, _, series = Renderer().render(Batch(points))
    assert series == 1 and unmerged.count(b"kpod_cpu_context_switches_total{") == 1


def test_node_sized_exposition_passes_promtool() -> None:
    require_tools("promtool")
    text, openmetrics, series = Renderer().render(node_batch(pods=20))
    assert series > 1000
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    # promtool prints lint findings (naming, missing help) and exits non-zero on any of them.
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.strip() == b"" and result.stderr.strip() == b"", result.stderr.decode()
    # promtool reads only the text format; the OpenMetrics body goes through a strict parser.
    families = list(openmetrics_families(openmetrics.decode()))
    assert sum(len(f.samples) for f in families) == text.count(b"\n") - 2 * len(families)


@pytest.fixture
def exporter() -> object:
    from kpod.exporters.prometheus.config import PrometheusConfig
    from kpod.exporters.prometheus.exporter import PrometheusExporter

    from kpod.cgroup.index import CgroupIndex

    status = AgentStatus(poll_interval_s=1.0)
    context = Context(
        id="prometheus", settings=KpodSettings(), cgroups=CgroupIndex("/nonexistent"),
        self_metrics=SelfMetrics(), status=status,
    )
    instance = PrometheusExporter(context, PrometheusConfig(endpoint="127.0.0.1:0"))
    instance.start()
    yield instance
    instance.shutdown()


def get(address: tuple[str, int], path: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
    connection = http.client.HTTPConnection(*address, timeout=10)
    connection.request("GET", path, headers=headers or {})
    response = connection.getresponse()
    response.body = response.read()  # type: ignore[attr-defined]
    connection.close()
    return response


def test_http_endpoints(exporter: object) -> None:
    address = exporter.address  # type: ignore[attr-defined]
    status: AgentStatus = exporter.context.status  # type: ignore[attr-defined]
    assert get(address, "/healthz").status == 200
    not_ready = get(address, "/readyz")
    assert not_ready.status == 503
    assert json.loads(not_ready.body)["ready"] is False  # type: ignore[attr-defined]

    exporter.export(node_batch(pods=3))  # type: ignore[attr-defined]
    status.cycle_done()
    assert get(address, "/readyz").status == 200
    plain = get(address, "/metrics")
    assert plain.status == 200
    assert plain.getheader("Content-Type").startswith("text/plain; version=0.0.4")
    spec_path = get(address, "/actuator/prometheus")
    assert spec_path.body == plain.body  # type: ignore[attr-defined]
    zipped = get(address, "/metrics", {"Accept-Encoding": "gzip"})
    assert zipped.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(zipped.body) == plain.body  # type: ignore[attr-defined]
    om = get(address, "/metrics", {"Accept": "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"})
    assert om.getheader("Content-Type").startswith("application/openmetrics-text")
    assert om.body.endswith(b"# EOF\n")  # type: ignore[attr-defined]
    assert b"# TYPE kpod_cpu_context_switches counter" in om.body  # type: ignore[attr-defined]
    assert b"# TYPE kpod_cpu_context_switches_total counter" in plain.body  # type: ignore[attr-defined]
    debug = json.loads(get(address, "/debug/status").body)  # type: ignore[attr-defined]
    assert debug["cycles"] == 1 and debug["series"] == len(node_batch(pods=3))
    assert get(address, "/nope").status == 404


def test_scrape_serves_the_cached_exposition(exporter: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each format is rendered and compressed at most once per cycle, whatever the number of
    scrapes; export() renders ahead what scrapes asked for lately, and only that."""
    from kpod.exporters.prometheus import exporter as exporter_module
    from kpod.exporters.prometheus import server as server_module
    from kpod.exporters.prometheus.protobuf import ProtobufRenderer

    calls = {"render": 0, "protobuf": 0, "gzip": 0}
    real_render, real_protobuf = Renderer.render_parts, ProtobufRenderer.render
    real_compress = server_module.gzipped_body

    def counted_render(self: Renderer, batch: Batch) -> Rendered:
        calls["render"] += 1
        return real_render(self, batch)

    def counted_protobuf(self: ProtobufRenderer, batch: Batch) -> tuple[bytes, int]:
        calls["protobuf"] += 1
        return real_protobuf(self, batch)

    def counted_compress(body: bytes | list[bytes]) -> bytes:
        calls["gzip"] += 1
        return real_compress(body)  # type: ignore[arg-type]

    monkeypatch.setattr(Renderer, "render_parts", counted_render)
    monkeypatch.setattr(ProtobufRenderer, "render", counted_protobuf)
    monkeypatch.setattr(server_module, "gzipped_body", counted_compress)
    batch = node_batch(pods=2)
    exporter.export(batch)  # type: ignore[attr-defined]
    assert calls == {"render": 1, "protobuf": 0, "gzip": 0}  # before any scrape: the text formats' samples
    expected = real_render(Renderer(), batch)
    text, openmetrics = expected.text(), expected.openmetrics()
    protobuf, _ = real_protobuf(ProtobufRenderer(), batch)
    address = exporter.address  # type: ignore[attr-defined]
    om = "application/openmetrics-text;version=1.0.0"
    pb = "application/vnd.google.protobuf;proto=io.prometheus.client.MetricFamily;encoding=delimited"

    def scrape_all() -> None:
        for _ in range(3):
            assert get(address, "/metrics").body == text  # type: ignore[attr-defined]
            assert gzip.decompress(get(address, "/metrics", {"Accept-Encoding": "gzip"}).body) == text  # type: ignore[attr-defined]
            assert get(address, "/metrics", {"Accept": om}).body == openmetrics  # type: ignore[attr-defined]
            zipped = get(address, "/metrics", {"Accept": om, "Accept-Encoding": "gzip"}).body  # type: ignore[attr-defined]
            assert gzip.decompress(zipped) == openmetrics
            assert get(address, "/metrics", {"Accept": pb}).body == protobuf  # type: ignore[attr-defined]

    scrape_all()
    # The first scrape of each kind rendered or compressed it; the others were served cached.
    assert calls == {"render": 1, "protobuf": 1, "gzip": 2}
    exporter.export(batch)  # type: ignore[attr-defined]
    # All five were asked for lately: rendered ahead, so that no scrape waits for a render.
    assert calls == {"render": 2, "protobuf": 2, "gzip": 4}
    scrape_all()
    assert calls == {"render": 2, "protobuf": 2, "gzip": 4}, "a scrape rendered or compressed"
    # Only protobuf asked for (the only scraper has native histograms on): text is not rendered.
    exporter.export(batch)  # type: ignore[attr-defined]
    monkeypatch.setattr(exporter_module, "RECENT_S", 0.0)
    for _ in range(2):
        get(address, "/metrics", {"Accept": pb})
    exporter.export(node_batch(pods=1))  # type: ignore[attr-defined]
    assert calls == {"render": 3, "protobuf": 4, "gzip": 6}
    assert get(address, "/metrics", {"Accept": pb}).body != protobuf  # type: ignore[attr-defined]




def test_a_body_made_only_to_be_gzipped_is_not_kept(exporter: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scraped only with gzip (as Prometheus scrapes), a cycle keeps the gzip and not the plain
    body it was made from; a scrape that then asks for a plain body gets it, rendered again."""
    renders = []
    real_render = Renderer.render_parts

    def counted_render(self: Renderer, batch: Batch) -> Rendered:
        renders.append(batch)
        return real_render(self, batch)

    monkeypatch.setattr(Renderer, "render_parts", counted_render)
    batch = node_batch(pods=2)
    expected = real_render(Renderer(), batch)
    text, openmetrics = expected.text(), expected.openmetrics()
    address = exporter.address  # type: ignore[attr-defined]
    om = {"Accept": "application/openmetrics-text;version=1.0.0"}
    exporter.export(batch)  # type: ignore[attr-defined]
    assert gzip.decompress(get(address, "/metrics", {**om, "Accept-Encoding": "gzip"}).body) == openmetrics  # type: ignore[attr-defined]
    exporter.export(batch)  # type: ignore[attr-defined]
    exposition = exporter.exposition  # type: ignore[attr-defined]
    assert set(exposition._bodies) == {("openmetrics", True)}
    assert len(renders) == 2
    assert gzip.decompress(get(address, "/metrics", {**om, "Accept-Encoding": "gzip"}).body) == openmetrics  # type: ignore[attr-defined]
    assert len(renders) == 2  # served as made
    assert get(address, "/metrics", om).body == openmetrics  # type: ignore[attr-defined]
    assert get(address, "/metrics").body == text  # type: ignore[attr-defined]
    assert len(renders) == 3  # rendered again once, for both plain bodies
    exporter.export(batch)  # type: ignore[attr-defined]
    assert set(exporter.exposition._bodies) == {("openmetrics", True), ("openmetrics", False), ("text", False)}  # type: ignore[attr-defined]


# Module constants, as receivers' metrics are: a renderer keeps what it knows of a family by its
# MetricDef, which compares by identity.
TRICKY_COUNTER = MetricDef("kpod.test.events", Kind.COUNTER, "1", "Events.", ("kind",))
TRICKY_GAUGE = MetricDef("kpod.test.level", Kind.GAUGE, "s", "Level.")
TRICKY_HISTOGRAM = MetricDef("kpod.test.latency", Kind.HISTOGRAM, "s", "Latency.", ("syscall",))


def _tricky_batch(rng: random.Random, cycle: int) -> Batch:
    """A batch with what the renderer's fast paths must not get wrong: series coming and going
    and changing order, resources rebuilt with the same labels, floats that are integral, not
    finite or huge, ints beyond 64 bits, sums of every kind, a histogram value in a counter and a
    number in a histogram family, a repeated series, short and long count tuples, other bounds,
    points without a resource, and label values with '%', quotes and bytes that are not UTF-8."""
    counter, gauge, histogram = TRICKY_COUNTER, TRICKY_GAUGE, TRICKY_HISTOGRAM
    numbers = [0, 7, 2**70, -3, 0.0, -0.0, 3.0, 0.25, 1e15, 1e16, 123456789.125, 2.5e-7,
               float("nan"), float("inf"), float("-inf")]  # fmt: skip
    other_bounds = (0.001, 0.01, 0.1)
    points = []
    pods = [p for p in range(8) if rng.random() < 0.8]
    if cycle % 4 == 3:
        pods.reverse()
    for pod in pods:
        value = f"web-{pod}%d" if pod == 3 else ("caf\udce9" if pod == 4 else f'pod"{pod}')
        resource = Resource((("namespace", "ns"), ("pod", value), ("container", "app"), ("node", "n")))
        cgroup = CgroupRef(100 + pod, f"/pod{pod}")
        for kind in ("a", "b"):
            chosen = rng.choice(numbers) if rng.random() < 0.5 else rng.randrange(10**6)
            points.append(Point(counter, cgroup, (("kind", kind),), chosen, resource))
        points.append(Point(gauge, cgroup, (), rng.choice(numbers) if rng.random() < 0.3 else rng.random(), resource))
        for syscall in ("read", "write"):
            bounds = other_bounds if pod == 5 and cycle % 2 else HIST_BOUNDS
            width = len(bounds) + 1 + (rng.choice((-2, 0, 0, 0, 1)) if pod == 6 else 0)
            counts = tuple(rng.randrange(3) if rng.random() < 0.4 else 0 for _ in range(width))
            total = rng.choice((rng.random(), 0.0, 0, 12.0, float("nan"), 2**40 + 0.5))
            value = HistogramValue(bounds, counts, total)
            points.append(Point(histogram, cgroup, (("syscall", syscall),), value, resource))
    if cycle % 3 == 1:  # kinds that do not fit, and a repeated series: the first point is rendered
        resource = Resource((("namespace", "ns"), ("pod", "odd"), ("container", "app"), ("node", "n")))
        points.append(Point(counter, None, (("kind", "a"),), HistogramValue(HIST_BOUNDS, (1,) * 27, 1.0), resource))
        points.append(Point(histogram, None, (("syscall", "read"),), 4.0, resource))
        points.append(Point(counter, None, (("kind", "a"),), 5, resource))
    points.append(Point(gauge, CgroupRef(9, "/system.slice/x.service"), (), rng.random()))
    points.append(Point(gauge, CgroupRef(10, ""), (), cycle))
    points.append(Point(counter, None, (("kind", "self"),), cycle * 1.5))
    return Batch(points)


def _rendered(renderer: Renderer, batch: Batch, cycle: int) -> tuple[bytes, bytes, int]:
    """(text, OpenMetrics, series) of a batch, the bodies asked for in the order of the cycle:
    the one joined second is joined from views into the first."""
    if cycle % 2 == 0:
        return renderer.render(batch)
    rendered = renderer.render_parts(batch)
    openmetrics = rendered.openmetrics()
    return rendered.text(), openmetrics, rendered.series


# The size of the blocks a family's text is made in (exposition.BLOCK): as it is (the node
# batches' histogram families are made in several), and small enough for every family to be.
BLOCK_SIZES = pytest.mark.parametrize("block", [exposition.BLOCK, 97], ids=["block", "small-blocks"])


@BLOCK_SIZES
def test_renders_the_bytes_the_previous_renderer_did(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The renderer was rewritten for speed (issue 18); its output is the previous one's, byte
    for byte (bench/render_previous.py is that renderer, kept for the side-by-side bench), over
    cycles that exercise every cache and every fallback of the new one, with either body
    joined first."""
    from bench.render_previous import Renderer as PreviousRenderer

    monkeypatch.setattr(exposition, "BLOCK", block)

    rng = random.Random(18)
    current, previous = Renderer(), PreviousRenderer()
    for cycle in range(60):
        batch = _tricky_batch(rng, cycle) if cycle % 5 else node_batch(pods=3, seed=cycle)
        assert _rendered(current, batch, cycle) == previous.render(batch), f"cycle {cycle}"
    # Cycles where few histograms change (rendered series by series, the others' text reused),
    # then all of them, then few again; a sum alone changing (NaN never equals itself).
    batch = node_batch(pods=4, seed=1)
    for cycle in range(12):
        points = list(batch.points)
        histograms = [i for i, p in enumerate(points) if isinstance(p.value, HistogramValue)]
        share = 1.0 if cycle == 6 else rng.choice((0.0, 0.1, 0.5))
        for i in rng.sample(histograms, int(share * len(histograms))):
            value = points[i].value
            counts = tuple(c + rng.randrange(3) for c in value.counts)  # type: ignore[union-attr]
            total = rng.choice((value.sum + 1.0, float("nan"), 3.0)) if cycle % 2 else value.sum  # type: ignore[union-attr]
            points[i] = Point(points[i].metric, points[i].cgroup, points[i].attributes,
                              HistogramValue(value.bounds, counts if cycle % 3 else value.counts, total),  # type: ignore[union-attr]
                              points[i].resource)  # fmt: skip
        batch = Batch(points)
        assert _rendered(current, batch, cycle) == previous.render(batch), f"few changed, cycle {cycle}"


def _same_series_changes(batch: Batch, rng: random.Random, cycle: int) -> Batch:
    """The batch's series with new values, and once in a while one change of what a series is
    (a point's metric, attributes, resource or cgroup, or two points' order) that the renderer
    must notice although most of its points are the objects of the cycle before."""
    points = [
        Point(p.metric, p.cgroup, p.attributes,
              HistogramValue(p.value.bounds, tuple(c + rng.randrange(2) for c in p.value.counts), p.value.sum + 1.0)
              if isinstance(p.value, HistogramValue) else p.value + rng.randrange(3),
              p.resource, p.start_time_ns)
        for p in batch.points
    ]  # fmt: skip
    at = rng.randrange(len(points))
    point = points[at]
    change = cycle % 8
    if change == 1 and point.resource is not None:  # an equal resource, another object: same labels
        point.resource = Resource(point.resource.labels, point.resource.otel)
    elif change == 2 and point.resource is not None:  # another pod's labels
        point.resource = Resource((*point.resource.labels[:-1], ("pod", f"other-{cycle}")), point.resource.otel)
    elif change == 3:  # equal attributes, another tuple; then other attributes
        point.attributes = tuple(point.attributes) + ((("kind", "x"),) if cycle % 16 == 3 else ())
    elif change == 4:  # a point of another family of the same kind at that place
        others = [p.metric for p in points if p.metric.kind is point.metric.kind and p.metric is not point.metric]
        if others:
            point.metric = rng.choice(others)
    elif change == 5:  # two points trade places
        other = rng.randrange(len(points))
        points[at], points[other] = points[other], points[at]
    elif change == 6:  # a point without a resource: its cgroup names it
        point.resource = None
    elif change == 7:  # the same point without a resource, of another cgroup (equal, then not)
        bare = [p for p in points if p.resource is None and p.cgroup is not None]
        if bare:
            bare[0].cgroup = CgroupRef(bare[0].cgroup.id, bare[0].cgroup.path + ("" if cycle % 16 == 7 else "/x"))
    return Batch(points)


def test_a_batch_of_the_same_series_renders_as_the_previous_renderer() -> None:
    """Cycle after cycle the same series in the same order: the renderer takes each family's
    values out of the batch by position (labels.Grouping) and looks at its points one by one
    only when their series changed.  Every change of a point's metric, attributes, resource or
    cgroup (points without a resource), equal objects that are new, and points that trade places:
    the text, OpenMetrics and protobuf bodies are those of renderers that keep nothing."""
    from kpod.exporters.prometheus.protobuf import ProtobufRenderer

    from bench.render_previous import Renderer as PreviousRenderer

    rng = random.Random(17)
    current, protobuf = Renderer(), ProtobufRenderer()
    batch = node_batch(pods=4, seed=3)
    self_metric = MetricDef("kpod.test.self", Kind.COUNTER, "1", "Self.", ("kind",))
    batch.points += [
        Point(TRICKY_GAUGE, CgroupRef(9, "/system.slice/x.service"), (), 1.5),
        Point(self_metric, None, (("kind", "a"),), 2),
    ]
    for cycle in range(64):
        batch = _same_series_changes(batch, rng, cycle)
        assert _rendered(current, batch, cycle) == PreviousRenderer().render(batch), f"cycle {cycle}"
        assert protobuf.render(batch) == ProtobufRenderer().render(batch), f"cycle {cycle}"


@BLOCK_SIZES
def test_pods_that_come_and_go_render_as_the_previous_renderer(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A family whose series changed keeps the texts of those it had, as runs of its previous
    template: pods leaving at the start, the middle and the end, new pods at the end and in the
    middle, pods coming back, all of them gone and back, a counter's values turning from ints
    to floats (another form).  Every body is the previous renderer's."""
    from bench.render_previous import Renderer as PreviousRenderer

    monkeypatch.setattr(exposition, "BLOCK", block)

    node = node_batch(pods=12, seed=1)
    pods: dict[Resource | None, list[Point]] = {}
    for point in node.points:
        pods.setdefault(point.resource, []).append(point)
    every = list(pods.values())
    current = Renderer()
    layouts = [
        every[:10], every[1:10], every[:4] + every[5:10], every[:9], every[:9] + every[10:12],
        every[:3] + every[10:11] + every[3:9], every[:10], [], every[:10], every[6:] + every[:6], every[:10],
    ]  # fmt: skip
    for cycle, layout in enumerate(layouts * 2):
        floats = cycle >= len(layouts) and cycle % 2 == 0
        points = [
            Point(p.metric, p.cgroup, p.attributes,
                  float(p.value) + 0.5 if floats and isinstance(p.value, int) else p.value,
                  p.resource)
            for pod in layout for p in pod
        ]  # fmt: skip
        batch = Batch(points)
        assert _rendered(current, batch, cycle) == PreviousRenderer().render(batch), f"cycle {cycle}"
        assert any(family.blocks for family in current._families.values()) == bool(layout)  # made in blocks


def test_float_families_render_each_value_as_format_value_writes_it() -> None:
    """Families whose values are all floats (bytes, counts and idle zeros read as floats: most
    of a node's) take a path of their own: all whole, whole and fractional mixed, whole ones
    at and past 1e15, -0.0, and not finite; every line is the previous renderer's, cycle after
    cycle over the same series."""
    from bench.render_previous import Renderer as PreviousRenderer

    rng = random.Random(17)
    whole = [0.0, -0.0, 3.0, 4096.0, 1e14, 999999999999999.0, -7.0]
    fractional = [0.25, 1.5e-7, 123456789.125, -2.5]
    huge = [1e15, 1e16, -1e15]
    odd = [float("nan"), float("inf"), float("-inf")]
    current, previous = Renderer(), PreviousRenderer()
    for cycle in range(80):
        mixes = [whole, whole + fractional, fractional, whole + huge, whole + fractional + huge, whole + odd]
        pools = rng.choice(mixes)
        values = [rng.choice(pools) for _ in range(rng.randrange(1, 12))]
        points = [
            Point(TRICKY_GAUGE, CgroupRef(index, f"/c{index}"), (), value, Resource((("pod", f"p{index}"),)))
            for index, value in enumerate(values)
        ]
        text, openmetrics, series = current.render(Batch(points))
        assert (text, openmetrics, series) == previous.render(Batch(points)), f"cycle {cycle}: {values}"
        lines = [line for line in text.decode().splitlines() if not line.startswith("#")]
        assert [line.rsplit(" ", 1)[1] for line in lines] == [format_value(v) for v in values], values
