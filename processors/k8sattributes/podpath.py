"""Which pod and container a cgroup path belongs to, from the path alone.

The kubelet names pod cgroups after the pod uid, and the container runtime names container
cgroups after the container id, so a cgroup path answers "whose is this" without asking any
API.  Both kubelet cgroup drivers and the usual runtimes lay the tree out differently:

    systemd driver   kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/
                         cri-containerd-<id>.scope | crio-<id>.scope | docker-<id>.scope
                         | crio-conmon-<id>.scope (CRI-O's monitor)
                     kubepods.slice/kubepods-pod<uid_>.slice/<container>   (Guaranteed: no QoS slice)
    cgroupfs driver  kubepods/burstable/pod<uid>/<id>      (containerd, docker: a bare id)
                     kubepods/pod<uid>/crio-<id>           (Guaranteed; CRI-O keeps its prefix)

The systemd driver writes the uid with "_" for "-" (a "-" in a slice name means nesting).
The pod part need not start at the root: k3s/kind nodes, nested runtimes and cgroup namespaces
show it under a prefix (/kubelet.slice/kubelet-kubepods.slice/..., /docker/<node>/kubepods/...,
/../kubepods/...).  So the parser looks for the pod component anywhere in the path and takes the
next component as the container.  Anything below the container (a runtime or the workload that
creates sub-cgroups inside its own cgroup) still belongs to that container.

Static pods are an exception to "uid in the path": their cgroup carries the kubelet's config
hash (32 hex digits), which the API shows in the mirror pod's `kubernetes.io/config.hash`
annotation; the parser accepts that form as a uid and discovery indexes pods by both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


# A pod uid: a canonical UUID, or a static pod's 32-hex-digit config hash.  The separator is "-"
# in cgroupfs names and "_" in systemd slice names ("-" there means nesting), never a mix.
def _uid_pattern(sep: str) -> str:
    h = "[0-9a-fA-F]"
    return rf"{h}{{8}}{sep}{h}{{4}}{sep}{h}{{4}}{sep}{h}{{4}}{sep}{h}{{12}}|{h}{{32}}"


# systemd driver: "<prefix>-pod<uid>.slice", the prefix being the parent slices joined by "-"
# (kubepods, kubepods-burstable, kubelet-kubepods-besteffort, ...).
_SYSTEMD_POD = re.compile(rf"^(?P<prefix>[A-Za-z0-9_.:-]*)-pod(?P<uid>{_uid_pattern('_')})\.slice$")
# cgroupfs driver: "pod<uid>".
_CGROUPFS_POD = re.compile(rf"^pod(?P<uid>{_uid_pattern('-')})$")

# A container cgroup: an optional runtime prefix, an optional "conmon-", 64 hex digits and, with
# the systemd driver, ".scope".  Without a prefix (cgroupfs with containerd or docker) the
# runtime is unknown from the path.
_CONTAINER = re.compile(
    r"^(?:(?P<runtime>cri-containerd|crio|docker|libpod|cri-o)-)?(?P<conmon>conmon-)?"
    r"(?P<id>[0-9a-fA-F]{64})(?:\.scope)?$"
)

_RUNTIME_NAMES = {
    "cri-containerd": "containerd",
    "crio": "crio",
    "cri-o": "crio",
    "docker": "docker",
    "libpod": "podman",
}

QOS_GUARANTEED = "guaranteed"
QOS_BURSTABLE = "burstable"
QOS_BESTEFFORT = "besteffort"


@dataclass(frozen=True, slots=True)
class PodPath:
    """What a kubepods cgroup path says about its owner."""

    pod_uid: str  # lower case, "-" separated (as in metadata.uid), or a static pod's hash
    container_id: str  # 64 hex digits, "" for the pod-level cgroup
    runtime: str  # containerd | crio | docker | podman | "" (not in the path)
    qos: str  # guaranteed | burstable | besteffort
    # CRI-O's per-container monitor (conmon) runs in its own cgroup next to the container's:
    # it is runtime overhead of the pod, not the container's own usage.
    conmon: bool = False


@dataclass(frozen=True, slots=True)
class ContainerPath:
    """A container cgroup found outside kubepods (docker or podman on a plain host)."""

    container_id: str
    runtime: str
    conmon: bool = False


def _qos_from_systemd_prefix(prefix: str) -> str:
    parts = prefix.split("-")
    if "burstable" in parts:
        return QOS_BURSTABLE
    if "besteffort" in parts:
        return QOS_BESTEFFORT
    return QOS_GUARANTEED


def _qos_from_parent(parent: str) -> str:
    if parent == "burstable":
        return QOS_BURSTABLE
    if parent == "besteffort":
        return QOS_BESTEFFORT
    return QOS_GUARANTEED


def normalise_uid(raw: str) -> str:
    """A uid as the API writes it: lower case, "-" separated."""
    return raw.replace("_", "-").lower()


def parse_container_component(name: str) -> ContainerPath | None:
    """Parse one path component as a container cgroup name, or None."""
    match = _CONTAINER.match(name)
    if match is None:
        return None
    prefix = match.group("runtime")
    return ContainerPath(
        container_id=match.group("id").lower(),
        runtime=_RUNTIME_NAMES.get(prefix, "") if prefix else "",
        conmon=match.group("conmon") is not None,
    )


def parse_pod_path(path: str) -> PodPath | None:
    """Parse a cgroup path (relative to any cgroup root) into its pod and container, or None.

    None means the path is not inside a pod's cgroup (the kubepods and QoS slices themselves,
    system services, anything else).  A component after the pod that is not a container name
    (a runtime's own sub-cgroup at pod level) makes the path count as the pod level.
    """
    parts = [p for p in path.split("/") if p and p != "."]
    # Search from the leaf up: the innermost pod component wins (a kind/k3s node nested in a
    # pod of an outer cluster has an outer pod component above the inner one).
    for index in range(len(parts) - 1, -1, -1):
        component = parts[index]
        match = _SYSTEMD_POD.match(component)
        if match is not None:
            qos = _qos_from_systemd_prefix(match.group("prefix"))
        else:
            match = _CGROUPFS_POD.match(component)
            if match is None:
                continue
            qos = _qos_from_parent(parts[index - 1] if index > 0 else "")
        uid = normalise_uid(match.group("uid"))
        container = parse_container_component(parts[index + 1]) if index + 1 < len(parts) else None
        if container is None:
            return PodPath(uid, "", "", qos)
        return PodPath(uid, container.container_id, container.runtime, qos, container.conmon)
    return None


def parse_container_path(path: str) -> ContainerPath | None:
    """The innermost container cgroup in any path (docker-<id>.scope, /docker/<id>, ...), or None.

    For hosts without Kubernetes (local mode): a docker or podman container outside kubepods.
    """
    parts = [p for p in path.split("/") if p]
    for component in reversed(parts):
        container = parse_container_component(component)
        if container is not None:
            return container
    return None


_ID_SCHEME = re.compile(r"^(?P<scheme>[a-z0-9.+-]+)://(?P<id>.*)$")


def split_container_id(value: str) -> tuple[str, str]:
    """Split a status containerID ("containerd://<id>", "cri-o://<id>", "docker://<id>").

    Returns (runtime scheme, lower-case id); ("", "") for an empty value (a container that has
    not started yet has no id).
    """
    if not value:
        return "", ""
    match = _ID_SCHEME.match(value)
    if match is None:
        return "", value.lower()
    return match.group("scheme"), match.group("id").lower()


def short_id(container_id: str) -> str:
    """The 12-character form `docker ps` and `crictl ps` show."""
    return container_id[:12]
