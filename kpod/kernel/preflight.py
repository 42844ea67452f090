"""What the kernel offers the agent: release, BTF, capabilities, tracefs.

Read-only checks for `kpod-metrics check` and for receivers' preflight(); nothing here mounts,
writes or loads anything.  The cgroup layout, the other half of `check`'s report, is
kpod.cgroup.mounts' business.
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass

# Capability numbers (linux/capability.h).
CAPABILITIES = {
    "CAP_DAC_READ_SEARCH": 2,
    "CAP_SYS_PTRACE": 19,
    "CAP_SYS_ADMIN": 21,
    "CAP_SYS_RESOURCE": 24,
    "CAP_PERFMON": 38,
    "CAP_BPF": 39,
}

BTF_PATH = "/sys/kernel/btf/vmlinux"
TRACEFS_PATHS = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")


def parse_cap_eff(status_text: str) -> int:
    """The effective capability mask from /proc/<pid>/status (0 if absent or garbled)."""
    for line in status_text.split("\n"):  # kernel files end lines at "\n" only
        if line.startswith("CapEff:"):
            try:
                return int(line.split(":", 1)[1].strip(), 16)
            except ValueError:
                return 0
    return 0


# The Seccomp: field of /proc/<pid>/status (linux/seccomp.h SECCOMP_MODE_*).
SECCOMP_MODES = {0: "disabled", 1: "strict", 2: "filter"}


def parse_seccomp_mode(status_text: str) -> int | None:
    """The seccomp mode from /proc/<pid>/status (None: no Seccomp: field, e.g. CONFIG_SECCOMP off)."""
    for line in status_text.splitlines():
        if line.startswith("Seccomp:"):
            try:
                return int(line.split(":", 1)[1].strip())
            except ValueError:
                return None
    return None


def seccomp_mode() -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            return parse_seccomp_mode(handle.read())
    except OSError:
        return None


def effective_capabilities() -> set[str]:
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace", newline="\n") as handle:
            mask = parse_cap_eff(handle.read())
    except OSError:
        mask = 0
    return {name for name, bit in CAPABILITIES.items() if mask >> bit & 1}


def capability_gaps(wanted: dict[str, str]) -> list[str]:
    """One line per capability of `wanted` (name -> what is lost without it) this process
    lacks: what a receiver that still runs without it should say once at start."""
    have = effective_capabilities()
    return [f"without {cap}: {loss}" for cap, loss in wanted.items() if cap not in have]


def tracefs_mount() -> str | None:
    for path in TRACEFS_PATHS:
        if os.path.isdir(os.path.join(path, "events")):
            return path
    return None


@dataclass
class KernelFacts:
    kernel: str
    machine: str
    btf: bool
    capabilities: set[str]
    tracefs: str | None
    root: bool


def kernel_facts() -> KernelFacts:
    return KernelFacts(
        kernel=platform.release(),
        machine=platform.machine(),
        btf=os.path.exists(BTF_PATH),
        capabilities=effective_capabilities(),
        tracefs=tracefs_mount(),
        root=os.geteuid() == 0,
    )
