"""Syscall names to numbers per architecture (x86_64 and arm64), and each one's default set.

One config serves every node of a cluster, and clusters mix amd64 and arm64 nodes whose
syscall tables differ: arm64 (the generic table) has no `open`, `epoll_wait`, `poll`, `select`
or `fork`, only their newer forms (`openat`, `epoll_pwait`, `ppoll`, `pselect6`, `clone`).
So:
- the default tracked set is per architecture, each resolving on its own table;
- a name that is a syscall of another supported architecture only (epoll_wait on arm64) is
  skipped on this one, with a note, instead of failing the receiver;
- a name that no supported architecture has is an error (a typo), everywhere.
"""

from __future__ import annotations

import platform

from kpod.kernel.syscall_table import ARM64, X86_64

TABLES: dict[str, dict[str, int]] = {"x86_64": X86_64, "arm64": ARM64}
MACHINES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}

# What the comprehensive profile traces when kpod.syscall.tracked_syscalls is empty: file and
# socket I/O, connection set-up, the event-loop wait and futex (lock contention).  The wait is
# the one difference: glibc's epoll_wait() is the epoll_wait syscall on x86_64, and arm64 only
# has epoll_pwait (which Go's runtime uses on both).
DEFAULT_TRACKED: dict[str, tuple[str, ...]] = {
    "x86_64": ("read", "write", "openat", "close", "connect", "accept4", "sendto", "recvfrom", "epoll_wait", "futex"),
    "arm64": ("read", "write", "openat", "close", "connect", "accept4", "sendto", "recvfrom", "epoll_pwait", "futex"),
}


def architecture(machine: str | None = None) -> str:
    """The syscall table's name for a machine (platform.machine(): x86_64, aarch64...)."""
    machine = machine or platform.machine()
    try:
        return MACHINES[machine]
    except KeyError:
        raise ValueError(f"syscall tracking supports x86_64 and arm64, not {machine}") from None


def syscall_table(machine: str | None = None) -> dict[str, int]:
    return TABLES[architecture(machine)]


def default_tracked(machine: str | None = None) -> list[str]:
    return list(DEFAULT_TRACKED[architecture(machine)])


def other_architectures_only(names: list[str], machine: str | None = None) -> dict[str, list[str]]:
    """The names this architecture lacks that another supported one has: {name: [those arches]}."""
    arch = architecture(machine)
    out: dict[str, list[str]] = {}
    for name in names:
        if name not in TABLES[arch]:
            others = [other for other, table in TABLES.items() if other != arch and name in table]
            if others:
                out[name] = others
    return out


def resolve_syscalls(names: list[str], machine: str | None = None) -> dict[str, int]:
    """This architecture's number for each name it has.

    Names of another supported architecture only are left out (other_architectures_only()
    says which); a ValueError names every name that no supported architecture has.
    """
    arch = architecture(machine)
    table = TABLES[arch]
    unknown = [name for name in names if not any(name in t for t in TABLES.values())]
    if unknown:
        raise ValueError(f"unknown syscall name(s) (on every architecture: {', '.join(TABLES)}): {', '.join(unknown)}")
    return {name: table[name] for name in names if name in table}


def skipped_note(names: list[str], machine: str | None = None) -> str:
    """One line about the names this architecture skips ("" when it has them all)."""
    skipped = other_architectures_only(names, machine)
    if not skipped:
        return ""
    arch = architecture(machine)
    listed = ", ".join(f"{name} ({'/'.join(others)} only)" for name, others in skipped.items())
    return f"not syscalls on {arch}, not tracked here: {listed}"
