"""k8sattributes: put namespace / pod / container / node on every per-cgroup point.

Configured like any processor (`processors: {k8sattributes: {...}}` and listed in
`service.pipelines`).  What it reads from the `kpod:` section:

    kpod.discovery.mode     informer (default) | kubelet | local   -> where pod names come from
    kpod.discovery.kubelet  url, poll_interval, token_file, ca_file, insecure_skip_verify
    kpod.node_name          this node ("" = the host name): the informer's field selector and
                            the `node` label
    kpod.filter             namespaces, exclude_namespaces, label_selector, include_labels

Each point with a cgroup gets `Point.resource` (see resolve.py for the rules): Prometheus labels
namespace, pod, container, node (+ label_<x> per include_labels) and OTLP attributes
k8s.namespace.name, k8s.pod.name, k8s.pod.uid, k8s.container.name, container.id, k8s.node.name.
Points without a cgroup (self-metrics) pass untouched.  In informer and kubelet mode a point
whose cgroup belongs to no known, allowed pod is dropped and its cgroup counted in
`kpod.cgroups.unresolved{reason}` (kpod_cgroups_unresolved_total) once per cycle.

Several cgroups can get one label set: the pod sandbox and CRI-O's conmon cgroups are all
container="" of their pod, and a restarted container's old cgroup (gone, still retained) has
the labels of its new one.  The pipeline merges such points after the processors (values and
histogram buckets summed, "pod overhead" and a restart's continuity: kpod.model.merge_duplicates).
Counters of cgroups that are let go are carried per label set (continuity.py): a container's
counters never go back.

The `PodStore` (pods.py) that discovery fills is this processor's own; `status()` reports how
many pods it holds (the pipeline shows that as pods_known in /debug/status).
"""

from __future__ import annotations

import time
from typing import Any

from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.continuity import Continuity
from kpod.processors.k8sattributes.pods import PodStore
from kpod.processors.k8sattributes.resolve import (
    DROP_FILTERED,
    DROP_GONE,
    DROP_NOT_A_POD,
    DROP_NOT_SYNCED,
    DROP_UNKNOWN_POD,
    Drop,
    LocalResolver,
    PodResolver,
    node_name,
)
from kpod.processors.k8sattributes.selector import PodFilter, include_label_names

from kpod.component import ComponentUnavailable, Context, Processor
from kpod.model import Batch, CgroupRef, Point, Resource

UNRESOLVED_METRIC = "kpod.cgroups.unresolved"
UNRESOLVED_HELP = "cgroups whose points were dropped: no known pod, filtered out or gone (per cycle)"
PODS_METRIC = "kpod.pods.discovered"
PODS_HELP = "pods of this node that discovery knows"


class K8sAttributesProcessor(Processor):
    # It never changes a point it is given: a kept point is a new one with its resource (one
    # pass, where a copy of the batch and then a pass over it were two).
    mutates_data = False

    def __init__(self, context: Context, config: K8sAttributesConfig) -> None:
        super().__init__(context, config)
        settings = context.settings
        self.mode = settings.discovery.mode
        if self.mode not in ("informer", "kubelet", "local"):
            raise ValueError(f"kpod.discovery.mode: unknown mode {self.mode!r} (informer, kubelet or local)")
        self.node = node_name(settings.node_name)
        filters = settings.filter
        include = include_label_names(filters.include_labels)
        self.store: PodStore | None = None
        self.discovery: Any = None
        self.resolver: LocalResolver | PodResolver
        if self.mode == "local":
            self.resolver = LocalResolver(self.node, include)
        else:
            self.store = PodStore()
            self.resolver = PodResolver(
                self.node,
                self.store,
                PodFilter.build(filters.namespaces, filters.exclude_namespaces, filters.label_selector),
                include,
                abspath=context.cgroups.abspath if context.cgroups is not None else None,
                proc_root=settings.cgroup.proc_root,
            )
        retention = context.cgroups.gone_retention_s if context.cgroups is not None else 120.0
        if self.store is not None:
            self.store.retention_s = retention
        self.continuity = Continuity(retention)
        # (cgroup id, path) -> Resource or drop reason, valid for one store generation.
        self._cache: dict[tuple[int, str], Resource | Drop] = {}
        self._cache_generation = -1
        self._last_used: dict[tuple[int, str], float] = {}
        self._last_prune = time.monotonic()
        context.self_metrics.declare_counter(UNRESOLVED_METRIC, UNRESOLVED_HELP, ("reason",))
        if self.mode != "local":
            # Present from the start at 0, so that rate() and alerts work from the first drop.
            for reason in (DROP_GONE, DROP_NOT_A_POD, DROP_UNKNOWN_POD, DROP_NOT_SYNCED, DROP_FILTERED):
                context.self_metrics.inc(UNRESOLVED_METRIC, UNRESOLVED_HELP, (("reason", reason),), 0)

    # Lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self.mode == "local":
            filters = self.context.settings.filter
            if filters.namespaces or filters.label_selector:
                # Without the API there are no namespaces or labels to match: filtering would drop
                # every pod, so it is off, and said so.
                self.log.warning("discovery mode local: the namespaces and label_selector filters are off")
            return
        from kpod.processors.k8sattributes.discovery import (
            create_discovery,  # imports the kubernetes client: only when used
        )

        assert self.store is not None
        self.discovery = create_discovery(
            self.mode, self.context.settings, self.config, self.store, self.log, self.node
        )
        try:
            self.discovery.start()
        except ComponentUnavailable:
            self.discovery = None
            raise
        if not self.discovery.wait_synced(self.config.wait_for_sync.seconds):
            self.log.warning(
                "no pod list after %s (%s); pod cgroups are dropped (not_synced) until it arrives",
                self.config.wait_for_sync,
                self.store.last_error or "no answer yet",
            )

    def shutdown(self) -> None:
        discovery, self.discovery = self.discovery, None
        if discovery is not None:
            discovery.stop()

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mode": self.mode, "node": self.node, "cached_cgroups": len(self._cache)}
        out.update(self.continuity.status())
        if self.store is not None:
            out.update(
                pods=len(self.store),
                recently_deleted_pods=self.store.recently_deleted(),
                synced=self.store.synced,
                last_error=self.store.last_error,
            )
        if self.discovery is not None:
            out.update(self.discovery.status())
        return out

    # Per cycle ----------------------------------------------------------------------------

    def _prune(self, now: float) -> None:
        # Forget cgroups unused for a few cycles: the cache holds live cgroups only.
        horizon = max(3 * self.context.settings.poll_interval.seconds, 30.0)
        if now - self._last_prune < horizon:
            return
        self._last_prune = now
        stale = [key for key, used in self._last_used.items() if now - used > horizon]
        for key in stale:
            self._last_used.pop(key, None)
            self._cache.pop(key, None)
        if isinstance(self.resolver, PodResolver):
            self.resolver.forget({key[0] for key in self._last_used})

    def _report_discovery(self) -> None:
        """Readiness follows discovery: /readyz turns 503 once it has failed for longer than
        kpod.discovery.failure_window (checked once per cycle: the window is minutes)."""
        status = self.context.status
        if status is None or self.store is None:
            return
        error = self.store.last_error
        if error:
            status.discovery_failed(error)
        elif not status.discovery_ok:
            status.discovery_recovered()

    def resolve(self, point: Point) -> Resource | Drop:
        assert point.cgroup is not None
        key = (point.cgroup.id, point.cgroup.path)
        found = self._cache.get(key)
        if found is None:
            found = self.resolver.resolve(point.cgroup)
            self._cache[key] = found
        return found

    def process(self, batch: Batch) -> Batch:
        now = time.monotonic()
        if self.store is not None:
            self.context.self_metrics.set(PODS_METRIC, PODS_HELP, float(len(self.store)))
            self._report_discovery()
            self.store.expire_deleted()
            if self.store.generation != self._cache_generation:
                # Pods changed: names, filters and "all started" may have changed with them.
                self._cache.clear()
                self._cache_generation = self.store.generation
        kept: list[Point] = []
        keep = kept.append
        dropped: dict[str, set[int]] = {}
        # Receivers emit a cgroup's points one after another (the same CgroupRef object): the
        # cgroup is looked up once per run of points, and resolved once per cycle (by the
        # object's identity: every ref is held by a point until this call returns).
        resolved: dict[int, Resource | None] = {}
        run: CgroupRef | None = None
        resource: Resource | None = None
        for point in batch.points:
            cgroup = point.cgroup
            if cgroup is None:
                keep(point)
                continue
            if cgroup is not run:
                run = cgroup
                marker = id(cgroup)
                if marker in resolved:
                    resource = resolved[marker]
                else:
                    found = self.resolve(point)
                    self._last_used[(cgroup.id, cgroup.path)] = now
                    if isinstance(found, Resource):
                        resource = found
                    else:
                        resource = None
                        dropped.setdefault(found, set()).add(cgroup.id)
                    resolved[marker] = resource
            if resource is not None:
                keep(Point(point.metric, cgroup, point.attributes, point.value, resource, point.start_time_ns))
        for reason, ids in dropped.items():
            self.context.self_metrics.inc(UNRESOLVED_METRIC, UNRESOLVED_HELP, (("reason", reason),), len(ids))
        cgroups = self.context.cgroups
        if cgroups is not None:
            # The pipeline may have raised the retention since we were built.
            self.continuity.retention_s = cgroups.gone_retention_s
            if self.store is not None:
                self.store.retention_s = cgroups.gone_retention_s
            gone = {ref.id: ref.path for ref in cgroups.gone()}
            kept = self.continuity.remember(kept, cgroups.live_ids(), gone, now)
        store = self.store
        pod_exists = (lambda uid: store.get(uid) is not None) if store is not None else None
        batch.points = self.continuity.add_carried(kept, now, pod_exists)
        self._prune(now)
        return batch
