"""The pods of this node, as discovery keeps them: a few fields per pod, shared read-only.

Discovery (informer or kubelet mode, see discovery.py) turns API JSON into `PodInfo` with
`pod_from_json` and keeps it in a `PodStore`.  A `PodInfo` holds only what enrichment and the
receivers need, never the API object: a pod's JSON is 5-20 KB, its `PodInfo` a few hundred
bytes, which is what keeps a node's worth of pods inside the memory budget.

Readers (the k8sattributes processor, the net_iface receiver) call `PodStore.snapshot()`: an
immutable mapping that writers replace as a whole (copy on write), so a reader never takes a
lock and never sees half an update.

A deleted pod is kept aside for `retention_s` (kpod.cgroup.gone_retention): its containers'
cgroups are removed by then, but their final counts are still exported and need the pod's
names.  `get()` finds it there; `snapshot()` and `len()` are the pods that exist.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kpod.processors.k8sattributes.podpath import split_container_id

# The kubelet's uid for a static pod; the API's mirror pod has a different metadata.uid but
# carries the one the cgroup names in this annotation.
CONFIG_HASH_ANNOTATION = "kubernetes.io/config.hash"


@dataclass(frozen=True, slots=True)
class PodInfo:
    uid: str
    name: str
    namespace: str
    labels: Mapping[str, str]
    host_network: bool
    phase: str
    deleting: bool  # metadata.deletionTimestamp is set: terminating, still has cgroups
    # Container id (no "containerd://" scheme) -> container name, for regular, init and
    # ephemeral containers, including the previous instance of a restarted container
    # (lastState.terminated), whose cgroup can outlive the restart by a moment.
    containers: Mapping[str, str]
    # True when every container the spec declares has a containerID in the status: a
    # container cgroup of this pod with an id we do not know is then the sandbox.
    all_started: bool
    static_uid: str = ""  # kubernetes.io/config.hash of a static pod's mirror, else ""

    def container_name(self, container_id: str) -> str | None:
        return self.containers.get(container_id)


def _statuses(status: Mapping[str, Any], key: str) -> list[Mapping[str, Any]]:
    value = status.get(key)
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    """A string field of the API JSON; anything else (a number, a list) reads as absent, so
    that only strings ever reach label values."""
    return value if isinstance(value, str) else ""


def pod_from_json(obj: Mapping[str, Any]) -> PodInfo:
    """Keep the fields enrichment needs from one pod of the API or kubelet JSON.

    Raises ValueError for an object without metadata.uid (nothing could ever match it).
    """
    metadata = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    uid = metadata.get("uid") or ""
    if not isinstance(uid, str) or not uid:
        raise ValueError("pod without metadata.uid")
    containers: dict[str, str] = {}
    started: set[str] = set()
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for entry in _statuses(status, key):
            name = _text(entry.get("name"))
            _, cid = split_container_id(_text(entry.get("containerID")))
            if cid:
                containers[cid] = name
                if key == "containerStatuses":
                    started.add(name)
            terminated = ((entry.get("lastState") or {}).get("terminated") or {}).get("containerID")
            _, old = split_container_id(_text(terminated))
            if old:
                containers.setdefault(old, name)
    declared = {c.get("name") for c in spec.get("containers") or [] if isinstance(c, Mapping)}
    annotations = metadata.get("annotations") or {}
    labels = metadata.get("labels") or {}
    return PodInfo(
        uid=uid.lower(),
        name=_text(metadata.get("name")),
        namespace=_text(metadata.get("namespace")),
        # Interned: label keys and values repeat across the pods of a deployment.
        labels=MappingProxyType({sys.intern(str(k)): sys.intern(str(v)) for k, v in labels.items()}),
        host_network=bool(spec.get("hostNetwork", False)),
        phase=_text(status.get("phase")),
        deleting=bool(metadata.get("deletionTimestamp")),
        containers=MappingProxyType(containers),
        all_started=bool(declared) and declared <= started,
        static_uid=str(annotations.get(CONFIG_HASH_ANNOTATION, "")).lower(),
    )


_EMPTY: Mapping[str, PodInfo] = MappingProxyType({})


class PodStore:
    """The current pods of the node by uid, with the state of the discovery that fills it.

    `generation` grows with every change, so a reader can cache what it derived from the pods
    and drop the cache when the number moves.  `synced` is False until the first complete list;
    `last_error` is the last discovery error (kept while the last good pods keep being served).
    """

    # Deleted pods kept at most (the oldest go first): a bound under any churn.
    MAX_RECENTLY_DELETED = 4096

    def __init__(self, retention_s: float = 120.0) -> None:
        self._lock = threading.Lock()
        self._pods: Mapping[str, PodInfo] = _EMPTY
        self._static: Mapping[str, PodInfo] = _EMPTY
        self.retention_s = retention_s
        # uid (and a static pod's config hash) -> (pod, monotonic time it was deleted), oldest first.
        self._deleted: dict[str, tuple[PodInfo, float]] = {}
        self.generation = 0
        self.synced = False
        self.last_error = ""
        self.last_sync_monotonic = 0.0

    # Readers ----------------------------------------------------------------------------

    def snapshot(self) -> Mapping[str, PodInfo]:
        """All pods by metadata.uid (read-only; replaced, never changed, by writers)."""
        return self._pods

    def get(self, uid: str) -> PodInfo | None:
        """The pod whose cgroup carries `uid`: its metadata.uid, or a static pod's config hash;
        also a pod deleted less than `retention_s` ago."""
        pod = self._pods.get(uid) or self._static.get(uid)
        if pod is not None:
            return pod
        deleted = self._deleted.get(uid)
        if deleted is not None and time.monotonic() - deleted[1] < self.retention_s:
            return deleted[0]
        return None

    def exists(self, uid: str) -> bool:
        """The pod is in the current list (not deleted)."""
        return uid in self._pods or uid in self._static

    def recently_deleted(self) -> int:
        return len(self._deleted)

    def expire_deleted(self) -> None:
        """Forget deleted pods older than the retention; readers that cache what they derived
        from the pods see `generation` move."""
        now = time.monotonic()
        if all(now - at < self.retention_s for _, at in self._deleted.values()):
            return
        with self._lock:
            self._deleted = {u: e for u, e in self._deleted.items() if now - e[1] < self.retention_s}
            self.generation += 1

    def __len__(self) -> int:
        return len(self._pods)

    # Writers ----------------------------------------------------------------------------

    def _publish(self, pods: dict[str, PodInfo]) -> None:
        # Called with the lock held.  Two read-only views, swapped by assignment (atomic in
        # CPython), so readers need no lock.  Pods that leave are kept aside (see get()).
        now = time.monotonic()
        deleted = {
            uid: entry for uid, entry in self._deleted.items() if now - entry[1] < self.retention_s and uid not in pods
        }
        for uid, pod in self._pods.items():
            if uid not in pods:
                deleted[uid] = (pod, now)
                if pod.static_uid and pod.static_uid != uid:
                    deleted[pod.static_uid] = (pod, now)
        while len(deleted) > self.MAX_RECENTLY_DELETED:
            del deleted[next(iter(deleted))]
        static = {p.static_uid: p for p in pods.values() if p.static_uid and p.static_uid != p.uid}
        self._deleted = deleted  # replaced whole, like the views: readers need no lock
        self._pods = MappingProxyType(pods)
        self._static = MappingProxyType(static)
        self.generation += 1

    def replace(self, pods: Iterable[PodInfo]) -> None:
        """A complete list (initial list, relist, kubelet poll).  The same pods as before are
        not a new generation: a kubelet poll every 30 s would otherwise make every reader
        derive everything again (k8sattributes its labels, the exporters their label text)."""
        by_uid = {p.uid: p for p in pods}
        with self._lock:
            if not self.synced or by_uid != self._pods:
                self._publish(by_uid)
            self.synced = True
            self.last_error = ""
            self.last_sync_monotonic = time.monotonic()

    def upsert(self, pod: PodInfo) -> None:
        with self._lock:
            if self._pods.get(pod.uid) == pod:
                return  # a status change we do not keep: nothing for readers to redo
            pods = dict(self._pods)
            pods[pod.uid] = pod
            self._publish(pods)

    def delete(self, uid: str) -> None:
        with self._lock:
            if uid not in self._pods:
                return
            pods = dict(self._pods)
            del pods[uid]
            self._publish(pods)

    def set_error(self, message: str) -> None:
        with self._lock:
            self.last_error = message
