"""Where the cgroups are: the cgroup2 mount and the v1 controller mounts of this host.

Read from /proc/self/mountinfo through the one mountinfo parser (kpod.cgroup.parsers).
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


def resolve_cgroup_root(configured: str, mountinfo_text: str) -> tuple[str, CgroupMounts]:
    """The cgroup2 mount to use: `configured` if it is one, else the one in mountinfo.

    A configured path that contains `cgroup.controllers` is taken as a cgroup2 root even when
    it is not in our mountinfo (a host's tree mounted into the agent's container, or a test
    fixture).
    """
    mounts = parse_mountinfo_cgroups(mountinfo_text)
    if os.path.exists(os.path.join(configured, "cgroup.controllers")):
        return configured, mounts
    if mounts.unified:
        return mounts.unified, mounts
    raise FileNotFoundError(f"{configured}: not a cgroup2 mount, and no cgroup2 mount in mountinfo")
