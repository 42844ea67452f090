"""Bad input: every parser of what the kernel, the API server, the kubelet and the user hand the
agent, fed with generated input (hypothesis).

Besides "never raises", each test checks a property that garbage must not break: what is
well-formed still parses to exactly what was written, odd lines are skipped (and counted where
the parser counts), and nothing but the documented exception escapes.

The number of examples is small in `make test` and large in `make fuzz`
(FUZZ_EXAMPLES=<n> scales every test; the default keeps this file at a few seconds).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import string
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from kpod.exporters.prometheus.exposition import Renderer
from kpod.processors.k8sattributes.discovery import decode_watch_event
from kpod.processors.k8sattributes.podlist import PodListDecoder, PodListPage, decode_pod_list
from kpod.processors.k8sattributes.pods import PodInfo, pod_from_json
from prometheus_client.parser import text_string_to_metric_families

from kpod.cgroup import parsers as p
from kpod.cgroup.mounts import parse_mountinfo_cgroups
from kpod.config import ConfigError, load_config
from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "100"))


def fuzz(scale: float = 1.0) -> settings:
    """Settings for one fuzz test: EXAMPLES * scale examples, no deadline (CI machines stall)."""
    return settings(
        max_examples=max(10, int(EXAMPLES * scale)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


# ------------------------------------------------------------------------------ building blocks

# Tokens a kernel file is made of, plus what a truncated, newer or corrupted one adds.
ODD_TOKENS = ["", "-", "+", "1_000", "\u0661\u0662", "nan", "inf", "0x10", "1e3", "\x00", "\ufffd",
              "\udcff", "=", "==", ":", "::", "18446744073709551616", "-1", "99999999999999999999999"]  # fmt: skip
# The kernel ends lines with "\n" only; the other characters str.splitlines() breaks at are
# part of names (ODD_NAME_CHARS below), never line ends.
line_breaks = st.sampled_from(["\n", "\n", "\n\n"])
ODD_NAME_CHARS = "\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
words = st.one_of(st.from_regex(r"[a-z_]{1,12}", fullmatch=True), st.sampled_from(ODD_TOKENS))
numbers = st.integers(min_value=0, max_value=2**64 - 1)
garbage_text = st.binary(max_size=300).map(lambda b: b.decode("utf-8", "surrogateescape"))


@st.composite
def mixed_lines(draw: st.DrawFn, good: st.SearchStrategy[str]) -> tuple[str, list[str]]:
    """(text, the good lines in it): good lines with junk lines between them."""
    goods = draw(st.lists(good, max_size=12))
    out: list[str] = []
    for line in goods:
        for _ in range(draw(st.integers(0, 2))):
            out.append(draw(st.one_of(st.lists(words, max_size=6).map(" ".join), garbage_text)))
        out.append(line)
    breaks = [draw(line_breaks) for _ in out]
    return "".join(line + brk for line, brk in zip(out, breaks, strict=True)), goods


# ------------------------------------------------------------------------------ cgroup files


flat_line = st.tuples(st.from_regex(r"[a-z_]{1,16}", fullmatch=True), st.integers(-(2**63), 2**64 - 1))


@fuzz()
@given(st.lists(flat_line, max_size=20, unique_by=lambda kv: kv[0]), st.data())
def test_flat_keyed_keeps_every_good_line_and_counts_the_rest(good: list[tuple[str, int]], data: st.DataObject) -> None:
    junk = data.draw(st.lists(st.one_of(
        st.lists(words, min_size=3, max_size=5).map(" ".join),  # three or more fields
        st.tuples(st.from_regex(r"[A-Z]{1,5}", fullmatch=True), st.sampled_from(ODD_TOKENS[1:])).map(" ".join),
    ), max_size=6))  # fmt: skip
    junk = [j for j in junk if j.split() and (len(j.split()) != 2 or p._int(j.split()[1]) is None)]
    lines = [f"{k} {v}" for k, v in good] + junk
    order = data.draw(st.permutations(range(len(lines))))
    text = "\n".join(lines[i] for i in order) + "\n"
    values, skipped = p.parse_flat_keyed(text)
    assert values == dict(good)
    assert skipped == len(junk)
    # The one-key fast path agrees with the full parse on every key of a "\n"-separated file.
    for key, value in good:
        assert p.parse_flat_keyed_value(text, key) == value
        assert p.parse_flat_keyed_value(text, key + "x") == values.get(key + "x")  # a longer key is another key
    # The named entry points return the same keys and values (not only each other's).
    assert p.parse_cpu_stat(text) == dict(good)


@fuzz()
@given(garbage_text)
def test_flat_keyed_on_garbage_returns_ints_and_a_count(text: str) -> None:
    values, skipped = p.parse_flat_keyed(text)
    assert all(type(v) is int for v in values.values())
    assert all(k and not any(c.isspace() for c in k) for k in values)
    assert 0 <= skipped <= len(text.splitlines())
    single = p.parse_single_int(text)
    assert single is None or type(single) is int


@fuzz()
@given(st.one_of(numbers.map(str), st.sampled_from(ODD_TOKENS), garbage_text), st.sampled_from(["", "\n", " \n"]))
def test_single_int_is_the_number_or_none(body: str, tail: str) -> None:
    value = p.parse_single_int(body + tail)
    if body.isascii() and body.isdigit():
        assert value == int(body)
    elif value is not None:
        assert type(value) is int


io_line = st.tuples(
    st.integers(0, 4095), st.integers(0, 2**20 - 1),
    st.dictionaries(st.sampled_from(["rbytes", "wbytes", "rios", "wios", "dbytes", "dios", "cost.usage"]), numbers,
                    min_size=1),
)  # fmt: skip


@fuzz()
@given(st.lists(io_line, max_size=8, unique_by=lambda t: (t[0], t[1])), st.data())
def test_io_stat_keeps_good_devices_among_junk(devices: list, data: st.DataObject) -> None:
    good = [f"{ma}:{mi} " + " ".join(f"{k}={v}" for k, v in stats.items()) for ma, mi, stats in devices]
    junk_line = st.one_of(
        st.lists(words, max_size=5).map(lambda ws: " ".join(["junk", *ws])),  # no device number first
        st.just("8:0"),  # a device without any pair: no stats, not returned (nor overriding)
        st.just("8:-1 rbytes=1"),
        st.just("x:1 rbytes=1"),
        st.just("1:2:3 rbytes=1"),
    )
    junk = data.draw(st.lists(junk_line, max_size=4))
    lines = good + junk
    order = data.draw(st.permutations(range(len(lines))))
    text = "\n".join(lines[i] for i in order)
    parsed = p.parse_io_stat(text)
    expected = {(ma, mi): dict(stats) for ma, mi, stats in devices}
    assert parsed == expected


@fuzz()
@given(garbage_text)
def test_io_and_blkio_on_garbage_have_valid_shapes(text: str) -> None:
    for parsed in (p.parse_io_stat(text), p.parse_blkio_throttle(text)):
        for (major, minor), stats in parsed.items():
            assert major >= 0 and minor >= 0 and stats
            assert all(type(v) is int for v in stats.values())
    assert all(op in p.BLKIO_OPS for stats in p.parse_blkio_throttle(text).values() for op in stats)


@fuzz()
@given(
    st.dictionaries(st.tuples(st.integers(0, 300), st.integers(0, 300)),
                    st.dictionaries(st.sampled_from(p.BLKIO_OPS[:-1]), numbers, min_size=1), max_size=5),
    st.integers(0, 2**64),
)  # fmt: skip
def test_blkio_throttle_round_trip_and_total_line_ignored(devices: dict, total: int) -> None:
    lines = [f"{ma}:{mi} {op} {v}" for (ma, mi), ops in devices.items() for op, v in ops.items()]
    text = "\n".join([*lines, f"Total {total}"]) + "\n"
    assert p.parse_blkio_throttle(text) == devices


pressure_line = st.tuples(
    st.sampled_from(["some", "full"]),
    st.tuples(*[st.floats(0, 100, allow_nan=False).map(lambda f: f"{f:.2f}")] * 3),
    st.integers(0, 2**63),
)


@fuzz()
@given(st.lists(pressure_line, max_size=4, unique_by=lambda t: t[0]), st.lists(words.map(str), max_size=3))
def test_pressure_round_trip(lines: list, junk: list[str]) -> None:
    text = "\n".join(
        [f"{kind} avg10={a} avg60={b} avg300={c} total={t}" for kind, (a, b, c), t in lines] + junk
    )
    assert p.parse_pressure_totals(text) == {kind: t for kind, _, t in lines}


@fuzz()
@given(garbage_text)
def test_pressure_on_garbage_is_non_negative(text: str) -> None:
    totals = p.parse_pressure_totals(text)
    assert set(totals) <= {"some", "full"} and all(v >= 0 for v in totals.values())


# Lines in the kernel's shape most of the time, so that both the regex-checked fast path of a
# parser and its line-by-line path are taken; each must give what the other would.
flat_key = st.one_of(st.from_regex(r"[a-z_]{1,12}", fullmatch=True),
                     st.text(alphabet="ab_0" + ODD_NAME_CHARS + " \t", min_size=0, max_size=4))  # fmt: skip
flat_value = st.one_of(numbers.map(str), numbers.map(str), st.sampled_from(ODD_TOKENS))
flat_line = st.tuples(flat_key, st.sampled_from([" ", " ", " ", "  ", "\t", ""]), flat_value).map("".join)


@fuzz(2)
@given(st.lists(flat_line, max_size=8), st.sampled_from(["\n", "", "\n\n"]))
def test_flat_keyed_fast_path_agrees_with_the_line_by_line_reading(lines: list[str], end: str) -> None:
    text = "\n".join(lines) + end
    assert p.parse_flat_keyed(text) == p._parse_flat_keyed_lines(text)


psi_number = st.one_of(st.floats(0, 100, allow_nan=False).map(lambda f: f"{f:.2f}"), st.sampled_from(ODD_TOKENS))
psi_line = st.tuples(
    st.sampled_from(["some", "full", "some", "full", "somewhat", ""]),
    st.tuples(psi_number, psi_number, psi_number),
    st.one_of(numbers.map(str), numbers.map(str), st.sampled_from(ODD_TOKENS)),
).map(lambda t: f"{t[0]} avg10={t[1][0]} avg60={t[1][1]} avg300={t[1][2]} total={t[2]}")


@fuzz(2)
@given(st.lists(st.one_of(psi_line, psi_line, words.map(str)), max_size=3), st.sampled_from(["\n", "", " \n"]))
def test_pressure_fast_path_agrees_with_the_line_by_line_reading(lines: list[str], end: str) -> None:
    text = "\n".join(lines) + end
    assert p.parse_pressure_totals(text) == p._parse_pressure_lines(text)


@fuzz()
@given(mixed_lines(st.integers(1, 2**22).map(str)))
def test_cgroup_procs_keeps_pids_only(case: tuple[str, list[str]]) -> None:
    text, good = case
    pids = p.parse_cgroup_procs(text)
    assert all(type(pid) is int and pid > 0 for pid in pids)
    # Every good line is there, in order (a junk line can be a number too).
    it = iter(pids)
    assert all(any(pid == int(g) for pid in it) for g in good)


@fuzz()
@given(
    st.dictionaries(
        st.from_regex(r"[A-Z_]{1,10}", fullmatch=True), st.from_regex(r"[a-z0-9/]{0,12}", fullmatch=True), max_size=6
    ),
    st.lists(garbage_text, max_size=3),
)
def test_uevent_round_trip(values: dict[str, str], junk: list[str]) -> None:
    junk = [j for j in junk if "=" not in j]
    text = "\n".join([*junk, *(f"{k}={v}" for k, v in values.items())])
    parsed = p.parse_uevent(text)
    for key, value in values.items():
        assert parsed[key] == value
    assert p.parse_devname(text) == (values.get("DEVNAME") or None)


# ------------------------------------------------------------------------------ /proc/<pid>/net/dev

interface = st.from_regex(r"[a-z][a-z0-9@._-]{0,14}", fullmatch=True)
# What the kernel's dev_valid_name() lets through besides those: anything but '/', ':', NUL
# and its isspace() (\t \n \v \f \r and space), so \x1c, \x85 and U+2028 are legal.
odd_interface = st.text(
    alphabet=st.sampled_from("abcXYZ09@._-|" + "\x1c\x1d\x1e\x85\u2028\u2029\x7f\udce9"), min_size=1, max_size=15
)


@fuzz()
@given(st.dictionaries(interface, st.lists(numbers, min_size=16, max_size=16), max_size=6), st.data())
def test_net_dev_round_trip_with_headers_and_junk(interfaces: dict[str, list[int]], data: st.DataObject) -> None:
    header = (
        "Inter-|   Receive                                                |  Transmit\n"
        " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls"
        " carrier compressed\n"
    )
    lines = [f"{name:>6}: " + " ".join(str(v) for v in values) for name, values in interfaces.items()]
    # The kernel pads with %8llu: a wide number touches the colon.
    lines += [f"{name}:{values[0]}" + "".join(f" {v}" for v in values[1:]) for name, values in interfaces.items()][:1]
    junk = data.draw(st.lists(st.one_of(
        st.just("  lo: 1 2 3"),  # too few columns
        st.just("eth9: " + " ".join(["1"] * 17)),  # too many
        st.just("eth8: " + " ".join(["x"] * 16)),
        st.just("bad name: " + " ".join(["1"] * 16)),
        garbage_text.filter(lambda s: ":" not in s),
    ), max_size=4))  # fmt: skip
    text = header + "\n".join(lines + junk) + "\n"
    parsed = p.parse_net_dev(text)
    assert {name: list(vars_of(c)) for name, c in parsed.items()} == interfaces


def vars_of(counters: p.NetDevCounters) -> list[int]:
    return [getattr(counters, f) for f in p.NetDevCounters.__slots__]


@fuzz()
@given(st.dictionaries(odd_interface, st.lists(numbers, min_size=16, max_size=16), max_size=6))
def test_net_dev_names_with_line_separators_round_trip(interfaces: dict[str, list[int]]) -> None:
    """A pod's interface named "x\\x1ceth0" is one interface, and does not shadow eth0."""
    lines = [f"{name:>6}: " + " ".join(str(v) for v in values) for name, values in interfaces.items()]
    parsed = p.parse_net_dev("Inter-|  Receive | Transmit\n face |bytes |bytes\n" + "\n".join(lines) + "\n")
    assert {name: vars_of(c) for name, c in parsed.items()} == interfaces


@fuzz()
@given(garbage_text)
def test_net_dev_on_garbage(text: str) -> None:
    for name, counters in p.parse_net_dev(text).items():
        assert name and ":" not in name and " " not in name
        assert all(type(v) is int and v >= 0 for v in vars_of(counters))


# ------------------------------------------------------------------------------ mountinfo

# Paths with the characters mountinfo escapes (space, tab, newline, backslash), non-UTF-8 bytes,
# and the line separators of str.splitlines() that mountinfo does not escape.
path_part = st.text(
    alphabet=string.ascii_letters + " \t\n\\#\u00e9" + "\udce9" + ODD_NAME_CHARS, min_size=1, max_size=10
)
mount_path = st.lists(path_part, min_size=1, max_size=3).map(lambda parts: "/" + "/".join(parts))


def escape(path: str) -> str:
    """What the kernel's seq_path does to a path in mountinfo."""
    return "".join(f"\\{ord(c):03o}" if c in " \t\n\\" else c for c in path)


@fuzz()
@given(st.lists(st.tuples(mount_path, st.sampled_from(["ext4", "tmpfs", "cgroup2", "cgroup", "overlay"]),
                          st.lists(st.sampled_from(["shared:1", "master:2", "propagate_from:3"]), max_size=2)),
                max_size=8), st.lists(garbage_text, max_size=3))  # fmt: skip
def test_mountinfo_round_trip_of_escaped_paths(mounts: list, junk: list[str]) -> None:
    lines = []
    for i, (point, fstype, optional) in enumerate(mounts):
        opt = " ".join(optional)
        lines.append(f"{i + 20} 1 0:{i} / {escape(point)} rw,relatime {opt}{' ' if opt else ''}- {fstype} src rw,x=1")
    junk = [j for j in junk if " - " not in j]
    text = "\n".join(junk + lines)
    parsed = p.parse_mountinfo(text)
    assert [m.mount_point for m in parsed] == [point for point, _, _ in mounts]
    assert [m.fstype for m in parsed] == [fstype for _, fstype, _ in mounts]
    assert [m.optional for m in parsed] == [tuple(o) for _, _, o in mounts]
    # The cgroup finder reads the same lines: the first cgroup2 mount point, unescaped.
    cgroup = parse_mountinfo_cgroups(text)
    first = next((point for point, fstype, _ in mounts if fstype == "cgroup2"), None)
    assert cgroup.unified == first


@fuzz(2)
@given(st.one_of(garbage_text, st.lists(st.one_of(words, st.just(" - "), st.just("\\999"), st.just("\\1")),
                                           max_size=14).map(" ".join)))  # fmt: skip
def test_mountinfo_parsers_on_garbage(text: str) -> None:
    for mount in p.parse_mountinfo(text):
        assert mount.mount_id >= 0 and mount.dev[0] >= 0
    parse_mountinfo_cgroups(text)
    p.unescape_mountinfo(text)


# ------------------------------------------------------------------------------ config loader

# YAML made of the config's own keys and values of every type, so that generated documents go
# deep into validation instead of failing at the first key.
KEYS = ["kpod", "receivers", "processors", "exporters", "service", "pipelines", "metrics", "profile",
        "poll_interval", "cycle_timeout", "discovery", "mode", "kubelet", "url", "filter", "namespaces",
        "include_labels", "label_selector", "bpf", "enabled", "map_max_entries", "syscall", "tracked_syscalls",
        "prometheus", "endpoint", "otlp", "cgroup_cpu", "cpu_sched", "k8sattributes", "interval", "nosuch",
        "timeout", "queue_size", "node_name", "cgroup", "root"]  # fmt: skip
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
    st.sampled_from(["30s", "500ms", "-1s", "99999h", "1e400", "0", "standard", "custom", "informer", "local",
                     "127.0.0.1:0", ":99999", "${env:HOME}", "${env:NOPE:-5s}", "read", "frobnicate", "a in (b",
                     "\x00", "\n", "\udcff"]),
    st.text(max_size=20),
)  # fmt: skip
config_values = st.recursive(
    SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.sampled_from(KEYS), children, max_size=5),
    ),
    max_leaves=25,
)
config_documents = st.dictionaries(st.sampled_from(KEYS[:5]), config_values, max_size=5)


def assert_one_line_config_error(path: Path) -> None:
    try:
        load_config(str(path), environ={"HOME": "/root"})
    except ConfigError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message, message
        assert len(message) < 1000, message
        assert message.startswith(str(path)), message
        assert "internal error" not in message, message  # the safety net caught a bug
    # Anything else (TypeError, RecursionError...) fails the test by escaping.


@fuzz()
@given(config_documents)
def test_config_from_generated_documents_only_raises_config_error(tmp_path_factory: pytest.TempPathFactory,
                                                                 document: dict) -> None:  # fmt: skip
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    try:
        text = yaml.safe_dump(document, allow_unicode=True)
    except yaml.YAMLError:
        assume(False)
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    assert_one_line_config_error(path)


@fuzz()
@given(st.one_of(
    garbage_text,
    st.lists(st.sampled_from(["kpod:", "  ", "- ", "[", "]", "{", "}", ": ", "&a ", "*a", "!!python/object:os.system",
                              "\t", "%YAML 1.1", "---", "...", "? ", "'", '"', "|", ">", "poll_interval", "\n"]),
             max_size=30).map("".join),
))  # fmt: skip
def test_config_from_arbitrary_text_only_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, text: str
) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "config.yaml"
    path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert_one_line_config_error(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Huge values that YAML reads fine, in every numeric field kind.
        ("kpod:\n  poll_interval: 1" + "0" * 400 + "\n", "kpod.poll_interval: duration 1000"),
        ("kpod:\n  bpf: {map_max_entries: 1" + "0" * 400 + "}\n", "kpod.bpf.map_max_entries: must be between"),
        ("kpod:\n  poll_interval: .inf\n", "kpod.poll_interval: expected a duration"),
        ("kpod:\n  cycle_timeout: 25h\n", "kpod.cycle_timeout: duration '25h' is out of range"),
        ("kpod:\n  discovery: {kubelet: {poll_interval: 0.5s}}\n", ""),
        ("kpod:\n  bpf: {map_max_entries: 2000000}\n", "kpod.bpf.map_max_entries: must be between 1 and 1048576"),
        ("kpod:\n  bpf: {map_max_entries: 0}\n", "kpod.bpf.map_max_entries: must be between 1 and 1048576"),
        # Nesting that exhausts a recursive parser; a self-referencing alias.
        ("kpod: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply"),
        ("kpod: &a {filter: *a}\n", "recursive"),
        # 10,000 syscalls, and a list of 10,000 unknown ones: the count is refused first, briefly.
        ("kpod:\n  syscall: {tracked_syscalls: [" + ", ".join(f"s{i}" for i in range(10000)) + "]}\n",
         "at most 1000 items, got 10000"),
        # A huge string where a string belongs, and where a list belongs.
        ("kpod:\n  node_name: [" + ", ".join(["x" * 50] * 3000) + "]\n", "kpod.node_name: expected a string"),
        # Plugins that do not exist, as a receiver, a processor and an exporter.
        ("receivers:\n  kprobe_everything: {}\n", "unknown receiver type 'kprobe_everything'"),
        ("processors:\n  evil: {}\n", "unknown processor type 'evil'"),
        ("exporters:\n  'x/../../etc': {}\n", "a component id is type[/name]"),
        # Python object tags are not constructed (safe loader).
        ("kpod: !!python/object/apply:os.system ['true']\n", "YAML syntax error"),
    ],
)
def test_hostile_valid_yaml_is_rejected_in_one_short_line(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    if not expected:  # below the minimum the kubelet poll accepts? it is allowed: a clean load
        load_config(str(path), environ={})
        return
    with pytest.raises(ConfigError) as caught:
        load_config(str(path), environ={})
    message = str(caught.value)
    assert "\n" not in message and len(message) < 500, message
    assert message.startswith(str(path)), message
    assert expected in message, message


# ------------------------------------------------------------------------------ kubelet /pods and the watch stream

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.text(max_size=12))  # fmt: skip
POD_KEYS = ["metadata", "spec", "status", "uid", "name", "namespace", "labels", "annotations", "containers",
            "containerStatuses", "initContainerStatuses", "containerID", "lastState", "terminated", "hostNetwork",
            "phase", "deletionTimestamp", "resourceVersion", "items", "kind", "continue", "type", "object", "code",
            "message", "kubernetes.io/config.hash"]  # fmt: skip
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(st.sampled_from(POD_KEYS), children,
                                                                               max_size=5)),
    max_leaves=30,
)  # fmt: skip


@st.composite
def mutated_pods(draw: st.DrawFn) -> dict:
    """A realistic pod with a few fields replaced by anything JSON can hold."""
    uid = draw(st.uuids()).hex
    pod = {
        "metadata": {"uid": uid, "name": "web-1", "namespace": "shop", "labels": {"app": "web"},
                     "resourceVersion": "7"},
        "spec": {"containers": [{"name": "app"}], "hostNetwork": False},
        "status": {"phase": "Running", "containerStatuses": [
            {"name": "app", "containerID": "containerd://" + "a" * 64, "lastState": {}}]},
    }  # fmt: skip
    for _ in range(draw(st.integers(0, 4))):
        path = draw(st.lists(st.sampled_from(POD_KEYS), min_size=1, max_size=3))
        node = pod
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                break
            node = child
        else:
            node[path[-1]] = draw(json_values)
    return pod


def check_pod(pod: PodInfo) -> None:
    """Only strings reach label values; the uid is lower case."""
    assert isinstance(pod.uid, str) and pod.uid == pod.uid.lower() and pod.uid
    assert isinstance(pod.name, str) and isinstance(pod.namespace, str) and isinstance(pod.phase, str)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in pod.labels.items())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in pod.containers.items())


def decode_in_pieces(data: bytes, cuts: list[int]) -> PodListPage:
    """The decoder fed `data` cut at `cuts` (the kubelet's body arrives in chunks)."""
    decoder = PodListDecoder()
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    for start, end in itertools.pairwise(points):
        decoder.feed(data[start:end])
    return decoder.finish()


@fuzz()
@given(st.lists(st.one_of(mutated_pods(), json_values), max_size=6), json_values, st.lists(st.integers(0), max_size=8))
def test_pod_list_skips_and_counts_bad_items(items: list, metadata: object, cuts: list[int]) -> None:
    document = {"kind": "PodList", "metadata": metadata, "items": items}
    data = json.dumps(document).encode()
    page = decode_pod_list(data)
    assert decode_in_pieces(data, cuts) == page
    for pod in page.pods:
        check_pod(pod)
    assert len(page.pods) + page.skipped == len(items)
    assert isinstance(page.resource_version, str) and isinstance(page.cont, str)
    # Each item alone: it is either a pod or skipped, the same as in the list.
    usable = 0
    for item in items:
        try:
            check_pod(pod_from_json(item))
            usable += 1
        except (ValueError, AttributeError, TypeError):
            pass
    assert usable == len(page.pods)


@fuzz()
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode()),
                 st.integers(1, 20000).map(lambda n: b"[" * n + b"]" * n),
                 st.integers(1, 20000).map(lambda n: b'{"items":' * n)))  # fmt: skip
@example(b'{"":null,"":0.0}')  # found by this test: "0" of "0.0" fed alone was taken whole
def test_pod_list_on_garbage_raises_only_value_error(data: bytes) -> None:
    try:
        pods = decode_pod_list(data, logging.getLogger("fuzz")).pods
    except ValueError as error:
        assert "\n" not in str(error) and len(str(error)) < 200
        # Fed byte by byte it fails the same way.
        with pytest.raises(ValueError, match=re.escape(str(error))):
            decode_in_pieces(data, list(range(len(data))))
        return
    for pod in pods:
        check_pod(pod)
    assert decode_in_pieces(data, list(range(len(data)))).pods == pods
    # What the decoder replaces (json.loads, then each item) keeps the same pods.
    assert [pod_from_json(item) for item in json.loads(data)["items"] if _usable(item)] == pods


def _usable(item: object) -> bool:
    try:
        pod_from_json(item)  # type: ignore[arg-type]
        return True
    except (ValueError, AttributeError, TypeError, RecursionError):
        return False


@fuzz()
@given(st.one_of(
    st.binary(max_size=200),
    st.builds(lambda kind, obj: json.dumps({"type": kind, "object": obj}).encode(),
              st.sampled_from(["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "BOGUS", None, 5]),
              st.one_of(mutated_pods(), json_values)),
    st.integers(1, 20000).map(lambda n: b'{"type":"ADDED","object":' + b"[" * n),
))  # fmt: skip
def test_watch_event_decoder_never_raises(line: bytes) -> None:
    event = decode_watch_event(line)
    assert event.kind in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR", "SKIP")
    assert isinstance(event.resource_version, str) and isinstance(event.uid, str)
    if event.pod is not None:
        check_pod(event.pod)
    if event.kind == "ERROR":
        assert event.code is None or type(event.code) is int


def test_watch_event_decoder_keeps_what_the_informer_needs() -> None:
    pod = {"metadata": {"uid": "ABC", "name": "web", "namespace": "ns", "resourceVersion": "12"}}
    added = decode_watch_event(json.dumps({"type": "ADDED", "object": pod}))
    assert (added.kind, added.resource_version, added.pod and added.pod.uid) == ("ADDED", "12", "abc")
    deleted = decode_watch_event(json.dumps({"type": "DELETED", "object": pod}).encode())
    assert (deleted.kind, deleted.uid) == ("DELETED", "abc")
    gone = decode_watch_event(b'{"type":"ERROR","object":{"kind":"Status","code":410,"message":"too old"}}')
    assert (gone.kind, gone.code, gone.reason) == ("ERROR", 410, "too old")
    malformed = decode_watch_event(b'{"type":"MODIFIED","object":{"metadata":{"resourceVersion":"13"}}}')
    assert (malformed.kind, malformed.pod, malformed.resource_version) == ("MODIFIED", None, "13")
    assert decode_watch_event(b"not json").kind == "SKIP"
    assert decode_watch_event(b"[1]").kind == "SKIP"
    assert decode_watch_event(b'{"type":"BOGUS"}').kind == "SKIP"


# ------------------------------------------------------------------------------ label values in the exposition

HOSTILE_VALUES = ['a"b', "back\\slash", "new\nline", 'x"} 1\nkpod_fake{pod="y', "caf\udce9", "\\n", "\udcff\udcfe",
                  "", "\u2028sep", "\r", "} 1", "# HELP kpod_fake x"]  # fmt: skip
label_values = st.one_of(st.sampled_from(HOSTILE_VALUES), st.text(max_size=20),
                         st.binary(max_size=12).map(lambda b: b.decode("utf-8", "surrogateescape")))  # fmt: skip


def expected_exposed(value: str) -> str:
    """A value as a scraper must read it back: non-UTF-8 bytes replaced, the rest unchanged."""
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


@fuzz(0.5)
@given(name=label_values, namespace=label_values, label=label_values, container=label_values)
def test_pod_data_cannot_inject_series_through_k8sattributes(name: str, namespace: str, label: str,
                                                            container: str) -> None:  # fmt: skip
    """Hostile pod data from the API goes through k8sattributes (with include_labels) and the
    renderer; prometheus_client's parser reads back exactly one series with the same values."""
    from kpod.processors.k8sattributes.config import K8sAttributesConfig
    from kpod.processors.k8sattributes.processor import K8sAttributesProcessor

    from kpod.cgroup.index import CgroupIndex
    from kpod.component import Context
    from kpod.selfmetrics import SelfMetrics
    from kpod.settings import KpodSettings

    settings = KpodSettings()
    settings.discovery.mode = "informer"
    settings.node_name = "node-a"
    settings.filter.exclude_namespaces = []
    settings.filter.include_labels = ["team", 'we"ird\\key']
    processor = K8sAttributesProcessor(
        Context("k8sattributes", settings, CgroupIndex("/nonexistent"), SelfMetrics(), logging.getLogger("fuzz")),
        K8sAttributesConfig(),
    )
    uid = "0a1b2c3d-0000-4000-8000-000000000001"
    cid = "a38b6325e8f53ac409df59c7e8415bdad54139296ebfa17f5dbb24a9774ed983"
    pod = {
        "metadata": {"uid": uid, "name": name, "namespace": namespace,
                     "labels": {"team": label, 'we"ird\\key': name + label}},
        "spec": {"containers": [{"name": container}]},
        "status": {"containerStatuses": [{"name": container, "containerID": f"containerd://{cid}"}]},
    }  # fmt: skip
    assert processor.store is not None
    processor.store.replace([pod_from_json(pod)])
    path = (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
        f"{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope"
    )
    metric = MetricDef("kpod.test.value", Kind.COUNTER, "1", "help")
    batch = processor.process(Batch([Point(metric, CgroupRef(7, path), (("interface", label),), 3.0)]))
    assert len(batch.points) == 1, "the pod must resolve"
    text, _, series = Renderer().render(batch)
    assert series == 1
    families = list(text_string_to_metric_families(text.decode("utf-8")))
    assert [f.name for f in families] == ["kpod_test_value"]
    (sample,) = families[0].samples
    assert sample.value == 3.0
    labels = sample.labels
    assert labels["pod"] == expected_exposed(name)
    assert labels["namespace"] == expected_exposed(namespace)
    assert labels["container"] == expected_exposed(container)
    assert labels["interface"] == expected_exposed(label)
    assert labels["label_team"] == expected_exposed(label)
    assert labels["label_we_ird_key"] == expected_exposed(name + label)
    # Exactly the HELP, TYPE and one sample line: nothing a value carried became a line (the
    # format's only line separator is \n; \r, \x1e or \u2028 in a value are just characters).
    assert text.count(b"\n") == 3
