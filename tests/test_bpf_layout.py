"""Python's view of every BPF map struct == the BTF in the compiled objects.

kpod.kernel.btflayout builds ctypes types from BTF through libbpf's btf__ API.  Here the expected
layout comes from an independent reader, bpftool's JSON dump of the same object's BTF, and the
map -> key/value type mapping from the object's `.maps` DATASEC (not from libbpf).  Any
difference in a size or member offset fails.  The conventions the Python side relies on
(error-map members named like the maps, the histogram enum, cgroup keys) are checked too.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
from helpers import BpftoolBtf

from kpod.kernel import btflayout, libbpf
from kpod.kernel.ebpf import CGROUP_KEY_FIELD, log2_bounds

BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
OBJECTS = sorted(BPF_DIR.glob("*.bpf.o"))
SOURCES = sorted(BPF_DIR.glob("*.bpf.c"))


def test_every_source_is_built() -> None:
    built = {p.name.removesuffix(".bpf.o") for p in OBJECTS}
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
        assert counted == set(obj.maps) - set(errors), "one error counter per map, named like the map"
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


def test_map_names_unique_across_objects() -> None:
    seen: dict[str, str] = {}
    for obj_path in OBJECTS:
        with libbpf.BpfObject.open(str(obj_path)) as obj:
            for name in obj.maps:
                assert name not in seen, f"map {name} in {obj_path.name} and {seen[name]}: the map label would clash"
                seen[name] = obj_path.name


def test_log2_bounds_are_exact_integer_upper_bounds() -> None:
    bounds = log2_bounds(10, 27, 1.0)
    assert len(bounds) == 26  # the 27th slot is the +inf bucket
    assert bounds[0] == 1023 and bounds[1] == 2047 and bounds[-1] == 2**35 - 1
    seconds = log2_bounds(10, 27, 1e-9)
    assert seconds[0] == pytest.approx(1.023e-6)
    # The `le` labels are written from these floats: no float noise may reach them.
    assert [repr(b) for b in seconds[:3]] == ["1.023e-06", "2.047e-06", "4.095e-06"]
    assert repr(seconds[-1]) == "34.359738367"


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
