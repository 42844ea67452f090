"""Python's view of every BPF map struct == the BTF in the compiled objects.

kpod.kernel.btflayout builds ctypes types from BTF through libbpf's btf__ API.  Here the expected
layout comes from an independent reader, bpftool's JSON dump of the same object's BTF, and the
map -> key/value type mapping from the object's `.maps` DATASEC (not from libbpf).  Any
difference in a size or member offset fails.  The conventions the Python side relies on
(error-map members named like the maps, the histogram enum, cgroup keys) are checked too.
"""

from __future__ import annotations

import ctypes
import math
import platform
import random
import shutil
import subprocess
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from helpers import BpftoolBtf
from kernel_util import kernel_test

from kpod.kernel import btflayout, libbpf
from kpod.kernel.ebpf import CGROUP_KEY_FIELD, SHARED_MAPS, hist_bounds

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
# probe.bpf.o holds feature probes (kpod/kernel/probes.py): loaded one program at a time and
# never attached for long, it keeps no data and has no conventions to follow.
OBJECTS = sorted(p for p in BPF_DIR.glob("*.bpf.o") if p.name != "probe.bpf.o")
SOURCES = sorted(BPF_DIR.glob("*.bpf.c"))


def test_every_source_is_built() -> None:
    built = {p.name.removesuffix(".bpf.o") for p in OBJECTS}
    built |= {"probe"} if (BPF_DIR / "probe.bpf.o").exists() else set()
    missing = [s.name for s in SOURCES if s.name.removesuffix(".bpf.c") not in built]
    assert not missing, f"run `make bpf`: no object for {missing}"


@pytest.mark.parametrize("obj_path", OBJECTS, ids=lambda p: p.name)
def test_python_view_matches_btf(obj_path: Path) -> None:
    reference = BpftoolBtf(obj_path)
    with libbpf.BpfObject.open(str(obj_path)) as obj:
        layouts = btflayout.map_layouts(obj)
        expected_maps = reference.maps()
        assert set(layouts) == set(expected_maps), "every map has a Python view"
        for name, (key_id, value_id) in expected_maps.items():
            layout = layouts[name]
            assert ctypes.sizeof(layout.key_type) == reference.size(key_id), f"{name}: key size"
            assert ctypes.sizeof(layout.value_type) == reference.size(value_id), f"{name}: value size"
            assert ctypes.sizeof(layout.key_type) == obj.maps[name].key_size
            assert ctypes.sizeof(layout.value_type) == obj.maps[name].value_size
            assert btflayout.describe(layout.key_type) == reference.layout(key_id), f"{name}: key members"
            assert btflayout.describe(layout.value_type) == reference.layout(value_id), f"{name}: value members"


@pytest.mark.parametrize("obj_path", OBJECTS, ids=lambda p: p.name)
def test_conventions(obj_path: Path) -> None:
    with libbpf.BpfObject.open(str(obj_path)) as obj:
        layouts = btflayout.map_layouts(obj)
        errors = [n for n in obj.maps if n.endswith("_errors")]
        assert len(errors) == 1, "exactly one <prefix>_errors map per object"
        counted = set(layouts[errors[0]].value_fields())
        ours = {n for n in obj.maps if "." not in n}  # not libbpf's <object>.rodata (route flags)
        # kpod.bpf.h's shared maps are counted by their owner, cgroups.bpf.o.
        shared = set() if obj_path.name == "cgroups.bpf.o" else set(SHARED_MAPS)
        assert counted == ours - set(errors) - shared, "one error counter per map, named like the map"
        for name in obj.maps:
            assert len(name) <= 15, f"{name}: the kernel truncates map names to 15 characters"
        btf = btflayout.Btf(obj.btf_ptr)
        hist_maps = [n for n, lay in layouts.items() if lay.value_type_name == "struct kpod_hist"]
        if hist_maps:
            consts = btf.enum("kpod_hist_layout")
            slots_len = layouts[hist_maps[0]].value_type().slots._length_
            assert slots_len == consts["KPOD_HIST_SLOTS"]
        for name, layout in layouts.items():
            if layout.has_key_field(CGROUP_KEY_FIELD):
                assert obj.maps[name].type_name in ("hash", "lru_hash"), f"{name}: per-cgroup maps are hashes"


@pytest.mark.parametrize("obj_path", OBJECTS, ids=lambda p: p.name)
def test_readers_agree_with_the_ctypes_view(obj_path: Path) -> None:
    """key_field_reader and value_reader (struct, no ctypes object per entry) read what the
    ctypes key and value types read, on random bytes of every map's key and value size."""
    rng = random.Random(obj_path.name)
    with libbpf.BpfObject.open(str(obj_path)) as obj:
        layouts = btflayout.map_layouts(obj)
        cgroup_maps = [n for n, lay in layouts.items() if lay.has_key_field(CGROUP_KEY_FIELD)]
        for name in cgroup_maps:
            layout = layouts[name]
            cgroup_of, value_of = layout.key_field_reader(CGROUP_KEY_FIELD), layout.value_reader()
            for _ in range(20):
                raw_key = rng.randbytes(ctypes.sizeof(layout.key_type))
                raw_value = rng.randbytes(ctypes.sizeof(layout.value_type))
                assert cgroup_of(raw_key) == getattr(layout.key(raw_key), CGROUP_KEY_FIELD), name
                expected = layout.value(raw_value)
                got = value_of(raw_value)
                if isinstance(expected, ctypes._SimpleCData):
                    assert isinstance(got, int) and got == expected.value, name
                else:
                    assert type(got) is layout.value_type and bytes(got) == raw_value, name
    if obj_path.name == "mem.bpf.o":
        assert any(issubclass(layouts[n].value_type, ctypes._SimpleCData) for n in cgroup_maps), "integer values"


@pytest.mark.parametrize("ctype", [ctypes.c_uint64, ctypes.c_int32, ctypes.c_bool, ctypes.c_double, ctypes.c_char])
def test_value_reader_gives_a_simple_types_python_value(ctype: Any) -> None:
    """A map whose value is a simple type gives its Python value (as read_cgroup_map reported
    `value(raw).value` before the struct readers), whether struct can read it or not."""
    layout = btflayout.MapLayout("m", ctypes.c_uint64, ctype, "__u64", ctype.__name__)
    raw = bytes(ctype(1))
    assert layout.value_reader()(raw) == ctype.from_buffer_copy(raw).value


def test_map_names_unique_across_objects() -> None:
    seen: dict[str, str] = {}
    for obj_path in OBJECTS:
        with libbpf.BpfObject.open(str(obj_path)) as obj:
            for name in obj.maps:
                if name in SHARED_MAPS and obj_path.name != "cgroups.bpf.o":
                    continue  # kpod.bpf.h's, reused from cgroups.bpf.o: one kernel map
                assert name not in seen, f"map {name} in {obj_path.name} and {seen[name]}: the map label would clash"
                seen[name] = obj_path.name


def test_hist_bounds_are_powers_of_two_seconds() -> None:
    bounds = hist_bounds(20, 27)
    assert len(bounds) == 26  # the 27th slot is the +inf bucket
    assert bounds[0] == 2.0**-20 and bounds[20] == 1.0 and bounds[-1] == 32.0
    # The `le` labels are written from these floats: exact powers of two, nothing to round.
    assert all(math.frexp(b)[0] == 0.5 for b in bounds)
    assert [repr(b) for b in bounds[18:22]] == ["0.25", "0.5", "1.0", "2.0"]


# The kernel's own kpod_hist_slot() over chosen values, run by BPF_PROG_TEST_RUN.
HIST_SLOT_PROGRAM = r"""
#include "kpod.bpf.h"

/* The context BPF_PROG_TEST_RUN passes in (and copies back out) for a syscall program. */
struct hist_slot_io {
	__u64 ns;
	__u64 slot;
	enum kpod_hist_layout layout[0];  /* zero bytes: the slot mapping's constants in the BTF */
};

SEC("syscall")
int hist_slot(struct hist_slot_io *io)
{
	io->slot = kpod_hist_slot(io->ns);
	return 0;
}

char LICENSE[] SEC("license") = "GPL";
"""


class _HistSlotIo(ctypes.Structure):
    _fields_ = [("ns", ctypes.c_uint64), ("slot", ctypes.c_uint64)]


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf/bpf.h); only sz and retval are used here.
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32), ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int), ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32), ("batch_size", ctypes.c_uint32),
    ]  # fmt: skip


def native_slot(ns: int, zero_shift: int, slots: int) -> int:
    """The slot a value of `ns` nanoseconds belongs in, by exact rational arithmetic: the
    smallest i with ns / 1e9 <= 2^i (Prometheus schema 0 / OTel scale 0), plus zero_shift,
    clamped to the zero bucket below and the +inf slot above."""
    if ns == 0:
        return 0
    seconds = Fraction(ns, 10**9)
    i = math.floor(math.log2(seconds)) - 1  # a float guess, corrected exactly below
    while Fraction(2) ** i >= seconds:
        i -= 1
    while Fraction(2) ** i < seconds:
        i += 1
    return min(max(i + zero_shift, 0), slots - 1)


def hist_slot_inputs() -> list[int]:
    """Both sides of every native boundary the slots can express (2^i s is not an integer
    number of ns below 2^-9 s), bit-length edges of the log2 step, extremes, and random values."""
    values = {0, 1, 2, 511, 512, 953, 954, 1023, 1024, 2**63, 2**64 - 1}
    for i in range(-24, 40):
        edge = Fraction(2) ** i * 10**9
        low = math.floor(edge)
        values.update(v for v in (low - 1, low, low + 1, low + 2) if 0 <= v < 2**64)
    for bits in range(64):
        values.update(((1 << bits) - 1, 1 << bits))
    rng = random.Random(18)
    values.update(rng.randrange(0, 1 << rng.randrange(1, 64)) for _ in range(400))
    return sorted(v for v in values if 0 <= v < 2**64)


@kernel_test[0]
@kernel_test[1]
def test_kernel_hist_slot_is_the_native_bucket(tmp_path: Path) -> None:
    """kpod_hist_slot() as the kernel runs it puts every value in the slot whose bounds hold it
    exactly: (2^(i-1), 2^i] seconds, as Prometheus and OpenTelemetry read those buckets."""
    clang = shutil.which("clang")
    if clang is None:
        pytest.fail("clang is not installed (make system-packages)")
    src, obj_path = tmp_path / "hist_slot.bpf.c", tmp_path / "hist_slot.bpf.o"
    src.write_text(HIST_SLOT_PROGRAM)
    arch = {"x86_64": "x86", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
    subprocess.run(
        [clang, "-O2", "-g", "-Wall", "-Werror", "-target", "bpf", f"-D__TARGET_ARCH_{arch}", "-I", str(BPF_DIR),
         "-c", str(src), "-o", str(obj_path)],
        check=True,
    )  # fmt: skip
    inputs = hist_slot_inputs()
    with libbpf.BpfObject.open(str(obj_path)) as obj:
        consts = btflayout.Btf(obj.btf_ptr).enum("kpod_hist_layout")
        zero_shift, slots = consts["KPOD_HIST_ZERO_SHIFT"], consts["KPOD_HIST_SLOTS"]
        obj.load()
        run = libbpf.lib().bpf_prog_test_run_opts
        run.argtypes, run.restype = [ctypes.c_int, ctypes.c_void_p], ctypes.c_int
        fd = obj.programs["hist_slot"].fd
        got = []
        for value in inputs:
            io = _HistSlotIo(ns=value, slot=999)
            opts = _TestRunOpts(sz=ctypes.sizeof(_TestRunOpts), ctx_in=ctypes.addressof(io),
                                ctx_size_in=ctypes.sizeof(io))  # fmt: skip
            assert run(fd, ctypes.byref(opts)) == 0, f"BPF_PROG_TEST_RUN failed: errno {ctypes.get_errno()}"
            got.append(io.slot)
    want = [native_slot(v, zero_shift, slots) for v in inputs]
    wrong = [(v, g, w) for v, g, w in zip(inputs, got, want, strict=True) if g != w]
    assert not wrong, f"(ns, kernel slot, exact slot): {wrong[:10]}"
    # And the bounds userspace names are those slots' bounds: lower < value <= upper.
    bounds = [Fraction(b) for b in hist_bounds(zero_shift, slots)]
    for v, slot in zip(inputs, got, strict=True):
        seconds = Fraction(v, 10**9)
        assert slot == 0 or seconds > bounds[slot - 1], (v, slot)
        assert slot == slots - 1 or seconds <= bounds[slot], (v, slot)
    assert set(got) == set(range(slots)), "every slot was reached"


def test_btf_builder_on_kernel_uapi_struct() -> None:
    """bpf_prog_info from the running kernel's BTF: run_time_ns/run_cnt where the uapi puts them."""
    if not Path("/sys/kernel/btf/vmlinux").exists():
        pytest.skip("kernel has no BTF (/sys/kernel/btf/vmlinux missing)")
    info = btflayout.vmlinux_struct("bpf_prog_info")
    # Offsets fixed by the uapi since 5.1 (run_time_ns follows prog_tags).
    assert info.run_time_ns.offset == 192 and info.run_cnt.offset == 200
    assert info.name.offset == 64 and info.name.size == 16


def test_open_missing_object_raises() -> None:
    with pytest.raises(libbpf.LibbpfError) as exc:
        libbpf.BpfObject.open("/nonexistent/x.bpf.o")
    assert exc.value.errno != 0
