"""A pod makes as many mounts and interfaces as it likes; its series are capped, not the node's.

Issue 19: 3000 tmpfs mounts in one pod gave 9252 filesystem series, 500 interfaces 4080
interface series, with no limit.  Here a real agent process reads such a pod beside an
ordinary one: the hostile pod gets at most its cap (the defaults, docs/CONFIGURATION.md), the
first filesystems and interfaces in the kernel's order, the rest is counted in
kpod_series_dropped_total{reason="pod_limit"}, the agent does not even measure the filesystems
beyond the cap, and the ordinary pod keeps every series.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from agent_proc import AgentProcess, Sample, free_port
from hostile import MANY_MOUNTS, Scratch, agent_config, pod_cgroups, run, scratch, skip_reason
from kpod.receivers.filesystem import FilesystemConfig
from kpod.receivers.net_iface import NetIfaceConfig

pytestmark = [pytest.mark.kernel, pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]
__all__ = ["scratch"]

MOUNTS = 3000
VETH_PAIRS = 250  # 500 interfaces
FS_CAP = FilesystemConfig().max_series_per_pod
NET_CAP = NetIfaceConfig().max_series_per_pod



def of(samples: list[Sample], container: Path, prefix: str) -> list[Sample]:
    """The series of one container's pod (local mode labels: a container by its id cut to 12
    characters; interfaces belong to the pod cgroup, labelled by its directory name)."""
    label = container.parent.name if prefix.startswith("kpod_net") else container.name[:12]
    return [x for x in samples if x.name.startswith(prefix) and x.labels.get("container") == label]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [x.value for x in samples if x.name == name and labels.items() <= x.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_many_mounts_and_interfaces_are_capped_per_pod(scratch: Scratch, tmp_path: Path) -> None:
    s = scratch
    base, pods = pod_cgroups(s, pods=2)
    (hostile,), (ordinary,) = pods
    # The hostile pod: 3000 tmpfs mounts, and 500 interfaces in its network namespace.
    ns = s.netns()
    batch = tmp_path / "links.batch"
    batch.write_text("".join(f"link add v{i}a type veth peer name v{i}b\n" for i in range(VETH_PAIRS)))
    run("ip", "-n", ns, "-batch", str(batch))
    links = json.loads(run("ip", "-n", ns, "-j", "link", "show"), strict=False)
    assert len([link for link in links if link["ifname"] != "lo"]) == 2 * VETH_PAIRS
    mounts_dir = tmp_path / "mounts"  # the mounts vanish with the pod's namespace, tmp_path with the test
    mounts_dir.mkdir()
    proc = s.spawn(["ip", "netns", "exec", ns, sys.executable, "-c", MANY_MOUNTS, str(mounts_dir), str(MOUNTS)],
                   hostile)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    # The ordinary pod: one volume, its own network namespace with one interface pair.
    other_ns = f"{ns}o"
    run("ip", "netns", "add", other_ns)
    s.defer(f"netns {other_ns}", lambda: run("ip", "netns", "del", other_ns))
    run("ip", "-n", other_ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    volume = tmp_path / "volume"
    volume.mkdir()
    s.spawn(["ip", "netns", "exec", other_ns, sys.executable, "-c", MANY_MOUNTS, str(volume), "1"], ordinary)

    port = free_port()
    # 1 s cycles: reading a 3000-line mountinfo and a 500-line net/dev takes a moment on a busy CI box.
    config = agent_config(base, port, {"filesystem": "", "net_iface": ""}, poll="1s")
    agent = AgentProcess(config, tmp_path, port).start()
    s.defer(f"agent {agent.pid}", agent.stop)
    agent.wait_ready()

    missing: list[tuple[str, str]] = []

    def both() -> bool:
        samples = agent.metrics()
        wanted = [(pod, prefix) for pod in (hostile, ordinary) for prefix in ("kpod_fs_", "kpod_net_")]
        missing[:] = [(pod.name[:12], prefix) for pod, prefix in wanted if not of(samples, pod, prefix)]
        return not missing

    try:
        agent.wait_until(both, 30, "reporting both pods")
    except AssertionError as error:
        raise AssertionError(f"{error}\nmissing: {missing}") from None
    time.sleep(1.0)
    samples = agent.metrics()
    # The hostile pod: exactly its caps, filled with its first filesystems and interfaces.
    fs = of(samples, hostile, "kpod_fs_")
    assert len(fs) == FS_CAP, len(fs)
    points = {x.labels["mountpoint"] for x in fs}
    ours = sorted(int(p.rsplit("/m", 1)[1]) for p in points if p.startswith(str(mounts_dir)))
    assert "/" in points and ours == list(range(len(ours))) and ours, points  # the first ones, in order
    net = of(samples, hostile, "kpod_net_iface_")
    assert len(net) == NET_CAP, len(net)
    assert {x.labels["interface"] for x in net} <= {f"v{i}{end}" for i in range(VETH_PAIRS) for end in "ab"}
    assert value(samples, "kpod_series_dropped_total", receiver="filesystem", reason="pod_limit") > 0
    assert value(samples, "kpod_series_dropped_total", receiver="net_iface", reason="pod_limit") > 0
    # Beyond the cap nothing is measured: the worker got the pod's first filesystems only.
    details = agent.status()["receivers"]["filesystem"]["details"]["last_cycle"]
    assert details["probes"] <= FS_CAP // 3 + 3, details
    # The ordinary pod keeps everything: /, its volume (and what the host's root has mounted,
    # which it shares here), its two interfaces.
    assert {"/", str(volume / "m00000")} <= {x.labels["mountpoint"] for x in of(samples, ordinary, "kpod_fs_")}
    assert {x.labels["interface"] for x in of(samples, ordinary, "kpod_net_iface_")} == {"eth0", "eth1"}
    assert agent.stop() == 0
