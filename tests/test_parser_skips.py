"""Odd input is skipped *and counted*: every skip of the file parsers lands in
kpod.selfmetrics.parser_skips() and reaches the exposition as kpod_parser_skipped_lines_total{parser};
the real files of this host and of the captured kernels (tests/fixtures) skip nothing (no
false alarms)."""

from __future__ import annotations

import os
from collections.abc import Callable
from fnmatch import fnmatch
from pathlib import Path

import pytest
from cgroup_tree import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from kpod.cgroup import parsers as p
from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.mounts import parse_mountinfo_cgroups
from kpod.config import load_config
from kpod.pipeline import Pipeline
from kpod.selfmetrics import parser_skips


def skips_of(parse: Callable[[str], object], text: str) -> dict[str, int]:
    before = parser_skips()
    parse(text)
    after = parser_skips()
    return {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)}


@pytest.mark.parametrize(
    ("parse", "text", "expected"),
    [
        (p.parse_flat_keyed, "a 1\nb two\nc 3 4\n\nd\n", {"flat_keyed": 3}),
        (lambda t: p.parse_flat_keyed_value(t, "b"), "a 1\nb two\nb 5\n", {"flat_keyed": 1}),
        (p.parse_single_int, "12 13\n", {"single_int": 1}),
        (p.parse_single_int, "max\n", {}),  # memory.max without a limit: the format, not damage
        (p.parse_single_int, "\n", {}),
        (p.parse_io_stat, "8:0 rbytes=1 bogus wbytes=x\nnot-a-device rbytes=1\n\n", {"io_stat": 3}),
        (p.parse_blkio_throttle, "8:0 Read 5\n8:0 Frob 1\nx:y Read 1\nTotal 5\n", {"blkio_throttle": 2}),
        (p.parse_pressure_totals, "some avg10=0.00 total=5\nfull avg10=1\nwhat is this\n", {"pressure": 2}),
        (p.parse_pressure_totals, "some avg10=0.00 total=5\nfull total=x\nsomething\n", {"pressure": 2}),
        (p.parse_net_dev, "Inter-| Receive\n face |bytes\n  lo: 1 2 3\neth0: " + "1 " * 16 + "\njunk\n",
         {"net_dev": 2}),
        (p.parse_mountinfo, "1 2 0:1 / / rw - ext4 /dev/x rw\nno separator\n1 2 x / / rw - ext4 s o\n",
         {"mountinfo": 2}),
        (p.parse_uevent, "MAJOR=8\nno equals sign\n\n", {"uevent": 1}),
        (p.parse_cgroup_procs, "1\n\nabc\n0\n", {"cgroup_procs": 2}),
    ],
)  # fmt: skip
def test_each_skip_is_counted_by_parser(parse: Callable[[str], object], text: str, expected: dict[str, int]) -> None:
    assert skips_of(parse, text) == expected


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.from_regex(r"[a-z]{1,8}", fullmatch=True), st.integers(0, 10**6)), max_size=8),
       st.lists(st.sampled_from(["x", "a b c", "k v", "k -", "k 1_0"]), max_size=5))  # fmt: skip
def test_flat_keyed_count_equals_returned_skips(good: list[tuple[str, int]], junk: list[str]) -> None:
    text = "\n".join([*(f"{k} {v}" for k, v in good), *junk])
    before = parser_skips().get("flat_keyed", 0)
    _, skipped = p.parse_flat_keyed(text)
    assert parser_skips().get("flat_keyed", 0) - before == skipped == len(junk)


# The parser of each kind of kernel file, by file name (cgroup files) or name pattern (the
# captured /proc and /sys files are named after what they hold).
BY_NAME: dict[str, Callable[[str], object]] = {
    "io.stat": p.parse_io_stat, "cpu.stat": p.parse_flat_keyed, "cpu.stat.local": p.parse_flat_keyed,
    "memory.stat": p.parse_flat_keyed, "memory.events": p.parse_flat_keyed,
    "memory.events.local": p.parse_flat_keyed, "cpu.pressure": p.parse_pressure_totals,
    "io.pressure": p.parse_pressure_totals, "memory.pressure": p.parse_pressure_totals,
    "memory.current": p.parse_single_int,
    "memory.peak": p.parse_single_int, "memory.max": p.parse_single_int,
    "memory.usage_in_bytes": p.parse_single_int, "memory.max_usage_in_bytes": p.parse_single_int,
    "memory.limit_in_bytes": p.parse_single_int, "memory.failcnt": p.parse_single_int,
    "cgroup.procs": p.parse_cgroup_procs, "blkio.throttle.io_service_bytes": p.parse_blkio_throttle,
    "blkio.throttle.io_serviced": p.parse_blkio_throttle,
    "blkio.throttle.io_service_bytes_recursive": p.parse_blkio_throttle,
    "blkio.throttle.io_serviced_recursive": p.parse_blkio_throttle,
}  # fmt: skip
BY_PATTERN: dict[str, Callable[[str], object]] = {
    "net-dev*.txt": p.parse_net_dev, "mountinfo*.txt": p.parse_mountinfo, "*uevent*.txt": p.parse_uevent,
}  # fmt: skip


def parser_of(path: Path) -> Callable[[str], object] | None:
    if path.name in BY_NAME:
        return BY_NAME[path.name]
    return next((parse for pattern, parse in BY_PATTERN.items() if fnmatch(path.name, pattern)), None)


def assert_skips_nothing(path: Path, parse: Callable[[str], object], text: str) -> None:
    assert skips_of(parse, text) == {}, (str(path), text[:300])


def test_captured_files_skip_nothing() -> None:
    """Every captured kernel file that one of our parsers reads parses without a skipped line,
    and every parser meets at least one captured file (a parser without a real sample here
    would be tested on made-up input only)."""
    checked: dict[Callable[[str], object], int] = {}
    for path in sorted(FIXTURES.rglob("*")):
        parse = parser_of(path) if path.is_file() else None
        if parse is not None:
            assert_skips_nothing(path, parse, path.read_text(encoding="utf-8", errors="surrogateescape"))
            checked[parse] = checked.get(parse, 0) + 1
    assert set(checked) == {*BY_NAME.values(), *BY_PATTERN.values()}
    assert sum(checked.values()) >= 250  # the whole capture (README), not a part of it


def test_this_hosts_files_skip_nothing() -> None:
    """This host's own files: /proc, and the cgroup2 tree and v1 controllers (a few levels
    deep: enough to meet every kind of file)."""
    found = [Path("/proc/self/mountinfo"), Path("/proc/self/net/dev"), Path("/proc/1/mountinfo")]
    with open("/proc/self/mountinfo") as handle:
        mounts = parse_mountinfo_cgroups(handle.read())
    roots = [root for root in (mounts.unified, *mounts.v1.values()) if root]
    assert roots, "this host has no cgroup mount"
    for root in dict.fromkeys(roots):  # co-mounted v1 controllers share a mount
        for directory, _, files in os.walk(root):
            if directory.count("/") - root.count("/") > 3:
                continue
            found += [Path(directory, name) for name in files if name in BY_NAME]
    checked = 0
    for path in found:
        parse = parser_of(path) or (p.parse_mountinfo if path.name == "mountinfo" else p.parse_net_dev)
        try:
            text = path.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            continue  # a cgroup that went away, a file we may not read
        assert_skips_nothing(path, parse, text)
        checked += 1
    assert checked > 20


def test_pipeline_exports_skips_as_a_counter(tmp_path: Path, test_plugin: Path, clean_env: dict[str, str]) -> None:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        "kpod: {profile: custom, poll_interval: 1s}\nreceivers:\n  constant/x: {}\n"
        "exporters:\n  recording/a: {}\n"
        "service:\n  pipelines:\n    metrics: {receivers: [constant/x], exporters: [recording/a]}\n"
    )
    root = tmp_path / "cgroup"
    root.mkdir()
    pipeline = Pipeline(load_config(str(config_path), environ=clean_env), CgroupIndex(str(root)))
    pipeline.start()
    try:
        p.parse_io_stat("garbage line\n8:0 rbytes=1\n")  # what a receiver would hit: 1 skip
        first = pipeline.run_cycle()
        p.parse_io_stat("more garbage\nand more\n")
        second = pipeline.run_cycle()
    finally:
        pipeline.shutdown()

    def skipped(batch: object) -> dict[str, float]:
        return {dict(pt.attributes)["parser"]: pt.value for pt in batch.points  # type: ignore[attr-defined]
                if pt.metric.name == "kpod.parser.skipped.lines"}  # fmt: skip

    assert skipped(first) == {"io_stat": 1}
    assert skipped(second) == {"io_stat": 3}  # a counter: cumulative


def test_informer_skips_and_counts_garbage_in_the_watch_stream() -> None:
    """A watch stream with lines that are not events and an event whose pod is unusable: those
    are skipped and counted (skipped_objects, shown in /debug/status under the processor), the
    events around them are applied and the resume point moves past them."""
    import json
    import logging

    from kpod.processors.k8sattributes.config import K8sAttributesConfig
    from kpod.processors.k8sattributes.discovery import InformerDiscovery
    from kpod.processors.k8sattributes.pods import PodStore

    def event(kind: str, uid: str, version: str) -> bytes:
        pod = {"metadata": {"uid": uid, "name": f"pod-{uid}", "namespace": "ns", "resourceVersion": version}}
        return json.dumps({"type": kind, "object": pod}).encode() + b"\n"

    lines = [
        event("ADDED", "a", "11"),
        b"this is not json\n",
        b"[1, 2, 3]\n",
        b'{"type": "ADDED", "object": {"metadata": {"resourceVersion": "12"}}}\n',  # no uid
        b'{"type": "SURPRISE", "object": {}}\n',
        b"[" * 50000 + b"\n",  # nested past the parser's recursion limit
        event("ADDED", "b", "13"),
        event("DELETED", "a", "14"),
    ]

    class Request:  # the part of apiserver.Request the watch reads
        def chunks(self) -> object:
            data = b"".join(lines)
            return (data[i : i + 7] for i in range(0, len(data), 7))  # lines split across chunks

        def close(self) -> None:
            pass

    store = PodStore()
    informer = InformerDiscovery(store, logging.getLogger("test"), "node-a", K8sAttributesConfig())
    informer._call = lambda query, timeout: Request()  # type: ignore[method-assign]
    version, events = informer.watch("10")
    assert set(store.snapshot()) == {"b"}
    assert version == "14" and events == 4  # the three good events and the one without a uid
    assert informer.skipped == 5
    assert informer.status()["skipped_objects"] == 5
