"""Profiles: which receivers run, as in the spec's profile table.

| receiver (type)              | minimal | standard | comprehensive |
|------------------------------|:-------:|:--------:|:-------------:|
| cpu_sched (eBPF)             | yes     | yes      | yes           |
| memory: OOM kills (eBPF)     | yes     | yes      | yes           |
| memory: major faults (eBPF)  | -       | yes      | yes           |
| net_tcp (eBPF)               | -       | yes      | yes           |
| syscall (eBPF)               | -       | -        | yes           |
| bpf_maps (eBPF diagnostics)  | yes     | yes      | yes           |
| disk (cgroup)                | yes     | yes      | yes           |
| cgroup_cpu (cgroup)          | yes     | yes      | yes           |
| cgroup_memory (cgroup)       | yes     | yes      | yes           |
| net_iface (cgroup)           | -       | yes      | yes           |
| filesystem (cgroup)          | -       | yes      | yes           |
| pressure (cgroup PSI)        | -       | yes      | yes           |

`custom` runs only the receivers listed in the pipeline.
"""

from __future__ import annotations

from typing import Any

# (receiver type, config overrides the profile applies before the user's own settings)
ProfileEntry = tuple[str, dict[str, Any]]

_MINIMAL: list[ProfileEntry] = [
    ("cpu_sched", {}),
    ("memory", {"major_faults": False}),
    ("bpf_maps", {}),
    ("disk", {}),
    ("cgroup_cpu", {}),
    ("cgroup_memory", {}),
]
_STANDARD: list[ProfileEntry] = [
    ("cpu_sched", {}),
    ("memory", {"major_faults": True}),
    ("net_tcp", {}),
    ("bpf_maps", {}),
    ("disk", {}),
    ("cgroup_cpu", {}),
    ("cgroup_memory", {}),
    ("net_iface", {}),
    ("filesystem", {}),
    ("pressure", {}),
]
_COMPREHENSIVE: list[ProfileEntry] = [*_STANDARD, ("syscall", {})]

PROFILES: dict[str, list[ProfileEntry]] = {
    "minimal": _MINIMAL,
    "standard": _STANDARD,
    "comprehensive": _COMPREHENSIVE,
    "custom": [],
}


def profile_receivers(profile: str) -> list[ProfileEntry]:
    return [(name, dict(overrides)) for name, overrides in PROFILES[profile]]
