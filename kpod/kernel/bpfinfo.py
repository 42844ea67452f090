"""bpf_prog_info and bpf_map_info of loaded programs and maps, laid out from the kernel's BTF.

Above both the libbpf binding (the fds, the syscall) and btflayout (the struct layouts), so
that neither of those two imports the other back.
"""

from __future__ import annotations

import ctypes
from ctypes import byref, c_uint32
from dataclasses import dataclass

from kpod.kernel import libbpf
from kpod.kernel.btflayout import vmlinux_struct


@dataclass(frozen=True)
class ProgramStats:
    """Kernel-side cost from bpf_prog_info; run_* stay 0 unless kernel.bpf_stats_enabled=1."""

    id: int
    run_time_ns: int
    run_cnt: int


def _info(fd: int, struct: str, what: str) -> ctypes.Structure:
    info = vmlinux_struct(struct)()
    size = c_uint32(ctypes.sizeof(info))
    rc = libbpf.lib().bpf_obj_get_info_by_fd(fd, byref(info), byref(size))
    if rc:
        raise libbpf.LibbpfError(rc, f"bpf_obj_get_info_by_fd({what})")
    return info


def prog_info(fd: int) -> ctypes.Structure:
    """struct bpf_prog_info for a program fd, laid out from the running kernel's BTF."""
    return _info(fd, "bpf_prog_info", "prog")


def map_info(fd: int) -> ctypes.Structure:
    """struct bpf_map_info for a map fd, laid out from the running kernel's BTF."""
    return _info(fd, "bpf_map_info", "map")


def program_stats(program: libbpf.Program) -> ProgramStats:
    info = prog_info(program.fd)
    return ProgramStats(int(info.id), int(info.run_time_ns), int(info.run_cnt))  # type: ignore[attr-defined]


def map_id(bpf_map: libbpf.Map) -> int:
    """The kernel's id of a loaded map (what bpftool shows)."""
    return int(map_info(bpf_map.fd).id)  # type: ignore[attr-defined]
