"""The pure parsers of kpod.cgroup.parsers, on files captured from real kernels (tests/fixtures).

Values asserted literally are the ones tests/fixtures/README.md marks exact (they come from
the workload: dd sizes, frame counts) or, where marked "as captured", the literal value in
the captured file.  The odd-input tests check that a parser keeps what parsed and never raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from cgroup_tree import FIXTURES, HYBRID, V2
from hypothesis import given, settings
from hypothesis import strategies as st

from kpod.cgroup import parsers as p

POD1 = "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice"
CRI = "/cri-containerd-{}.scope"
POD1_IO = POD1 + CRI.format("a38b6325e8f53ac409df59c7e8415bdad54139296ebfa17f5dbb24a9774ed983")
POD1_THROTTLED = POD1 + CRI.format("3c0c837a59a218341857c7aea4e6464fa8a940d7464c340799f75275162afcc9")
POD1_SANDBOX = POD1 + CRI.format("dfa15a989fae12701a7a9b2890bad323888b19ccf407ba514797a491c2d2a09a")
POD3_MEM = (
    "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0a1b2c3d_0000_4000_8000_000000000003.slice/"
    "cri-containerd-13bf7efd066cba86cb078dd995ca5edd1ca632bfe55d45fa78038acb8ce9dbd4.scope"
)
POD4 = "kubepods/burstable/pod0a1b2c3d-0000-4000-8000-000000000004"
POD4_IO = POD4 + "/16a5c6d1889da2b39df77fbad988e488b3439c045ffde5d674d4ec741d57202a"

def read(*parts: str) -> str:
    return FIXTURES.joinpath(*parts).read_text()


# ---------------------------------------------------------------------------------- io.stat


def test_io_stat_container_exact_bytes_v2_61() -> None:
    stats = p.parse_io_stat((V2 / POD1_IO / "io.stat").read_text())
    assert set(stats) == {(254, 0)}
    dev = stats[(254, 0)]
    # Exact: dd wrote 8 MiB and read 4 MiB with O_DIRECT.  rios/wios are as captured.
    assert dev["rbytes"] == 4194304
    assert dev["wbytes"] == 8388608
    assert dev["dbytes"] == 0 and dev["dios"] == 0
    assert dev["rios"] == 4 and dev["wios"] == 8


def test_io_stat_cgroupfs_driver_and_root() -> None:
    dev = p.parse_io_stat((V2 / POD4_IO / "io.stat").read_text())[(254, 0)]
    assert (dev["rbytes"], dev["wbytes"]) == (2097152, 4194304)
    root = p.parse_io_stat((V2 / "io.stat").read_text())[(254, 0)]
    # The root line equals /proc/diskstats' sectors * 512.
    fields = read("cgroup-v2-kernel-6.1", "proc", "diskstats-vda-line.txt").split()
    assert root["rbytes"] == int(fields[5]) * 512 == 6315008
    assert root["wbytes"] == int(fields[9]) * 512 == 25202688


def test_io_stat_empty_file_means_no_io() -> None:
    assert (V2 / POD1_SANDBOX / "io.stat").read_text() == ""
    assert p.parse_io_stat("") == {}


def test_io_stat_odd_input() -> None:
    text = (
        "254:0 rbytes=10 wbytes=20 rios=1 wios=2 dbytes=0 dios=0 cost.vrate=100 cost.usage=5\n"
        "8:16 rbytes=oops wbytes=7 =3 rios\n"  # bad pairs dropped one by one
        "garbage line\n"
        "259:1 rbytes=1 wby"  # truncated mid-pair
        "\n7:0\n"  # device with no pairs: nothing to report
        "\x00\xff:\n"
    )
    stats = p.parse_io_stat(text)
    assert stats[(254, 0)]["cost.vrate"] == 100  # unknown fields kept
    assert stats[(8, 16)] == {"wbytes": 7}
    assert stats[(259, 1)] == {"rbytes": 1}
    assert (7, 0) not in stats
    assert len(stats) == 3


# ---------------------------------------------------------------------------------- blkio v1


def test_blkio_throttle_exact_bytes_hybrid_618() -> None:
    base = HYBRID / "blkio" / "kpod-fixture-blkio"
    service = p.parse_blkio_throttle((base / "blkio.throttle.io_service_bytes").read_text())
    assert service == {
        (7, 0): {
            "Read": 2097152, "Write": 4194304, "Sync": 6291456, "Async": 0, "Discard": 0, "Total": 6291456,
        }
    }  # fmt: skip
    ios = p.parse_blkio_throttle((base / "blkio.throttle.io_serviced").read_text())
    assert ios[(7, 0)]["Read"] == 4 and ios[(7, 0)]["Write"] == 4  # as captured
    recursive = p.parse_blkio_throttle((base / "blkio.throttle.io_service_bytes_recursive").read_text())
    assert recursive == service


def test_blkio_total_zero_only_is_no_data() -> None:
    base = HYBRID / "blkio" / "kpod-fixture-blkio-norule"
    for name in ("blkio.throttle.io_service_bytes", "blkio.throttle.io_serviced"):
        text = (base / name).read_text()
        assert text.strip() == "Total 0"
        assert p.parse_blkio_throttle(text) == {}


def test_blkio_odd_input() -> None:
    text = "8:0 Read 5\n8:0 Write\n8:0 Frobnicate 3\nx:y Read 1\n8:0 Write 9 extra\n8:16 Read 2\nTotal 7\n8:"
    assert p.parse_blkio_throttle(text) == {(8, 0): {"Read": 5}, (8, 16): {"Read": 2}}
    assert p.parse_blkio_throttle("") == {}


# ---------------------------------------------------------------------------------- cpu.stat


def test_cpu_stat_61_with_controller() -> None:
    stat = p.parse_cpu_stat((V2 / POD1_THROTTLED / "cpu.stat").read_text())
    assert list(stat) == [
        "usage_usec", "user_usec", "system_usec", "nr_periods", "nr_throttled", "throttled_usec",
        "nr_bursts", "burst_usec",
    ]  # fmt: skip
    assert stat["nr_throttled"] > 0  # guaranteed by the workload
    assert stat["usage_usec"] == 456380 and stat["throttled_usec"] == 1703669  # as captured
    assert "nice_usec" not in stat


def test_cpu_stat_618_controllerless() -> None:
    stat = p.parse_cpu_stat((HYBRID / "unified" / "kpod-fixture-unified" / "cpu.stat").read_text())
    assert stat == {"usage_usec": 1024668, "user_usec": 1004653, "system_usec": 20014, "nice_usec": 0}
    assert stat["usage_usec"] >= 1_000_000  # the workload burned 1 s of CPU


def test_flat_keyed_counts_skipped_lines() -> None:
    values, skipped = p.parse_flat_keyed("a 1\nb\nc 2 3\nd x\n\ne -4\nf 1_000\ng \u0663\nh 7")
    assert values == {"a": 1, "e": -4, "h": 7}
    assert skipped == 5  # b, c, d, f (underscore), g (non-ASCII digit)
    assert p.parse_flat_keyed("") == ({}, 0)


# ---------------------------------------------------------------------------------- memory


def memory_stat(text: str) -> dict[str, int]:
    """memory.stat is flat keyed; the receivers read single keys (parse_flat_keyed_value)."""
    return p.parse_flat_keyed(text)[0]


def test_memory_stat_v2_exact_shmem() -> None:
    stat = memory_stat((V2 / POD3_MEM / "memory.stat").read_text())
    assert len(stat) == 51  # fixtures README, surprise 4
    assert stat["shmem"] == 8388608  # exact: the 8 MiB tmpfs file
    assert stat["anon"] >= 16 * 1024 * 1024
    assert stat["file"] >= stat["shmem"]  # v2 file includes shmem
    assert "inactive_file" in stat and "total_inactive_file" not in stat


def test_memory_current_and_v1_usage() -> None:
    assert p.parse_single_int((V2 / POD3_MEM / "memory.current").read_text()) == 29491200
    mem = HYBRID / "memory" / "kpod-fixture-mem"
    assert p.parse_single_int((mem / "memory.usage_in_bytes").read_text()) == 24051712
    v1 = memory_stat((mem / "memory.stat").read_text())
    assert v1["rss"] >= 16 * 1024 * 1024
    assert v1["total_inactive_file"] == 2150400 and v1["inactive_file"] == 2150400
    assert v1["hierarchical_memory_limit"] == 9223372036854771712


@pytest.mark.parametrize("text", ["", "max\n", "12 13\n", "1.5\n", "-\n", "\xff\n"])
def test_single_int_odd(text: str) -> None:
    assert p.parse_single_int(text) is None


# ---------------------------------------------------------------------------------- PSI


def test_pressure_files() -> None:
    cpu = p.parse_pressure_totals((V2 / "cpu.pressure").read_text())
    assert cpu == {"some": 3710609, "full": 0}  # root full line is zeros in 6.1
    hybrid = HYBRID / "unified" / "kpod-fixture-unified"
    assert p.parse_pressure_totals((hybrid / "io.pressure").read_text()) == {"some": 202, "full": 202}
    assert p.parse_pressure_totals((hybrid / "cpu.pressure").read_text())["full"] == 54


def test_pressure_odd_input() -> None:
    text = (
        "some avg10=1.00 avg60=x total=10 extra=1\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 tot"  # truncated: no total, skipped
        "\nmedium avg10=1 total=3\n"
    )
    assert p.parse_pressure_totals(text) == {"some": 10}
    assert p.parse_pressure_totals("") == {}
    assert p.parse_pressure_totals("full avg10=nan avg60=inf avg300=0 total=5") == {"full": 5}
    assert p.parse_pressure_totals("some avg10=0.00 total=-5\nfull total=1.5\n") == {}


# ---------------------------------------------------------------------------------- net/dev


def test_net_dev_pod_exact() -> None:
    ifaces = p.parse_net_dev(read("cgroup-v2-kernel-6.1", "proc", "net-dev-pod.txt"))
    assert set(ifaces) == {"lo", "eth0"}
    eth0 = ifaces["eth0"]
    # Exact: 5 x 250 + 2 x 60 bytes received (2 dropped), 10 x 100 bytes sent.
    assert (eth0.rx_bytes, eth0.rx_packets, eth0.rx_errors, eth0.rx_drops) == (1370, 7, 0, 2)
    assert (eth0.tx_bytes, eth0.tx_packets, eth0.tx_errors, eth0.tx_drops) == (1000, 10, 0, 0)
    assert ifaces["lo"] == p.NetDevCounters(*([0] * 16))


def test_net_dev_odd_input() -> None:
    text = (
        "Inter-|   Receive\n face |bytes packets\n"
        "eth0:123456789012 5 0 0 0 0 0 0 7 1 0 0 0 0 0 0\n"  # a wide number touching the name
        "eth1: 1 2 3\n"  # truncated
        "eth2: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 x\n"
        "veth\u00e9: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16\n"
    )
    ifaces = p.parse_net_dev(text)
    assert set(ifaces) == {"eth0", "veth\u00e9"}
    assert ifaces["eth0"].rx_bytes == 123456789012 and ifaces["eth0"].tx_bytes == 7
    assert ifaces["veth\u00e9"].tx_compressed == 16


# ---------------------------------------------------------------------------------- mountinfo


def test_mountinfo_container() -> None:
    mounts = p.parse_mountinfo(read("cgroup-v2-kernel-6.1", "proc", "mountinfo-container.txt"))
    assert len(mounts) == 18
    by_point = {m.mount_point: m for m in mounts}
    root = by_point["/"]
    assert (root.mount_id, root.parent_id, root.dev, root.fstype) == (45, 42, (0, 24), "overlay")
    data = by_point["/data"]
    assert data.fstype == "tmpfs" and "size=16384k" in data.super_options and data.root == "/"
    hosts = by_point["/etc/hosts"]
    assert hosts.root == "/var/lib/kubelet/pods/0a1b2c3d-0000-4000-8000-000000000003/etc-hosts"
    assert hosts.dev == (0, 24)
    assert by_point["/run/netns/cni-0a1b2c3d-0000-4000-8000-000000000001"].fstype == "nsfs"
    assert by_point["/mnt/data"].dev == (254, 0) and by_point["/mnt/data"].source == "/dev/vda"


def test_mountinfo_optional_fields_and_escapes() -> None:
    mounts = p.parse_mountinfo(read("cgroup-v2-kernel-6.1", "proc", "mountinfo-host-v2.txt"))
    netns = next(m for m in mounts if m.fstype == "nsfs")
    assert netns.optional == ("shared:2",)
    text = (
        "90 45 0:50 / /mnt/with\\040space rw - tmpfs tmpfs rw\n"
        "91 45 0:51 / /x rw - tmpfs tmpfs\n"  # no super options (truncated): still a mount
        "94 45 0:53 / /w rw - tmpfs\n"  # no source: too short, skipped
        "92 45 0:5x / /y rw - tmpfs tmpfs rw\n"  # bad device: skipped
        "93 45 0:52 / /z rw\n"  # no separator: skipped
    )
    parsed = p.parse_mountinfo(text)
    assert [m.mount_point for m in parsed] == ["/mnt/with space", "/x"]
    assert parsed[1].source == "tmpfs" and parsed[1].super_options == ""


def test_mountinfo_hybrid_host() -> None:
    mounts = p.parse_mountinfo(read("cgroup-hybrid-kernel-6.18", "proc", "mountinfo-host-hybrid.txt"))
    cgroup = {m.mount_point: m.super_options for m in mounts if m.fstype == "cgroup"}
    assert cgroup["/sys/fs/cgroup/blkio"] == "rw,blkio"
    assert [m.mount_point for m in mounts if m.fstype == "cgroup2"] == ["/sys/fs/cgroup/unified"]


# ---------------------------------------------------------------------------------- uevent, procs


def test_uevent_devname() -> None:
    assert p.parse_devname(read("cgroup-v2-kernel-6.1", "sys", "dev-block-uevent.txt")) == "vda"
    assert p.parse_devname(read("cgroup-hybrid-kernel-6.18", "sys", "dev-block-uevent-loop0.txt")) == "loop0"
    uevent = p.parse_uevent(read("cgroup-hybrid-kernel-6.18", "sys", "dev-block-uevent-vda.txt"))
    assert uevent == {"MAJOR": "254", "MINOR": "0", "DEVNAME": "vda", "DEVTYPE": "disk", "DISKSEQ": "9"}
    assert p.parse_devname("MAJOR=8\nDEVNAME=\n") is None
    assert p.parse_devname("") is None


def test_cgroup_procs() -> None:
    assert p.parse_cgroup_procs((V2 / POD1_SANDBOX / "cgroup.procs").read_text()) == [197]
    assert p.parse_cgroup_procs((V2 / POD1_IO / "cgroup.procs").read_text()) == []
    root = p.parse_cgroup_procs((V2 / "cgroup.procs").read_text())
    assert 1 in root and len(root) > 10
    assert p.parse_cgroup_procs("12\n\nabc\n-3\n0\n4") == [12, 4]


def test_devnum() -> None:
    assert p.parse_devnum("254:0") == (254, 0)
    for bad in ("254", "a:0", "1:-1", ":", "1:2:3", ""):
        assert p.parse_devnum(bad) is None


# ---------------------------------------------------------------------------------- never raise

PARSERS = [
    p.parse_io_stat, p.parse_blkio_throttle, p.parse_cpu_stat, p.parse_single_int,
    p.parse_pressure_totals, p.parse_net_dev, p.parse_mountinfo, p.parse_uevent, p.parse_devname,
    p.parse_cgroup_procs, p.parse_flat_keyed,
]  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_parsers_never_raise_on_garbage_bytes(data: bytes) -> None:
    text = data.decode("utf-8", "surrogateescape")
    for parse in PARSERS:
        parse(text)


def is_part_of(part: object, whole: object) -> bool:
    """`part` holds only what `whole` holds: dict entries equal (recursively), a list a prefix."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return all(key in whole and is_part_of(value, whole[key]) for key, value in part.items())
    if isinstance(part, list) and isinstance(whole, list):
        return part == whole[: len(part)]
    return part == whole


@pytest.mark.parametrize(
    ("relative", "parse"),
    [
        ("cgroup-v2-kernel-6.1/io.stat", p.parse_io_stat),
        ("cgroup-v2-kernel-6.1/cpu.stat", p.parse_cpu_stat),
        ("cgroup-v2-kernel-6.1/cpu.pressure", p.parse_pressure_totals),
        ("cgroup-v2-kernel-6.1/proc/net-dev-pod.txt", p.parse_net_dev),
        ("cgroup-v2-kernel-6.1/proc/mountinfo-container.txt", p.parse_mountinfo),
        ("cgroup-hybrid-kernel-6.18/blkio/kpod-fixture-blkio/blkio.throttle.io_service_bytes", p.parse_blkio_throttle),
        ("cgroup-hybrid-kernel-6.18/memory/kpod-fixture-mem/memory.stat", memory_stat),
        (f"cgroup-v2-kernel-6.1/{POD3_MEM}/cgroup.procs", p.parse_cgroup_procs),
    ],
    ids=lambda value: getattr(value, "__name__", None) or str(value).rsplit("/", 1)[-1],
)
def test_truncation_at_every_offset_keeps_the_complete_lines(relative: str, parse: Callable[[str], object]) -> None:
    """A read cut anywhere (a cgroup removed mid-read) parses into a part of the data: every
    complete line as in the whole file, and at most one entry more (the cut line, whose value
    may be cut short).  No other parser raises on the cut text either."""
    text = read(*relative.split("/"))
    full = parse(text)
    assert full, "the captured file parses into something"
    for cut in range(len(text)):
        truncated = parse(text[:cut])
        complete = parse(text[: text.rfind("\n", 0, cut) + 1])
        assert is_part_of(complete, full), (cut, complete)
        assert is_part_of(complete, truncated), (cut, truncated)
        assert len(truncated) - len(complete) <= 1, (cut, truncated)  # type: ignore[arg-type]
        for other in PARSERS:
            other(text[:cut])


# ---------------------------------------------------------------------------------- fast paths


def test_flat_keyed_value_agrees_with_full_parse() -> None:
    for text in (
        (V2 / POD3_MEM / "memory.stat").read_text(),
        (HYBRID / "memory/kpod-fixture-mem/memory.stat").read_text(),
    ):
        full, _ = p.parse_flat_keyed(text)
        for key, value in full.items():
            assert p.parse_flat_keyed_value(text, key) == value
    assert p.parse_flat_keyed_value((V2 / POD3_MEM / "memory.stat").read_text(), "inactive_file") is not None
    # A key that is only a suffix or prefix of another is not matched.
    assert p.parse_flat_keyed_value("total_inactive_file 5\ninactive_filex 6\n", "inactive_file") is None
    assert p.parse_flat_keyed_value("inactive_file 5", "inactive_file") == 5
    assert p.parse_flat_keyed_value("a 1\ninactive_file x\n", "inactive_file") is None
    assert p.parse_flat_keyed_value("", "a") is None


def test_pressure_totals_agree_with_a_regex_reading() -> None:
    for path in (
        V2 / "cpu.pressure",
        V2 / POD1_THROTTLED / "cpu.pressure",
        HYBRID / "unified/kpod-fixture-unified/io.pressure",
    ):
        text = path.read_text()
        expected = {kind: int(total) for kind, total in re.findall(r"^(some|full) .*\btotal=(\d+)$", text, re.M)}
        assert expected and p.parse_pressure_totals(text) == expected
    assert p.parse_pressure_totals("some avg10=0 total=12\nfull avg10=0 tot") == {"some": 12}
    assert p.parse_pressure_totals("somewhat total=3\nfull total=-1\n") == {}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300), key=st.sampled_from(["inactive_file", "a", "total"]))
def test_fast_paths_never_raise(data: bytes, key: str) -> None:
    text = data.decode("utf-8", "surrogateescape")
    p.parse_flat_keyed_value(text, key)
    p.parse_pressure_totals(text)
