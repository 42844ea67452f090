"""Gone cgroups and restarted containers, without the kernel: the index's tombstones, the
recently deleted pods, and the per-label-set continuity of counters.

The same moments against the real kernel and the agent process are in
tests/test_lifecycle_kernel.py and tests/test_lifecycle_agent.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from kpod.processors.k8sattributes.continuity import Continuity
from kpod.processors.k8sattributes.pods import PodStore, pod_from_json

from kpod.cgroup.index import CONTAINER, KUBEPODS, NESTED, POD, QOS, CgroupEvent, CgroupIndex, kind_of_path
from kpod.model import CgroupRef, HistogramValue, Kind, MetricDef, Point, Resource

COUNTER = MetricDef("kpod.test.count", Kind.COUNTER, "1", "test counter")
GAUGE = MetricDef("kpod.test.level", Kind.GAUGE, "1", "test gauge")
HIST = MetricDef("kpod.test.latency", Kind.HISTOGRAM, "s", "test histogram")


class FakeSource:
    def __init__(self) -> None:
        self.events: list[CgroupEvent] = []
        self.refreshes = 0

    def drain(self) -> list[CgroupEvent]:
        events, self.events = self.events, []
        return events

    def refreshed(self, index: CgroupIndex) -> None:
        self.refreshes += 1


def test_kind_of_path_follows_the_kernels_rule() -> None:
    uid = "kubepods-burstable-pod1234.slice"
    assert kind_of_path("/kubepods.slice") == KUBEPODS
    assert kind_of_path("/kubepods.slice/kubepods-burstable.slice") == QOS
    assert kind_of_path(f"/kubepods.slice/kubepods-burstable.slice/{uid}") == POD
    assert kind_of_path(f"/kubepods.slice/kubepods-burstable.slice/{uid}/cri-containerd-a.scope") == CONTAINER
    assert kind_of_path(f"/kubepods.slice/kubepods-burstable.slice/{uid}/cri-containerd-a.scope/init") == NESTED
    # Guaranteed pods sit right below the kubepods root.
    assert kind_of_path("/kubepods.slice/kubepods-pod1.slice") == POD
    assert kind_of_path("/kubepods.slice/kubepods-pod1.slice/cri-containerd-b.scope") == CONTAINER
    assert kind_of_path("/kubepods/besteffort/pod1/abc") == CONTAINER
    assert kind_of_path("/system.slice/sshd.service") is None
    assert kind_of_path("/") is None


def test_a_cgroup_born_and_gone_between_walks_is_known_by_its_events(tmp_path: Path) -> None:
    index = CgroupIndex(str(tmp_path), scope="all", gone_retention_s=60)
    source = FakeSource()
    index.add_source(source)
    index.refresh()
    source.events = [CgroupEvent("mkdir", 4242, "/kubepods/pod1/c1"), CgroupEvent("rmdir", 4242, "/kubepods/pod1/c1")]
    index.refresh()
    assert source.refreshes == 2
    assert index.ref(4242) == CgroupRef(4242, "/kubepods/pod1/c1", gone=True)
    assert 4242 in index.known_ids() and 4242 not in index.live_ids()
    assert all(ref.id != 4242 for ref in index.workloads())


def test_a_removed_directory_becomes_a_tombstone_then_is_let_go(tmp_path: Path) -> None:
    child = tmp_path / "kubepods" / "pod1" / "c1"
    child.mkdir(parents=True)
    index = CgroupIndex(str(tmp_path), scope="all", gone_retention_s=0.3)
    index.refresh()
    cid = child.stat().st_ino
    assert index.ref(cid) == CgroupRef(cid, "/kubepods/pod1/c1")
    child.rmdir()
    index.refresh()
    assert index.ref(cid) == CgroupRef(cid, "/kubepods/pod1/c1", gone=True)
    assert [r.id for r in index.gone()] == [cid]
    time.sleep(0.35)
    index.refresh()
    assert cid not in index.known_ids()
    index._walked_at = 0  # a miss walks again at most once a second; make it walk now
    assert index.ref(cid) is None


def test_charge_targets_are_containers_in_a_kubepods_tree(tmp_path: Path) -> None:
    base = tmp_path / "kubepods.slice" / "kubepods-besteffort.slice" / "kubepods-besteffort-pod1.slice"
    (base / "cri-containerd-a.scope" / "nested").mkdir(parents=True)
    (base / "cri-containerd-b.scope").mkdir()
    index = CgroupIndex(str(tmp_path), scope="kubepods")
    index.refresh()
    names = sorted(Path(r.path).name for r in index.charge_targets())
    assert names == ["cri-containerd-a.scope", "cri-containerd-b.scope"]
    local = CgroupIndex(str(tmp_path), scope="all")
    local.refresh()
    assert sorted(Path(r.path).name for r in local.charge_targets()) == ["cri-containerd-b.scope", "nested"]


def _pod(uid: str, name: str) -> dict:
    return {"metadata": {"uid": uid, "name": name, "namespace": "ns"}, "spec": {}, "status": {}}


def test_a_deleted_pod_keeps_its_labels_for_the_retention_only() -> None:
    store = PodStore(retention_s=0.3)
    store.replace([pod_from_json(_pod("u1", "a")), pod_from_json(_pod("u2", "b"))])
    store.delete("u1")
    assert store.get("u1") is not None and store.get("u1").name == "a"
    assert not store.exists("u1") and len(store) == 1 and "u1" not in store.snapshot()
    store.replace([])  # a relist without u2: u2 is kept aside too
    assert store.get("u2") is not None
    time.sleep(0.35)
    assert store.get("u1") is None and store.get("u2") is None


def test_recently_deleted_pods_are_bounded() -> None:
    store = PodStore(retention_s=3600)
    store.MAX_RECENTLY_DELETED = 10
    for i in range(50):
        store.upsert(pod_from_json(_pod(f"u{i}", f"p{i}")))
        store.delete(f"u{i}")
    assert store.recently_deleted() == 10
    assert store.get("u49") is not None and store.get("u0") is None


# --- continuity ---------------------------------------------------------------------------------

LABELS = (("container", "app"), ("namespace", "ns"), ("node", "n"), ("pod", "web"))


def _resource(container_id: str) -> Resource:
    return Resource(LABELS, (("container.id", container_id), ("k8s.pod.uid", "u1")))


def _cycle(
    continuity: Continuity,
    live: dict[int, tuple[float, ...]],
    gone: dict[int, tuple[float, ...] | None],
    now: float,
    pod_exists: bool = True,
) -> dict[str, float]:
    """One cycle: `live` and `gone` cgroups with (counter, gauge) values (None: a gone cgroup
    whose files can no longer be read, so no points).  Returns the merged values by metric."""
    from kpod.model import merge_duplicates

    points = []
    for cgroup_id, values in [*live.items(), *gone.items()]:
        if values is None:
            continue
        ref = CgroupRef(cgroup_id, f"/c{cgroup_id}", gone=cgroup_id in gone)
        points.append(Point(COUNTER, ref, (), values[0], _resource(f"id{cgroup_id}"), 1000 + cgroup_id))
        points.append(Point(GAUGE, ref, (), values[1], _resource(f"id{cgroup_id}"), 0))
    points = continuity.remember(points, set(live), {i: f"/c{i}" for i in gone}, now)
    points = continuity.add_carried(points, now, lambda uid: pod_exists)
    merged = merge_duplicates(points)  # what the pipeline does after the processors
    out: dict[str, float] = {}
    for point in merged:
        assert point.metric.name not in out, "one point per label set and metric"
        out[point.metric.name] = point.value  # type: ignore[assignment]
    return out


def test_a_restarted_containers_counter_never_goes_back() -> None:
    c = Continuity(retention_s=10)
    seen = []
    # First instance counts to 100, then dies; its cgroup is retained, its files unreadable.
    seen.append(_cycle(c, {1: (40, 5)}, {}, 0))
    seen.append(_cycle(c, {1: (100, 5)}, {}, 1))
    seen.append(_cycle(c, {2: (3, 7)}, {1: None}, 2))  # restart: old gone, its last values stand
    assert seen[-1] == {"kpod.test.count": 103, "kpod.test.level": 7}
    seen.append(_cycle(c, {2: (30, 7)}, {1: None}, 5))
    seen.append(_cycle(c, {2: (50, 7)}, {}, 13))  # the old cgroup let go: carried
    assert seen[-1]["kpod.test.count"] == 150
    # Between two restarts the pod shows its carried total alone.
    seen.append(_cycle(c, {}, {2: (60, 0)}, 14))  # eBPF-style: the gone cgroup still reports
    seen.append(_cycle(c, {}, {}, 30))
    assert seen[-1] == {"kpod.test.count": 160}
    seen.append(_cycle(c, {3: (1, 1)}, {}, 31))
    counts = [s["kpod.test.count"] for s in seen]
    assert counts == sorted(counts), counts
    assert counts[-1] == 161


def test_carried_counters_go_with_the_pod() -> None:
    c = Continuity(retention_s=10)
    _cycle(c, {1: (100, 5)}, {}, 0)
    _cycle(c, {}, {1: (100, 5)}, 1)
    assert _cycle(c, {}, {}, 2) == {"kpod.test.count": 100}  # let go: carried while the pod exists
    assert _cycle(c, {}, {}, 5, pod_exists=False) == {"kpod.test.count": 100}
    assert _cycle(c, {}, {}, 11, pod_exists=False) == {"kpod.test.count": 100}  # seen at 2: 9 s
    assert _cycle(c, {}, {}, 13, pod_exists=False) == {}
    assert c.status() == {"cgroups_remembered": 0, "carried_series": 0}


def test_histograms_are_carried_bucket_by_bucket() -> None:
    c = Continuity(retention_s=10)
    bounds = (0.1, 1.0)

    def run(live: dict[int, HistogramValue], gone: dict[int, HistogramValue], now: float) -> HistogramValue:
        points = [
            Point(HIST, CgroupRef(i, f"/c{i}", gone=i in gone), (), h, _resource(f"id{i}"), 0)
            for i, h in [*live.items(), *gone.items()]
        ]
        points = c.remember(points, set(live), {i: f"/c{i}" for i in gone}, now)
        from kpod.model import merge_duplicates

        (point,) = merge_duplicates(c.add_carried(points, now, lambda uid: True))
        assert isinstance(point.value, HistogramValue)
        return point.value

    run({1: HistogramValue(bounds, (1, 2, 3), 4.0)}, {}, 0)
    run({}, {1: HistogramValue(bounds, (1, 2, 3), 4.0)}, 1)
    merged = run({2: HistogramValue(bounds, (0, 1, 0), 0.5)}, {}, 2)
    assert merged == HistogramValue(bounds, (1, 3, 3), 4.5)


def test_offsets_follow_their_label_set_among_other_pods_and_receivers() -> None:
    """Two pods, each point's series read by two receivers in turn (a cgroup's points are not
    all in one run); pod "web" restarts: its offset is added once, to its own label set only,
    and pod "db" (no restart) is never touched."""
    from kpod.model import merge_duplicates

    c = Continuity(retention_s=10)
    other = tuple(sorted({**dict(LABELS), "pod": "db"}.items()))
    resources = {
        1: _resource("old"),
        2: _resource("new"),
        9: Resource(other, (("container.id", "db"), ("k8s.pod.uid", "u2"))),
    }

    def cycle(values: dict[int, float], gone: set[int], now: float) -> dict[tuple[str, str], float]:
        refs = {i: CgroupRef(i, f"/c{i}", gone=i in gone) for i in values}
        points = [Point(metric, refs[i], (), v, resources[i]) for metric in (COUNTER, HIST) for i, v in values.items()]
        points = [p for p in points if p.metric is COUNTER]  # the second "receiver" reads a gauge
        points += [Point(GAUGE, refs[i], (), 1.0, resources[i]) for i in values]
        points += [Point(COUNTER, refs[i], (("cpu", "1"),), v / 2, resources[i]) for i, v in values.items()]
        live = {i for i in values if i not in gone}
        points = c.remember(points, live, {i: f"/c{i}" for i in gone}, now)
        points = c.add_carried(points, now, lambda uid: True)
        out: dict[tuple[str, str], float] = {}
        for point in merge_duplicates(points):
            if point.metric is not COUNTER:
                continue
            key = (dict(point.resource.labels)["pod"], dict(point.attributes).get("cpu", ""))  # type: ignore[union-attr]
            assert key not in out
            out[key] = point.value  # type: ignore[assignment]
        return out

    assert cycle({1: 100.0, 9: 10.0}, set(), 0) == {("web", ""): 100, ("web", "1"): 50, ("db", ""): 10, ("db", "1"): 5}
    assert cycle({9: 20.0}, set(), 1) == {("web", ""): 100, ("web", "1"): 50, ("db", ""): 20, ("db", "1"): 10}
    assert cycle({2: 4.0, 9: 30.0}, set(), 2) == {("web", ""): 104, ("web", "1"): 52, ("db", ""): 30, ("db", "1"): 15}
    assert cycle({2: 8.0, 9: 40.0}, set(), 3) == {("web", ""): 108, ("web", "1"): 54, ("db", ""): 40, ("db", "1"): 20}
    assert c.status()["carried_series"] == 2
