"""The cgroup receivers over a 110-pod node built from captured files (both cgroup drivers,
pure v2 and hybrid), through the entry points the agent uses.

Expected values are computed from the fixture files with the parsers or taken from the
fixtures README's exact values, never from the receivers themselves.
"""

from __future__ import annotations

import os
import re
import shutil
from collections import Counter
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from cgroup_tree import HYBRID_MEM, V2, Tree, build_tree
from kpod.receivers.filesystem import backing_filesystem, candidate_mounts, containing_mount, plan_filesystems

from kpod.cgroup.files import COLLECTION_ERRORS, VANISHED_READS, pod_cgroup_path
from kpod.cgroup.parsers import parse_flat_keyed, parse_mountinfo, parse_single_int
from kpod.component import Receiver
from kpod.fsprobe.client import Probe
from kpod.model import Batch, Point
from kpod.selfmetrics import SelfMetrics

MY_RECEIVERS = ("disk", "net_iface", "filesystem", "cgroup_memory", "pressure")


def make(tree: Tree, type_name: str, self_metrics: SelfMetrics | None = None, **config: object) -> Receiver:
    (ep,) = [e for e in entry_points(group="kpod.receivers") if e.name == type_name]
    factory = ep.load()
    cfg = factory.config_class(**config)
    if type_name == "disk":
        cfg.sysfs_root = tree.sys_root
    receiver = factory.create(tree.context(type_name, self_metrics=self_metrics), cfg)
    assert receiver.preflight() is None
    receiver.start()
    return receiver


def by_key(batch: Batch) -> dict[tuple[str, str, tuple[tuple[str, str], ...]], float]:
    out: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
    for p in batch:
        assert p.cgroup is not None
        key = (p.metric.name, p.cgroup.path, p.attributes)
        assert key not in out, f"duplicate series {key}"
        out[key] = p.value  # type: ignore[assignment]
    return out


LAYOUTS = [("v2", "systemd"), ("v2", "cgroupfs"), ("hybrid", "systemd"), ("hybrid", "cgroupfs")]


@pytest.fixture(scope="module", params=LAYOUTS, ids=lambda p: "-".join(p))
def tree(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tree:
    """A node shared by the tests that only read it (building one takes a moment)."""
    layout, driver = request.param
    return build_tree(tmp_path_factory.mktemp(f"{layout}-{driver}"), pods=110, layout=layout, driver=driver)


@pytest.fixture(params=LAYOUTS, ids=lambda p: "-".join(p))
def fresh_tree(request: pytest.FixtureRequest, tmp_path: Path) -> Tree:
    """A (smaller) node of its own, for tests that break something in it."""
    layout, driver = request.param
    return build_tree(tmp_path, pods=12, layout=layout, driver=driver)


def containers(tree: Tree, role: str) -> list[str]:
    return [c.path for p in tree.pods for c in p.containers if c.role == role]


# ------------------------------------------------------------------------------------------ disk


def test_disk(tree: Tree) -> None:
    receiver = make(tree, "disk")
    first = by_key(receiver.collect())
    second = by_key(receiver.collect())
    assert first == second  # cumulative values exported as they are, never added up per cycle
    if tree.layout == "v2":
        assert receiver.route() == "io.stat (cgroup2)"
        with_io = containers(tree, "io") + containers(tree, "exited")
        # Exact (fixtures README): dd read 4 MiB and wrote 8 MiB on vda (254:0).
        expected = {"kpod.disk.read.bytes": 4194304, "kpod.disk.written.bytes": 8388608}
    else:
        assert receiver.route() == "blkio v1 fallback"
        # Odd pods' I/O containers have a throttle rule on loop0; every other cgroup is "Total 0".
        with_io = [c.path for i, p in enumerate(tree.pods, 1) for c in p.containers if c.role == "io" and i % 2]
        expected = {"kpod.disk.read.bytes": 2097152, "kpod.disk.written.bytes": 4194304}
        assert receiver.status()["v1_cgroups_without_data"] == len(tree.index().workloads()) - len(with_io)
    device = "vda" if tree.layout == "v2" else "loop0"
    for path in with_io:
        for name, value in expected.items():
            assert first[(name, path, (("device", device),))] == value
    assert {path for _, path, _ in first} == set(with_io)  # no series for cgroups without data
    assert len(first) == 4 * len(with_io)
    for (name, _, _), value in first.items():
        if name in ("kpod.disk.reads", "kpod.disk.writes"):
            assert value > 0  # ios counts are as captured: present, not asserted exactly


def test_disk_unknown_device_labelled_by_number(fresh_tree: Tree) -> None:
    block = Path(fresh_tree.sys_root) / "dev" / "block"
    saved = fresh_tree.base / "saved-block"
    shutil.move(block, saved)
    receiver = make(fresh_tree, "disk")
    points = list(receiver.collect())
    assert points and {p.attributes for p in points} <= {(("device", "254:0"),), (("device", "7:0"),)}
    # The device appears (or comes back): the next cycle resolves its name.
    shutil.move(saved, block)
    names = {p.attributes for p in receiver.collect()}
    assert names == {(("device", "vda" if fresh_tree.layout == "v2" else "loop0"),)}


# ------------------------------------------------------------------------------------------ memory


def test_cgroup_memory(tree: Tree) -> None:
    receiver = make(tree, "cgroup_memory")
    got = by_key(receiver.collect())
    if tree.layout == "v2":
        src = V2 / "kubepods.slice/kubepods-besteffort.slice"
        src = next(src.glob("*pod*003.slice/cri-containerd-*.scope"))
        usage = parse_single_int((src / "memory.current").read_text())
        inactive = parse_flat_keyed((src / "memory.stat").read_text())[0]["inactive_file"]
        assert usage == 29491200  # the memory holder, as captured
    else:
        usage = parse_single_int((HYBRID_MEM / "memory.usage_in_bytes").read_text())
        inactive = parse_flat_keyed((HYBRID_MEM / "memory.stat").read_text())[0]["total_inactive_file"]
        assert (usage, inactive) == (24051712, 2150400)
    assert usage is not None
    for path in containers(tree, "io"):
        assert got[("kpod.mem.usage.bytes", path, ())] == usage
        assert got[("kpod.mem.working_set.bytes", path, ())] == usage - inactive
    assert len(got) == 2 * len(tree.index().workloads())


# ------------------------------------------------------------------------------------------ pressure


def test_pressure(tree: Tree) -> None:
    got = by_key(make(tree, "pressure").collect())
    workloads = tree.index().workloads()
    assert len(got) == len(workloads) * 3 * 2  # cpu, memory, io x some, full: all captured files have both
    for ref in workloads:
        for resource in ("cpu", "memory", "io"):
            text = Path(tree.cgroup_root + ref.path, f"{resource}.pressure").read_text()
            # Read independently of the receiver's parser: the total= of each line.
            for kind, total in re.findall(r"^(some|full) .*\btotal=(\d+)$", text, re.M):
                key = (f"kpod.pressure.{resource}.waiting.seconds", ref.path, (("kind", kind),))
                assert got[key] == int(total) / 1e6


# ------------------------------------------------------------------------------------------ net_iface


def test_net_iface_once_per_pod_namespace(tree: Tree) -> None:
    receiver = make(tree, "net_iface")
    got = by_key(receiver.collect())
    pod_net = [p for p in tree.pods if not p.host_network]
    # Exact (fixtures README): eth0 received 7 frames / 1370 bytes (2 dropped), sent 10 / 1000.
    expected = {"rx.bytes": 1370, "rx.packets": 7, "rx.errors": 0, "rx.drops": 2,
                "tx.bytes": 1000, "tx.packets": 10, "tx.errors": 0, "tx.drops": 0}  # fmt: skip
    for pod in pod_net:
        for name, value in expected.items():
            assert got[(f"kpod.net.iface.{name}", pod.path, (("interface", "eth0"),))] == value
    # Once per pod (on the pod cgroup, not per container), lo excluded, host network skipped.
    assert len(got) == 8 * len(pod_net)
    assert {path for _, path, _ in got} == {p.path for p in pod_net}
    assert receiver.status()["host_network_skipped"] == len(tree.pods) - len(pod_net)
    # The point's cgroup id is the pod cgroup's inode (what the enrichment processor resolves).
    point = next(iter(receiver.collect()))
    assert point.cgroup is not None and point.cgroup.id == os.stat(tree.cgroup_root + point.cgroup.path).st_ino


def test_net_iface_follows_the_pods_the_index_knows(fresh_tree: Tree, tmp_path: Path) -> None:
    """The grouping by pod is kept between cycles while the index's cgroups stay the same, and
    made again when they change: a pod that appears, and one that goes, between two cycles."""
    pods = [p for p in fresh_tree.pods if not p.host_network]
    late, gone = Path(fresh_tree.cgroup_root + pods[0].path), Path(fresh_tree.cgroup_root + pods[1].path)
    aside = tmp_path / "aside"
    late.rename(aside)  # not there at the first cycle
    receiver = make(fresh_tree, "net_iface")
    index = receiver.context.cgroups
    first = {path for _, path, _ in by_key(receiver.collect())}
    assert pods[0].path not in first and pods[1].path in first
    assert {path for _, path, _ in by_key(receiver.collect())} == first  # nothing changed: the same
    aside.rename(late)
    shutil.rmtree(gone)
    index.refresh()
    assert {path for _, path, _ in by_key(receiver.collect())} == (first | {pods[0].path}) - {pods[1].path}


def test_net_iface_loopback_configurable(tree: Tree) -> None:
    got = by_key(make(tree, "net_iface", exclude_interfaces=[]).collect())
    assert {attrs for _, _, attrs in got} == {(("interface", "lo"),), (("interface", "eth0"),)}


def test_net_iface_shared_namespace_reported_once(fresh_tree: Tree) -> None:
    # Two pods in one netns (a misconfiguration, or a non-pod cgroup joining a pod's netns).
    a, b = fresh_tree.pods[0], fresh_tree.pods[1]
    for c in b.containers:
        if c.pid:
            link = Path(fresh_tree.proc_root, str(c.pid), "ns", "net")
            link.unlink()
            link.symlink_to(a.netns_file)
    receiver = make(fresh_tree, "net_iface")
    got = by_key(receiver.collect())
    assert receiver.status()["shared_skipped"] == 1
    assert {p for _, p, _ in got} & {a.path, b.path} == {a.path}


# ------------------------------------------------------------------------------------------ filesystem


def test_filesystem(tree: Tree) -> None:
    got = by_key(make(tree, "filesystem").collect())
    # mountinfo-container.txt: / (overlay 0:24), /usr/lib/modules (0:24 again: once), /srv/share,
    # /mnt/data, /run, /run/netns (0:27 again), /data (tmpfs); /etc/hosts is a file; the rest pseudo.
    expected_points = {"/", "/srv/share", "/mnt/data", "/run", "/data"}
    live = [c for p in tree.pods for c in p.containers if c.pid]
    assert len(got) == 3 * len(expected_points) * len(live)
    for c in live:
        points = {dict(attrs)["mountpoint"] for (_, path, attrs) in got if path == c.path}
        assert points == expected_points
        # The fake root is a directory of the test machine: its statvfs is the truth.  That
        # filesystem is shared with the rest of the machine, so free space may move a little
        # between the receiver's statvfs and ours (the exact check is the namespace test).
        vfs = os.statvfs(Path(tree.proc_root, str(c.pid), "root", "data"))
        # /data is a tmpfs of the container's own (0:34 made per container): its device number.
        attrs = (("device", f"0:{300000 + c.pid}"), ("fstype", "tmpfs"), ("mountpoint", "/data"))
        capacity = vfs.f_blocks * vfs.f_frsize
        assert got[("kpod.fs.capacity.bytes", c.path, attrs)] == capacity
        slack = capacity // 100
        assert abs(got[("kpod.fs.available.bytes", c.path, attrs)] - vfs.f_bavail * vfs.f_frsize) <= slack
        used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize
        assert abs(got[("kpod.fs.usage.bytes", c.path, attrs)] - used) <= slack


# ------------------------------------------------------------------------------------------ errors


def test_vanished_cgroup_is_counted_apart_and_cycle_kept(fresh_tree: Tree) -> None:
    sm = SelfMetrics()
    receivers = {name: make(fresh_tree, name, sm) for name in ("disk", "cgroup_memory", "pressure")}
    victim = containers(fresh_tree, "io")[0]  # odd pod 1: has blkio data on hybrid too
    before = {name: len(r.collect()) for name, r in receivers.items()}
    # The pod ends after the walk: its directories go (the index still lists the cgroup).
    shutil.rmtree(fresh_tree.cgroup_root + victim)
    for mount in fresh_tree.mounts.v1.values():
        shutil.rmtree(mount + victim)
    for name, r in receivers.items():
        after = r.collect()
        assert 0 < len(after) < before[name]
        assert all(p.cgroup is not None and p.cgroup.path != victim for p in after)
        # A pod that ended between the index and the read is churn, not an error: the
        # collection-errors alert must not fire on every busy node.
        assert sm.get(VANISHED_READS, (("receiver", name),)) >= 1
        assert sm.get(COLLECTION_ERRORS, (("receiver", name),)) == 0


CGROUP_FILE_RECEIVERS = ("cgroup_cpu", "cgroup_memory", "disk", "pressure", "net_iface", "filesystem")


def test_vanished_reads_are_exported_at_zero_before_any(tree: Tree) -> None:
    """Each cgroup-file receiver's kpod_collection_vanished_total is there at 0 from its start,
    not from the first pod that ends during a cycle (until then the agent's families would
    follow the node's churn, and increase() would miss the first count)."""
    sm = SelfMetrics()
    for name in CGROUP_FILE_RECEIVERS:
        make(tree, name, sm).collect()  # nothing vanishes in this tree
    zeros = {p.attributes: p.value for p in sm.points() if p.metric.name == VANISHED_READS}
    assert zeros == {(("receiver", name),): 0.0 for name in CGROUP_FILE_RECEIVERS}


def test_unreadable_file_of_a_live_cgroup_is_an_error(fresh_tree: Tree) -> None:
    sm = SelfMetrics()
    receiver = make(fresh_tree, "pressure", sm)
    path = containers(fresh_tree, "io")[0]
    # A directory where the kernel has a file: reading it fails (EISDIR) while the cgroup lives.
    target = Path(fresh_tree.cgroup_root + path + "/io.pressure")
    target.unlink()
    target.mkdir()
    receiver.collect()
    assert sm.get(COLLECTION_ERRORS, (("receiver", "pressure"),)) == 1
    assert sm.get(VANISHED_READS, (("receiver", "pressure"),)) == 0


def test_dead_pid_is_counted_apart_for_filesystem(fresh_tree: Tree) -> None:
    sm = SelfMetrics()
    receiver = make(fresh_tree, "filesystem", sm)
    c = next(c for p in fresh_tree.pods for c in p.containers if c.role == "io")
    shutil.rmtree(Path(fresh_tree.proc_root, str(c.pid)))
    points = receiver.collect()
    assert all(p.cgroup is not None and p.cgroup.path != c.path for p in points)
    assert len(points) > 0
    assert sm.get(VANISHED_READS, (("receiver", "filesystem"),)) == 1
    assert sm.get(COLLECTION_ERRORS, (("receiver", "filesystem"),)) == 0


def test_controller_file_missing_in_live_cgroup_is_not_an_error(fresh_tree: Tree) -> None:
    sm = SelfMetrics()
    receiver = make(fresh_tree, "pressure", sm)
    path = containers(fresh_tree, "io")[0]
    os.unlink(fresh_tree.cgroup_root + path + "/io.pressure")
    got = by_key(receiver.collect())
    assert not any(k[0].startswith("kpod.pressure.io") and k[1] == path for k in got)
    assert sm.get(COLLECTION_ERRORS, (("receiver", "pressure"),)) == 0


# ------------------------------------------------------------------------------------------ all


def test_whole_receiver_set(tree: Tree) -> None:
    names = [e.name for e in entry_points(group="kpod.receivers")]
    assert set(MY_RECEIVERS) <= set(names)
    sm = SelfMetrics()
    total: list[Point] = []
    for name in MY_RECEIVERS:
        total.extend(make(tree, name, sm).collect())
    live = sum(1 for p in tree.pods for c in p.containers if c.pid)
    assert len(total) > 110 * 10
    assert live == 220
    # A healthy tree: no collection error, nothing dropped or stuck (those series exist at 0).
    assert [(p.metric.name, p.attributes, p.value) for p in sm.points() if p.value] == []


# ------------------------------------------------------------------------------------------ pure helpers


def test_candidate_mounts_of_captured_container() -> None:
    mounts = parse_mountinfo((V2 / "proc" / "mountinfo-container.txt").read_text())
    chosen = [m.mount_point for m in candidate_mounts(mounts)]
    # Pseudo filesystems, everything under /proc, /sys, /dev, the nsfs and /etc/hosts are gone;
    # repeats of a device are left to the receiver (after its regular-file check).
    assert chosen == ["/", "/run", "/run/netns", "/usr/lib/modules/6.1.0-56-amd64", "/srv/share", "/mnt/data", "/data"]
    assert [m.mount_point for m in candidate_mounts(mounts, frozenset({"tmpfs"}), ("/srv", "/mnt/"))] == [
        "/",
        "/usr/lib/modules/6.1.0-56-amd64",
    ]


def test_plan_filesystems_groups_a_containers_mounts_by_device() -> None:
    """What the per-cycle loop walks: one group per device in the order of its first mount, its
    mounts in mountinfo order, each with the (device, root) its measurement is shared by and
    the probe of that mount through the container's root."""
    mounts = candidate_mounts(parse_mountinfo((V2 / "proc" / "mountinfo-container.txt").read_text()))
    attrs = {m.mount_point: (("mountpoint", m.mount_point),) for m in mounts}
    plan = plan_filesystems(7, "/pod", "/proc/42/root", [(m, attrs[m.mount_point]) for m in mounts])
    assert [[probe.mount_point for _, _, probe in fs] for fs in plan] == [
        [m.mount_point for m in mounts if m.dev == dev] for dev in dict.fromkeys(m.dev for m in mounts)
    ]
    assert "/usr/lib/modules/6.1.0-56-amd64" in [probe.mount_point for _, _, probe in plan[0]]  # the root's device
    for fs in plan:
        for share, mount_attrs, probe in fs:
            mount = next(m for m in mounts if m.mount_id == probe.mount_id)
            assert share == (mount.dev, mount.root) and mount_attrs == attrs[mount.mount_point]
            assert probe == Probe((7, mount.mount_id, mount.mount_point), "/pod", "/proc/42/root",
                                  mount.mount_point, mount.mount_id, mount.dev)  # fmt: skip


# A containerd node: / on the NVMe disk, /var/lib/containerd on a disk of its own, a tmpfs.
HOST_MOUNTINFO = """\
22 1 259:1 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p1 rw
23 22 259:3 / /var/lib/containerd rw,relatime shared:2 - xfs /dev/nvme1n1 rw
24 22 0:27 / /run rw,nosuid shared:3 - tmpfs tmpfs rw,size=400000k
25 24 0:50 / /run/containerd/io.containerd.runtime.v2.task/k8s.io/abc/rootfs rw - overlay overlay rw,\
lowerdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs,\
upperdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/fs,\
workdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/work
"""
# Inside a container: its root overlay, an emptyDir (a bind of a kubelet directory on the node's
# disk), a memory-backed emptyDir, an NFS volume.
CONTAINER_MOUNTINFO = """\
900 800 0:50 / / rw,relatime - overlay overlay rw,\
lowerdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs,\
upperdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/fs,\
workdir=/var/lib/containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/9/work
901 900 259:1 /var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/cache /cache rw - ext4 /dev/nvme0n1p1 rw
902 900 0:61 / /scratch rw - tmpfs tmpfs rw,size=65536k
903 900 0:62 / /shared rw - nfs4 files.example.com:/export/shared rw,vers=4.1
904 900 0:63 / /odd rw - overlay overlay rw,lowerdir=/l,upperdir=/var/lib/containerd\\054old/up,workdir=/w
"""


def test_backing_filesystem_names_the_disk_that_holds_the_data() -> None:
    host = parse_mountinfo(HOST_MOUNTINFO)
    mounts = {m.mount_point: m for m in parse_mountinfo(CONTAINER_MOUNTINFO)}
    # The root overlay's upper layer is on /var/lib/containerd's disk, not on "/" nor itself.
    assert backing_filesystem(mounts["/"], host) == ("/dev/nvme1n1", "xfs")
    assert backing_filesystem(mounts["/cache"], host) == ("/dev/nvme0n1p1", "ext4")
    assert backing_filesystem(mounts["/scratch"], host) == ("0:61", "tmpfs")
    assert backing_filesystem(mounts["/shared"], host) == ("files.example.com:/export/shared", "nfs4")
    # The upperdir "/var/lib/containerd,old/up" (mountinfo escapes the comma) lies on "/".
    assert backing_filesystem(mounts["/odd"], host) == ("/dev/nvme0n1p1", "ext4")
    # Without the host's table (unreadable), an overlay stays itself.
    assert backing_filesystem(mounts["/"], []) == ("0:50", "overlay")


def test_containing_mount_is_the_longest_prefix_and_the_last_stacked() -> None:
    host = parse_mountinfo(HOST_MOUNTINFO + "26 22 0:70 / /var/lib/containerd rw - tmpfs tmpfs rw\n")
    assert containing_mount("/var/lib/containerd/x", host).source == "tmpfs"  # type: ignore[union-attr]
    assert containing_mount("/var/lib/containerdx", host).mount_point == "/"  # type: ignore[union-attr]
    assert containing_mount("/run", host).mount_point == "/run"  # type: ignore[union-attr]


def test_pod_cgroup_path_both_drivers() -> None:
    systemd = (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0a1b2c3d_0000_4000_8000_000000000001.slice"
    )
    assert pod_cgroup_path(systemd + "/cri-containerd-" + "a" * 64 + ".scope") == systemd
    cgroupfs = "/kubepods/pod0a1b2c3d-0000-4000-8000-000000000005"
    assert pod_cgroup_path(cgroupfs + "/" + "b" * 64) == cgroupfs
    static = "/kubepods/besteffort/pod" + "c" * 32
    assert pod_cgroup_path(static + "/" + "d" * 64) == static
    for not_a_container in ("/kubepods/burstable", "/system.slice/ssh.service", "/x", "/"):
        assert pod_cgroup_path(not_a_container) is None


def test_receiver_configs_go_through_the_config_builder() -> None:
    from kpod.config.build import Where, build
    from kpod.config.errors import ConfigError

    where = Where("test.yaml", "receivers.x")
    by_type = {e.name: e.load().config_class for e in entry_points(group="kpod.receivers") if e.name in MY_RECEIVERS}
    for config_class in by_type.values():
        assert build(config_class, {}, where) == config_class()  # defaults are valid
    disk = build(by_type["disk"], {"device_name_ttl": "1m", "sysfs_root": "/host/sys"}, where)
    assert disk.device_name_ttl.seconds == 60 and disk.sysfs_root == "/host/sys"
    assert build(by_type["net_iface"], {"exclude_interfaces": ["lo", "docker0"]}, where).exclude_interfaces == [
        "lo",
        "docker0",
    ]
    with pytest.raises(ConfigError):
        build(by_type["net_iface"], {"exclude_interface": ["lo"]}, where)
    with pytest.raises(ConfigError):
        build(by_type["filesystem"], {"exclude_fstypes": "tmpfs"}, where)


def test_read_helpers_return_whole_files(tmp_path: Path) -> None:
    from kpod.cgroup.files import read_record, read_text

    for size in (0, 100, 4000, 4096, 70000, 200000):
        f = tmp_path / f"f{size}"
        data = "".join(f"{i}\n" for i in range(size))[:size]
        f.write_text(data)
        assert read_text(str(f)) == read_text(str(f), max_record=32) == read_record(str(f)) == data
    # Real seq_file files, larger than a page where the host has that many mounts/processes.
    for path in ("/proc/self/mountinfo", "/proc/self/net/dev", "/proc/self/status"):
        with open(path) as f:
            expected = f.read()
        assert read_text(path, max_record=512 if "net" in path else 0) == expected


# ------------------------------------------------------------------------------------------ parses remembered

# The files each receiver parses through a ParseMemo (kpod.cgroup.files), by layout.
_MEMO_FILES = {
    "pressure": {"v2": ("cpu.pressure", "memory.pressure", "io.pressure")},
    "cgroup_cpu": {"v2": ("cpu.stat",)},
    "disk": {"v2": ("io.stat",), "hybrid": ("blkio.throttle.io_service_bytes", "blkio.throttle.io_serviced")},
}


def _points(batch: Batch) -> list[tuple[object, ...]]:
    """Everything a point carries, the value's type included (an int is not a float)."""
    return [(p.metric, p.cgroup, p.attributes, p.value, type(p.value), p.resource, p.start_time_ns) for p in batch]


def _memo_file(tree: Tree, ref_path: str, file: str) -> Path:
    """Where `file` of a workload is: the v1 blkio tree for blkio files (hybrid)."""
    if file.startswith("blkio."):
        return Path(tree.mounts.v1[file.split(".")[0]] + ref_path, file)
    return Path(tree.cgroup_root + ref_path, file)


@pytest.mark.parametrize("name", sorted(_MEMO_FILES))
def test_remembered_parses_give_what_a_fresh_receiver_gives(fresh_tree: Tree, name: str) -> None:
    """A receiver that parses through a ParseMemo exports, cycle after cycle, exactly the
    points a new receiver (nothing remembered) collects from the same files: when nothing
    changed (every parse remembered), when a file of one cgroup changed (its new values, not
    the remembered ones), and when it is damaged (each read's skipped line counted again)."""
    from kpod.selfmetrics import parser_skips

    receiver = make(fresh_tree, name)
    batch = receiver.collect()
    first = _points(batch)
    assert first == _points(make(fresh_tree, name).collect()) and first
    assert _points(receiver.collect()) == first  # every file's bytes seen: every parse remembered

    files = _MEMO_FILES[name].get(fresh_tree.layout, _MEMO_FILES[name]["v2"])
    # The workload with the most points (files with data; not an empty io.stat, not "Total 0").
    ((ref, _),) = Counter(p.cgroup for p in batch).most_common(1)
    assert ref is not None
    for file in files:  # every number of its files moved on
        path = _memo_file(fresh_tree, ref.path, file)
        path.write_text(re.sub(r"\d+", lambda m: str(int(m.group()) + 7), path.read_text()))
    changed = _points(receiver.collect())
    assert changed == _points(make(fresh_tree, name).collect()) and changed != first

    for file in files:  # a line no parser accepts
        path = _memo_file(fresh_tree, ref.path, file)
        path.write_text(path.read_text() + "some total= garbage here\n")
    before = sum(parser_skips().values())
    damaged = _points(receiver.collect())
    once = sum(parser_skips().values()) - before
    assert once > 0 and damaged == _points(make(fresh_tree, name).collect())
    before = sum(parser_skips().values())
    assert _points(receiver.collect()) == damaged
    assert sum(parser_skips().values()) - before == once  # counted at every read, not remembered


def test_parse_memo_parses_each_content_once_and_forgets_what_two_cycles_did_not_read() -> None:
    from kpod.cgroup.files import ParseMemo

    parsed: list[str] = []

    def parse(text: str) -> tuple[str, ...]:
        parsed.append(text)
        return tuple(text.split())

    memo = ParseMemo(parse)
    memo.new_cycle()
    assert memo(b"a b") == ("a", "b") and memo(b"a b") == ("a", "b") and memo(b"\xff c") == ("\udcff", "c")
    assert parsed == ["a b", "\udcff c"]  # the same bytes twice in a cycle: parsed once
    memo.new_cycle()
    assert memo(b"a b") == ("a", "b") and len(parsed) == 2  # seen in the last cycle
    memo.new_cycle()
    memo.new_cycle()  # "\xff c" unread for two cycles, "a b" for one
    assert memo(b"\xff c") == ("\udcff", "c") and memo(b"a b") == ("a", "b")
    assert parsed == ["a b", "\udcff c", "\udcff c", "a b"]
