"""kpod.kernel.libbpf map primitives on a real kernel map (loaded, never attached).

The cpu_sched object is loaded without attaching anything, so only this test writes to its
per-cgroup hash map: every value read back is one the test put there.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import subprocess
from collections.abc import Iterator

import pytest
from helpers import BpftoolBtf
from kernel_util import REPO, kernel_test

from kpod.kernel import bpfinfo, btflayout, libbpf

pytestmark = kernel_test

OBJECT = str(REPO / "bpf" / "cpu_sched.bpf.o")
# enum bpf_prog_type (uapi), by the name bpftool shows.
BPF_PROG_TYPE = {"tracepoint": 5, "raw_tracepoint": 17, "tracing": 26}


@pytest.fixture
def loaded() -> Iterator[libbpf.BpfObject]:
    obj = libbpf.BpfObject.open(OBJECT)
    obj.maps["sched_cgroups"].set_max_entries(64)
    try:
        obj.load()
        yield obj
    finally:
        obj.close()


def _key(layout: btflayout.MapLayout, cgroup_id: int) -> bytes:
    key = layout.key_type()
    key.cgroup_id = cgroup_id
    return bytes(key)


def _value(layout: btflayout.MapLayout, switches: int) -> bytes:
    value = layout.value_type()
    value.switches = switches
    value.runq.slots[3] = switches * 2
    value.runq.sum = switches * 3
    return bytes(value)


def test_update_lookup_iterate_batch_delete(loaded: libbpf.BpfObject) -> None:
    layout = btflayout.map_layouts(loaded)["sched_cgroups"]
    bpf_map = loaded.maps["sched_cgroups"]
    assert bpf_map.max_entries == 64
    ids = list(range(1000, 1050))
    for i in ids:
        bpf_map.update(_key(layout, i), _value(layout, i), libbpf.BPF_NOEXIST)
    with pytest.raises(libbpf.LibbpfError) as exc:
        bpf_map.update(_key(layout, ids[0]), _value(layout, 0), libbpf.BPF_NOEXIST)
    assert exc.value.errno == errno.EEXIST

    assert bpf_map.count() == 50
    assert {layout.key(k).cgroup_id for k in bpf_map.keys()} == set(ids)  # noqa: SIM118 - a BPF map
    raw = bpf_map.lookup(_key(layout, 1007))
    assert raw is not None
    value = layout.value(raw)
    assert (value.switches, value.runq.slots[3], value.runq.sum) == (1007, 2014, 3021)
    assert bpf_map.lookup(_key(layout, 1)) is None

    # Small chunks: several batch calls, cursor carried between them.
    pairs = bpf_map.lookup_batch(chunk=7)
    assert sorted(layout.key(k).cgroup_id for k, _ in pairs) == ids
    assert all(layout.value(v).switches == layout.key(k).cgroup_id for k, v in pairs)
    # One entry per call: a bucket holding two (50 keys in 64 buckets: some do) does not fit,
    # the kernel answers ENOSPC without moving the cursor, and the call is made again bigger.
    assert sorted(layout.key(k).cgroup_id for k, _ in bpf_map.lookup_batch(chunk=1)) == ids

    # A missing key in the middle stops the kernel's batch; the rest are deleted anyway.
    doomed = [_key(layout, i) for i in ids[:10]] + [_key(layout, 1)] + [_key(layout, i) for i in ids[10:20]]
    assert bpf_map.delete_batch(doomed) == 20
    assert bpf_map.count() == 30
    assert bpf_map.delete(_key(layout, ids[-1])) is True
    assert bpf_map.delete(_key(layout, ids[-1])) is False


def test_interleaved_batch_reads_do_not_write_into_each_other(loaded: libbpf.BpfObject) -> None:
    """Batch reads write into memory kept between reads; a read started while another is
    between two batches (two collecting threads) gets memory of its own."""
    layout = btflayout.map_layouts(loaded)["sched_cgroups"]
    bpf_map = loaded.maps["sched_cgroups"]
    ids = list(range(2000, 2040))
    for i in ids:
        bpf_map.update(_key(layout, i), _value(layout, i))
    assert bpf_map.count() == len(ids)  # the kept memory exists, and is free again
    first = bpf_map._batches(5)
    seen = next(first)[2]
    keys, _, count = next(first)  # not the map's first entries: a new read writes others there
    held = ctypes.string_at(keys, count * bpf_map.key_size)
    assert count > 0
    pairs = bpf_map.lookup_batch()
    assert sorted(layout.key(k).cgroup_id for k, _ in pairs) == ids
    assert all(layout.value(v).switches == layout.key(k).cgroup_id for k, v in pairs)
    assert ctypes.string_at(keys, count * bpf_map.key_size) == held  # not overwritten meanwhile
    assert seen + count + sum(n for _, _, n in first) == len(ids)


def test_full_hash_map_refuses_inserts(loaded: libbpf.BpfObject) -> None:
    layout = btflayout.map_layouts(loaded)["sched_cgroups"]
    bpf_map = loaded.maps["sched_cgroups"]
    for i in range(64):
        bpf_map.update(_key(layout, i + 1), _value(layout, 1))
    with pytest.raises(libbpf.LibbpfError) as exc:
        bpf_map.update(_key(layout, 10_000), _value(layout, 1))
    assert exc.value.errno == errno.E2BIG


def test_failed_load_explains_itself(caplog: pytest.LogCaptureFixture) -> None:
    """libbpf's log reaches Python logging and the exception, e.g. a map that cannot be created."""
    obj = libbpf.BpfObject.open(OBJECT)
    try:
        obj.maps["sched_errors"].set_max_entries(0)  # arrays need at least one entry
        with caplog.at_level(logging.DEBUG, logger="kpod.libbpf"), pytest.raises(libbpf.LibbpfError) as exc:
            obj.load()
        assert exc.value.log_lines, "libbpf's messages are kept on the exception"
        assert any("sched_errors" in line for line in exc.value.log_lines)
        assert any(r.name == "kpod.libbpf" for r in caplog.records)
    finally:
        obj.close()


def test_prog_info_from_kernel_btf(loaded: libbpf.BpfObject) -> None:
    """prog_info() lays bpf_prog_info out as the kernel's BTF says (bpftool's reading of
    /sys/kernel/btf/vmlinux), so every field it returns is the one bpftool shows."""
    program = loaded.programs["sched_switch"]
    info = bpfinfo.prog_info(program.fd)
    btf = BpftoolBtf("/sys/kernel/btf/vmlinux")
    struct_id = btf.named("STRUCT", "bpf_prog_info")
    assert ctypes.sizeof(type(info)) == btf.size(struct_id)
    assert btflayout.describe(type(info)) == btf.layout(struct_id)
    shown = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(info.id)],
                                      capture_output=True, text=True, check=True).stdout)  # fmt: skip
    assert bpfinfo.program_stats(program).id == info.id == shown["id"] > 0
    assert bytes(info.name).rstrip(b"\0").decode() == shown["name"] == "sched_switch"
    assert bytes(info.tag).hex() == shown["tag"]
    assert info.type == BPF_PROG_TYPE[shown["type"]]
    assert info.xlated_prog_len == shown["bytes_xlated"] > 0
    assert info.jited_prog_len == shown["bytes_jited"]
    assert info.nr_map_ids == len(shown["map_ids"]) > 0
    assert info.btf_id == shown["btf_id"] > 0
    assert info.created_by_uid == shown["uid"]


# ----------------------------------------------------------------------------- syscall refusals


def test_seccomp_mode_from_proc_status() -> None:
    from kpod.kernel.preflight import parse_seccomp_mode

    assert parse_seccomp_mode("Name:\tx\nSeccomp:\t2\nSeccomp_filters:\t1\n") == 2
    assert parse_seccomp_mode("Seccomp:\t0\n") == 0
    assert parse_seccomp_mode("Name:\tx\n") is None
    assert parse_seccomp_mode("Seccomp:\tgarbage\n") is None
    with open("/proc/self/status") as handle:
        assert parse_seccomp_mode(handle.read()) in (0, 1, 2)


def test_a_refusal_is_told_apart_by_capability_and_seccomp_mode() -> None:
    import errno

    from kpod.kernel.ebpf import SyscallProbe

    held = frozenset({"CAP_BPF", "CAP_PERFMON"})
    blocked = SyscallProbe(errno.EPERM, 0, 2, held)
    assert (blocked.refusal("bpf") or "").startswith("bpf() blocked by seccomp (EPERM under a seccomp filter")
    assert blocked.refusal("perf_event_open") is None
    assert blocked.summary() == "filter: bpf() BLOCKED by the filter (EPERM); perf_event_open() allowed"
    lacking = SyscallProbe(errno.EPERM, errno.EACCES, 2, frozenset({"CAP_PERFMON"}))
    assert lacking.refusal("bpf") == "bpf() refused (EPERM): this process lacks CAP_BPF"
    assert (lacking.refusal("perf_event_open") or "").startswith("perf_event_open() blocked by seccomp (EACCES")
    admin = SyscallProbe(errno.ENOSYS, 0, 2, frozenset({"CAP_SYS_ADMIN"}))
    assert (admin.refusal("bpf") or "").startswith("bpf() blocked by seccomp (ENOSYS")
    unfiltered = SyscallProbe(errno.EPERM, 0, 0, held)
    assert (unfiltered.refusal("bpf") or "").endswith("no seccomp filter: an LSM or lockdown")
    assert SyscallProbe(0, 0, 0, held).summary() == "disabled: bpf() allowed; perf_event_open() allowed"


def test_the_probe_here_loads_a_trivial_program() -> None:
    """On this host (root, no filter) both calls work, and a second ask costs nothing new."""
    from kpod.kernel.ebpf import bpf_preflight, syscall_probe

    probe = syscall_probe()
    assert (probe.bpf_errno, probe.perf_errno) == (0, 0), probe
    assert syscall_probe() is probe
    assert bpf_preflight() is None
