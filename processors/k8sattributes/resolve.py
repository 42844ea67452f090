"""cgroup -> (namespace, pod, container, node): the labels every per-cgroup point gets.

Two resolvers with one interface, `resolve(cgroup) -> Resource | Drop`:

`LocalResolver` (kpod.discovery.mode: local, no Kubernetes API): the path is all we know.
  - a pod's container cgroup: namespace="" pod="" container=<12-char container id>
    (pod and namespace stay empty rather than show a uid where a name belongs; the uid is in
    the OTLP attribute k8s.pod.uid and the full id in container.id);
  - a pod-level cgroup, CRI-O's conmon cgroup: container=<the cgroup's directory name>, which
    carries the pod uid and keeps two pods' series apart;
  - a docker/podman container outside kubepods: container=<12-char container id>;
  - anything else: container=<directory name> (a systemd unit such as "nginx.service", or the
    name of a hand-made cgroup); the root cgroup is container="".

`PodResolver` (informer and kubelet modes): the path gives the pod uid and container id, the
pods from discovery give names.
  - container id in the pod's status (containers, init, ephemeral, or the previous instance of
    a restarted one): container=<its name>;
  - the pod-level cgroup, the sandbox ("pause") cgroup and CRI-O's conmon: container="".  They
    are pod overhead, not a container of the spec.  The sandbox has no id in the pod status, so
    it is recognised by its process ("pause") or, failing that, by elimination: every container
    of the spec already has its id;
  - a container id not (yet) in the status while some container of the pod has no id yet (it
    is starting and the status update has not arrived): container=<12-char id> until the
    status shows the name.  Pod and namespace are set regardless: a pod's cgroup never has
    empty pod labels;
  - no known pod (system services, the kubepods/QoS levels, a pod of another node), a pod the
    filters exclude, or a cgroup that is gone: dropped, with the reason counted.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Mapping
from typing import Final

from kpod.processors.k8sattributes.podpath import parse_container_path, parse_pod_path, short_id
from kpod.processors.k8sattributes.pods import PodInfo, PodStore
from kpod.processors.k8sattributes.selector import PodFilter

from kpod.model import CgroupRef, Resource

# Why a point was dropped (the `reason` label of the unresolved-cgroups self-metric).
DROP_GONE: Final = "gone"  # the cgroup no longer exists (empty path)
DROP_NOT_A_POD: Final = "not_a_pod"  # not inside a pod's cgroup
DROP_UNKNOWN_POD: Final = "unknown_pod"  # a pod uid discovery does not know (yet)
DROP_NOT_SYNCED: Final = "not_synced"  # discovery has not listed the pods yet
DROP_FILTERED: Final = "filtered"  # a pod the filters exclude

Drop = str

# OpenTelemetry semantic-convention resource attributes.
OTEL_NAMESPACE = "k8s.namespace.name"
OTEL_POD_NAME = "k8s.pod.name"
OTEL_POD_UID = "k8s.pod.uid"
OTEL_CONTAINER_NAME = "k8s.container.name"
OTEL_CONTAINER_ID = "container.id"
OTEL_NODE = "k8s.node.name"
# A cgroup known only by its directory (local mode, a pod cgroup without a container id): the
# `container` label is its last path component, and OTLP needs it too, or two such cgroups would
# be one OTLP series under two Prometheus series.
OTEL_CGROUP_NAME = "kpod.cgroup.name"


def node_name(configured: str) -> str:
    """`kpod.node_name`, or the host name when it is empty."""
    return configured or socket.gethostname()


def _last_component(path: str) -> str:
    return path.rstrip("/").rsplit("/", 1)[-1]


class _ResourceBuilder:
    def __init__(self, node: str, include_labels: Mapping[str, str]) -> None:
        self.node = node
        # Pod label -> Prometheus label name (label_<name>).
        self.include_labels = dict(include_labels)

    def build(
        self,
        *,
        namespace: str = "",
        pod: str = "",
        container: str = "",
        pod_uid: str = "",
        container_name: str = "",
        container_id: str = "",
        pod_labels: Mapping[str, str] | None = None,
    ) -> Resource:
        labels = {"namespace": namespace, "pod": pod, "container": container, "node": self.node}
        for key, name in self.include_labels.items():
            # Always present (possibly "") so that every series of a metric has one label set.
            labels[name] = (pod_labels or {}).get(key, "")
        otel = {
            OTEL_NAMESPACE: namespace,
            OTEL_POD_NAME: pod,
            OTEL_POD_UID: pod_uid,
            OTEL_CONTAINER_NAME: container_name,
            OTEL_CONTAINER_ID: container_id,
            OTEL_NODE: self.node,
            OTEL_CGROUP_NAME: container if not (container_name or container_id) else "",
        }
        # An empty OTLP attribute says nothing; leave unknown ones out.
        return Resource(
            labels=tuple(sorted(labels.items())),
            otel=tuple(sorted((k, v) for k, v in otel.items() if v)),
        )


class LocalResolver:
    """Labels from the path alone (no Kubernetes): never drops a cgroup that exists."""

    def __init__(self, node: str, include_labels: Mapping[str, str] | None = None) -> None:
        self._build = _ResourceBuilder(node, include_labels or {}).build

    def resolve(self, cgroup: CgroupRef) -> Resource | Drop:
        path = cgroup.path
        if not path:
            return DROP_GONE
        pod = parse_pod_path(path)
        if pod is not None:
            if pod.container_id and not pod.conmon:
                return self._build(
                    container=short_id(pod.container_id), pod_uid=pod.pod_uid, container_id=pod.container_id
                )
            return self._build(container=_last_component(path), pod_uid=pod.pod_uid)
        container = parse_container_path(path)
        if container is not None and not container.conmon:
            return self._build(
                container=short_id(container.container_id), container_id=container.container_id
            )
        return self._build(container="" if path == "/" else _last_component(path))


def runs_pause(cgroup_dir: str, proc_root: str = "/proc") -> bool:
    """True if a process of this cgroup is the pod sandbox's `pause`.

    Reads cgroup.procs and the processes' comm (a few pids at most).  Processes outside our pid
    namespace are not listed; then this says False and resolution falls back on elimination.
    """
    try:
        with open(os.path.join(cgroup_dir, "cgroup.procs")) as f:
            pids = f.read().split()
    except OSError:
        return False
    for pid in pids[:4]:
        try:
            # Exact: comm is the name and "\n"; strip() would also take off a "\x1c" or "\r"
            # a process put at the end of its own name.
            with open(os.path.join(proc_root, pid, "comm"), newline="\n") as f:
                if f.read() == "pause\n":
                    return True
        except OSError:
            continue
    return False


class PodResolver:
    """Labels from discovered pods; cgroups of no known, allowed pod are dropped."""

    def __init__(
        self,
        node: str,
        store: PodStore,
        pod_filter: PodFilter,
        include_labels: Mapping[str, str] | None = None,
        abspath: Callable[[str], str] | None = None,
        proc_root: str = "/proc",
    ) -> None:
        self.store = store
        self.filter = pod_filter
        self._build = _ResourceBuilder(node, include_labels or {}).build
        self._abspath = abspath
        self._proc_root = proc_root
        # cgroup id -> True once its process was seen to be "pause" (never changes for an id).
        self._sandboxes: set[int] = set()

    def forget(self, live_ids: set[int]) -> None:
        """Drop what is remembered about cgroups that are gone."""
        self._sandboxes &= live_ids

    def _is_sandbox(self, cgroup: CgroupRef) -> bool:
        if cgroup.id in self._sandboxes:
            return True
        if self._abspath is not None and runs_pause(self._abspath(cgroup.path), self._proc_root):
            self._sandboxes.add(cgroup.id)
            return True
        return False

    def container_label(
        self, pod: PodInfo, cgroup: CgroupRef, container_id: str, conmon: bool
    ) -> tuple[str, str]:
        """(container label, k8s.container.name) for a cgroup of `pod`."""
        if not container_id or conmon:
            return "", ""
        name = pod.container_name(container_id)
        if name is not None:
            return name, name
        if self._is_sandbox(cgroup) or pod.all_started:
            return "", ""
        return short_id(container_id), ""

    def resolve(self, cgroup: CgroupRef) -> Resource | Drop:
        if not cgroup.path:
            return DROP_GONE
        parsed = parse_pod_path(cgroup.path)
        if parsed is None:
            return DROP_NOT_A_POD
        pod = self.store.get(parsed.pod_uid)
        if pod is None:
            return DROP_UNKNOWN_POD if self.store.synced else DROP_NOT_SYNCED
        if not self.filter.allows(pod.namespace, pod.labels):
            return DROP_FILTERED
        container, container_name = self.container_label(pod, cgroup, parsed.container_id, parsed.conmon)
        return self._build(
            namespace=pod.namespace,
            pod=pod.name,
            container=container,
            pod_uid=pod.uid,
            container_name=container_name,
            # conmon's cgroup is named after the container it watches; it is not that container.
            container_id="" if parsed.conmon else parsed.container_id,
            pod_labels=pod.labels,
        )
