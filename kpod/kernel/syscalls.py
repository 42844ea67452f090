"""Syscall names to numbers for the machine's architecture (x86_64 and arm64)."""

from __future__ import annotations

import platform

from kpod.kernel.syscall_table import ARM64, X86_64

TABLES = {"x86_64": X86_64, "aarch64": ARM64, "arm64": ARM64}


def syscall_table(machine: str | None = None) -> dict[str, int]:
    machine = machine or platform.machine()
    try:
        return TABLES[machine]
    except KeyError:
        raise ValueError(f"syscall tracking supports x86_64 and arm64, not {machine}") from None


def resolve_syscalls(names: list[str], machine: str | None = None) -> dict[str, int]:
    """Map each name to its number; a ValueError names every unknown syscall."""
    table = syscall_table(machine)
    unknown = [name for name in names if name not in table]
    if unknown:
        raise ValueError(f"unknown syscall name(s) on {machine or platform.machine()}: {', '.join(unknown)}")
    return {name: table[name] for name in names}
