"""The runc pod harness (tests/runc_pods.py) against the kernel: the layout it makes is the
kubelet's and containerd's, and it leaves nothing behind.

Checked from /proc and the cgroup trees, not from the harness's own bookkeeping: the kubelet's
cgroup path of every container in every hierarchy (cgroupfs and systemd names, each QoS class),
the memory limit in the memory controller, the namespaces app containers share with the
sandbox, a deleted container's cgroups gone while its pod's stay, and after a failure half-way
no container, cgroup, process or state directory left.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from engine import engine_skip_reason
from helpers import require_tools
from kpod.processors.k8sattributes.podpath import parse_pod_path
from runc_pods import (
    RuncRuntime,
    cgroup_mounts,
    container_cgroup,
    link_pods,
    net_dev,
    new_container_id,
    pod_cgroup,
    runc_runtime,
)

pytestmark = [pytest.mark.slow, pytest.mark.skipif(engine_skip_reason() is not None, reason=engine_skip_reason() or "")]


@pytest.fixture(autouse=True)
def _runc_installed() -> None:
    require_tools("runc", "nsenter", "ip")


UID = "0d3c4a8e-5a1f-4b7e-9c2d-6e8f1a2b3c4d"
FLAT = UID.replace("-", "_")  # the systemd driver's spelling


@pytest.mark.parametrize(
    ("driver", "qos", "expected"),
    [
        ("cgroupfs", "besteffort", f"/kubepods/besteffort/pod{UID}"),
        ("cgroupfs", "burstable", f"/kubepods/burstable/pod{UID}"),
        ("cgroupfs", "guaranteed", f"/kubepods/pod{UID}"),
        ("systemd", "burstable", f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{FLAT}.slice"),
        ("systemd", "guaranteed", f"/kubepods.slice/kubepods-pod{FLAT}.slice"),
    ],
)  # fmt: skip
def test_kubelet_cgroup_names(driver: str, qos: str, expected: str) -> None:
    cid = new_container_id()
    assert pod_cgroup(driver, qos, UID) == expected
    path = container_cgroup(driver, qos, UID, cid)
    assert path == expected + (f"/{cid}" if driver == "cgroupfs" else f"/cri-containerd-{cid}.scope")
    parsed = parse_pod_path(path)  # the agent's own reading of the path
    assert parsed is not None and (parsed.pod_uid, parsed.container_id, parsed.qos) == (UID, cid, qos)


def _proc_cgroups(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        out[controllers or "cgroup2"] = path
    return out


def _ns(pid: int, kind: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{kind}")


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_pod_layout_as_containerd_makes_it(driver: str, tmp_path: Path) -> None:
    with runc_runtime(tmp_path) as runtime:
        pod = runtime.pod("ns", "web", qos="burstable", driver=driver)
        app = pod.run("app", ["/usr/bin/sleep", "infinity"], memory_limit=96 << 20)
        sidecar = pod.run("sidecar", ["/usr/bin/sleep", "infinity"])
        assert pod.sandbox is not None
        # Every hierarchy (each v1 controller, the named systemd one, cgroup2) has the
        # container at the kubelet's path.
        for container in (pod.sandbox, app, sidecar):
            paths = _proc_cgroups(container.pid)
            assert set(paths.values()) == {container.cgroups_path}, paths
            assert len(paths) == len(cgroup_mounts())
        memcg = next(
            p for p in app.cgroup_dirs() if (p / "memory.limit_in_bytes").exists() or (p / "memory.max").exists()
        )
        limit_file = memcg / ("memory.limit_in_bytes" if (memcg / "memory.limit_in_bytes").exists() else "memory.max")
        assert int(limit_file.read_text()) == 96 << 20
        # App containers join the sandbox's network, IPC and UTS namespaces, not its PID namespace.
        for kind in ("net", "ipc", "uts"):
            assert _ns(app.pid, kind) == _ns(pod.sandbox.pid, kind) == _ns(sidecar.pid, kind)
        assert _ns(app.pid, "pid") != _ns(pod.sandbox.pid, "pid")
        assert _ns(pod.sandbox.pid, "net") != os.readlink("/proc/self/ns/net")
        # Deleted as a runtime deletes it: its cgroups go, the pod's stay (the kubelet's).
        app_dirs = app.cgroup_dirs()
        assert len(app_dirs) == len(cgroup_mounts())
        app.delete()
        assert not any(d.exists() for d in app_dirs)
        assert not Path(f"/proc/{app.pid}").exists() or "Z" in Path(f"/proc/{app.pid}/stat").read_text()
        pod_dirs = [root / pod.cgroup.lstrip("/") for root in cgroup_mounts()]
        assert all(d.is_dir() for d in pod_dirs)
        pod.remove()
        assert not any(d.exists() for d in pod_dirs), "the pod cgroup goes with the pod"


def test_two_pods_linked_by_a_veth(tmp_path: Path) -> None:
    with runc_runtime(tmp_path) as runtime:
        a, b = runtime.pod("ns", "a"), runtime.pod("ns", "b")
        link_pods(a.netns, b.netns, "10.215.0.1", "10.215.0.2")
        assert a.sandbox is not None and b.sandbox is not None
        ping = a.run("ping", ["python3", "-c", "import socket; s = socket.create_connection(('10.215.0.2', 9)); "],
                     env=())  # fmt: skip
        ping.wait_stopped(10)  # connection refused (RST): one exchange on the wire, no ARP
        a_if, b_if = net_dev(a.sandbox.pid)["eth0"], net_dev(b.sandbox.pid)["eth0"]
        assert a_if[1] == b_if[0] > 0 and a_if[0] == b_if[1] > 0, (a_if, b_if)


def test_nothing_is_left_after_a_failure(tmp_path: Path) -> None:
    made: dict[str, object] = {}
    with pytest.raises(RuntimeError, match="half-way"), runc_runtime(tmp_path) as runtime:
        pod = runtime.pod("ns", "broken", driver="systemd")
        app = pod.run("app", ["/usr/bin/sleep", "infinity"])
        pod_dirs = [root / pod.cgroup.lstrip("/") for root in cgroup_mounts()]
        made.update(state=runtime.state_dir, pids=[app.pid, pod.sandbox.pid if pod.sandbox else 0],
                    dirs=[*app.cgroup_dirs(), *pod_dirs])  # fmt: skip
        raise RuntimeError("a test fails half-way")
    assert not Path(made["state"]).exists()  # type: ignore[arg-type]
    assert not any(Path(d).exists() for d in made["dirs"]), made["dirs"]  # type: ignore[attr-defined]
    for pid in made["pids"]:  # type: ignore[attr-defined]
        stat = Path(f"/proc/{pid}/stat")
        assert not stat.exists() or ") Z " in stat.read_text(), f"process {pid} still runs"


def test_a_container_that_cannot_start_is_reported_and_cleaned(tmp_path: Path) -> None:
    with runc_runtime(tmp_path) as runtime:
        pod = runtime.pod("ns", "bad")
        with pytest.raises(AssertionError, match="runc run"):
            pod.run("app", ["/no/such/binary"])
        listed = runtime.runc("list", "--quiet").stdout.split()
        assert pod.sandbox is not None and listed == [pod.sandbox.id]
    assert isinstance(runtime, RuncRuntime) and not runtime.state_dir.exists()
