"""Where the cgroups are: the cgroup2 mount and the v1 controller mounts of this host, and which
tree holds the pods.

Read from /proc/self/mountinfo through the one mountinfo parser (kpod.cgroup.parsers).  The pods'
tree is the cgroup2 one wherever it holds them; on nodes whose pods exist only in v1 hierarchies
(cgroup2 not mounted, or mounted without the kubepods tree: old runtimes on hybrid hosts) it is a
v1 hierarchy, and then eBPF events, which carry cgroup2 ids, name no pod (`choose_hierarchy`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from kpod.cgroup.parsers import MountInfo, parse_mountinfo


@dataclass(frozen=True)
class CgroupMounts:
    """The cgroup mounts of a host: the cgroup2 mount, and v1 controllers by name."""

    unified: str | None
    v1: dict[str, str] = field(default_factory=dict)

    @property
    def layout(self) -> str:
        if self.unified and not self.v1:
            return "v2"
        if self.unified and self.v1:
            return "hybrid"
        return "v1" if self.v1 else "none"


# A k8s node's workload cgroups live under these top-level names (systemd and cgroupfs drivers).
KUBEPODS_TOPS = ("kubepods.slice", "kubepods")
# Which v1 hierarchy to walk when the pods are only in v1: every runtime makes its containers in
# the memory and cpu hierarchies (the kubelet requires both controllers).
V1_WALK_ORDER = ("memory", "cpu", "cpuacct", "pids", "blkio", "devices", "freezer", "name=systemd")


def cgroup_mounts(mounts: list[MountInfo]) -> CgroupMounts:
    """The cgroup2 mount and the v1 controller mounts among parsed mountinfo entries.

    With several cgroup2 mounts (bind mounts of sub-trees inside containers), the one whose
    root is "/" wins.
    """
    unified: str | None = None
    unified_is_root = False
    v1: dict[str, str] = {}
    for mount in mounts:
        if mount.fstype == "cgroup2":
            if unified is None or (mount.root == "/" and not unified_is_root):
                unified, unified_is_root = mount.mount_point, mount.root == "/"
        elif mount.fstype == "cgroup":
            for option in mount.super_options.split(","):
                if option in ("rw", "ro") or option.startswith("release_agent"):
                    continue
                v1.setdefault(option, mount.mount_point)
    return CgroupMounts(unified=unified, v1=v1)


def parse_mountinfo_cgroups(text: str) -> CgroupMounts:
    """The cgroup mounts in mountinfo text (lines without the mountinfo shape are skipped)."""
    return cgroup_mounts(parse_mountinfo(text))


def read_mountinfo(path: str = "/proc/self/mountinfo") -> str:
    """This process's mountinfo text ("" when it cannot be read: no cgroup mount is known).

    newline="\\n": by default text mode turns a "\\r" inside a mount point into a line break; bytes that
    are not UTF-8 stay surrogate escapes, so a path round-trips to the kernel unchanged.
    """
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as handle:
            return handle.read()
    except OSError:
        return ""


@dataclass(frozen=True)
class CgroupHierarchy:
    """The tree the cgroup index walks, and what eBPF attribution can make of it."""

    root: str
    mounts: CgroupMounts
    # Why eBPF events cannot be attributed to the cgroups of this tree (one line), "" when they
    # can: a BPF program's cgroup id is the task's cgroup2 id, which names a pod only when the
    # pods are in the cgroup2 tree.
    ebpf_unattributable: str = ""

    @property
    def cgroup2(self) -> bool:
        return not self.ebpf_unattributable


def has_kubepods(directory: str) -> bool:
    return any(os.path.isdir(os.path.join(directory, top)) for top in KUBEPODS_TOPS)


def choose_hierarchy(configured: str, mountinfo_text: str, pods_only: bool = True) -> CgroupHierarchy:
    """The tree to walk: the cgroup2 one (`configured` if it is a cgroup2 root, else the mount in
    mountinfo), unless the pods exist only in v1 hierarchies.

    `pods_only`: a node agent reports pods; a cgroup2 tree without the kubepods tree beside v1
    hierarchies that have it means the pods are v1-only.  (Locally, any cgroup2 tree will do.)
    A configured path that contains `cgroup.controllers` is taken as a cgroup2 root even when it
    is not in our mountinfo (a host's tree mounted into a container, or a test's tree).
    """
    mounts = parse_mountinfo_cgroups(mountinfo_text)
    unified = configured if os.path.exists(os.path.join(configured, "cgroup.controllers")) else mounts.unified
    ordered = [mounts.v1[c] for c in V1_WALK_ORDER if c in mounts.v1]
    ordered += [m for m in mounts.v1.values() if m not in ordered]
    # The kubelet makes its kubepods cgroups in the cpu and memory hierarchies (it requires both
    # controllers): pods live in v1 when those have them, not when one hierarchy happens to.
    required = [mounts.v1[c] for c in ("cpu", "memory") if c in mounts.v1] or ordered[:1]
    v1_holds_pods = bool(required) and all(has_kubepods(m) for m in required)
    if unified and (not pods_only or has_kubepods(unified) or not v1_holds_pods):
        return CgroupHierarchy(unified, mounts)
    if not ordered:
        raise FileNotFoundError(f"{configured}: not a cgroup2 mount, and no cgroup mount in mountinfo")
    walked = ordered[0]
    where = f"no pod cgroups under the cgroup2 mount {unified}" if unified else "no cgroup2 mount"
    return CgroupHierarchy(
        walked,
        mounts,
        f"pods only in cgroup v1 ({where}; walking {walked}): eBPF events carry cgroup2 ids, which name no pod "
        "here, so the eBPF receivers are off; move the node to cgroup v2 (docs/TROUBLESHOOTING.md)",
    )
