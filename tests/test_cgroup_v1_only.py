"""Nodes whose pods exist only in cgroup v1 hierarchies, shown to the agent for real.

A pod's cgroups are made in every v1 hierarchy of this host (below a prefix of our own) and not
in the cgroup2 tree, as a runtime that knows only v1 makes them on a hybrid node; a process in
the pod spins under a CFS quota.  The agent runs as its own process in a mount namespace of its
own in which the v1 hierarchies are those prefixes (bind mounts) and the cgroup2 mount is either
an empty cgroup of ours (cgroup2 mounted without the kubepods tree) or gone (a v1 node).  Then:

- `check`'s cgroups line, the start-up log and /debug/status say in one line that the pods are
  only in v1 and eBPF events cannot be attributed, and every eBPF receiver reports that instead
  of loading programs whose events would all land on host cgroups;
- cgroup_cpu reads the v1 cpuacct and cpu controllers: usage, periods and throttling equal the
  kernel's own cpuacct.usage and cpu.stat of the pod's container.

Everything made here goes away afterwards: the processes, the cgroups (kernel_util trees), the
namespace with the agent.  The host's mounts are never touched (private propagation).
"""

from __future__ import annotations

import contextlib
import shlex
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_proc import AgentProcess, clean_env
from fake_apiserver import FakeApiServer, make_pod
from helpers import free_port, poll_until, require_tools
from kernel_util import Workload, cgroup_tree, kernel_test, mounts, settled, wait_blocked, workloads

from kpod.cgroup.mounts import choose_hierarchy
from kpod.cgroup.parsers import parse_cpu_stat

pytestmark = [pytest.mark.slow, *kernel_test]

NAMESPACE, POD, CONTAINER, NODE = "legacy", "v1-web", "app", "node-v1"
EBPF_RECEIVERS = ("cpu_sched", "memory", "net_tcp", "syscall", "bpf_maps")
QUOTA_US, PERIOD_US = 20_000, 100_000
# 0.4 s of CPU under a 20 % quota: about 2 s, most periods ending throttled.
SPIN = "while time.process_time() < 0.4:\n    pass\nprint('spun', flush=True)\nsys.stdin.readline()\n"


def v1_roots() -> list[str]:
    """Each v1 hierarchy's mount point once (co-mounted controllers share one)."""
    return sorted(set(mounts().v1.values()))


@dataclass
class V1Pod:
    prefix: str
    uid: str
    container_id: str
    spinner: Workload
    dirs: dict[str, Path]  # v1 mount point -> the container's cgroup there
    empty_cgroup2: Path | None  # a cgroup2 directory with nothing below it

    def truth(self) -> dict[str, float]:
        """The kernel's own CPU counters of the container (v1 cpuacct and cpu controllers)."""
        v1 = mounts().v1
        usage_ns = int((self.dirs[v1["cpuacct"]] / "cpuacct.usage").read_text())
        stat = parse_cpu_stat((self.dirs[v1["cpu"]] / "cpu.stat").read_text())
        return {"kpod_cpu_usage_seconds_total": usage_ns / 1e9, "kpod_cpu_periods_total": stat["nr_periods"],
                "kpod_cpu_throttled_periods_total": stat["nr_throttled"],
                "kpod_cpu_throttled_seconds_total": stat["throttled_time"] / 1e9}  # fmt: skip

    def namespace(self, cgroup2: bool) -> tuple[str, ...]:
        """`unshare` prefix: a mount namespace whose v1 hierarchies are our prefixes and whose
        cgroup2 mount is our empty cgroup (cgroup2 True) or unmounted (False)."""
        steps = [f"mount --bind {shlex.quote(f'{root}/{self.prefix}')} {shlex.quote(root)}" for root in v1_roots()]
        unified = mounts().unified
        if unified:
            steps.append(f"mount --bind {self.empty_cgroup2} {unified}" if cgroup2 else f"umount -l {unified}")
        return (
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            " && ".join(steps) + ' && exec "$@"',
            "sh",
        )


@pytest.fixture
def v1_pod() -> Iterator[V1Pod]:
    require_tools("unshare")
    roots = v1_roots()
    if not {"cpu", "cpuacct"} <= set(mounts().v1):
        pytest.skip("no cgroup v1 cpu and cpuacct hierarchies on this host (pure cgroup v2)")
    prefix = f"kpod-test-v1-{uuid.uuid4().hex[:10]}"
    uid, cid = str(uuid.uuid4()), uuid.uuid4().hex + uuid.uuid4().hex
    with contextlib.ExitStack() as stack:
        trees = {root: stack.enter_context(cgroup_tree(root)) for root in roots}
        dirs = {root: tree.mkdir(f"{prefix}/kubepods/burstable/pod{uid}/{cid}") for root, tree in trees.items()}
        unified = mounts().unified
        empty = stack.enter_context(cgroup_tree(unified)).mkdir(f"{prefix}-empty") if unified else None
        cpuset = mounts().v1.get("cpuset")
        if cpuset:  # a new cpuset has no CPUs or memory nodes until given its parent's, as runc does
            level = Path(cpuset)
            for part in Path(f"{prefix}/kubepods/burstable/pod{uid}/{cid}").parts:
                for name in ("cpuset.cpus", "cpuset.mems"):
                    (level / part / name).write_text((level / name).read_text())
                level = level / part
        cpu = dirs[mounts().v1["cpu"]]
        (cpu / "cpu.cfs_period_us").write_text(str(PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(QUOTA_US))
        procs = stack.enter_context(workloads())  # unwound first: the spinner dies before its cgroups go
        spinner = Workload(SPIN)
        procs.append(spinner)
        for root, tree in trees.items():
            tree.move(spinner.pid, dirs[root])
        yield V1Pod(prefix, uid, cid, spinner, dirs, empty)


def _config(tmp_path: Path, kubeconfig: str, port: int) -> str:
    return (
        f"kpod:\n  profile: comprehensive\n  poll_interval: 500ms\n  node_name: {NODE}\n"
        "  discovery: {mode: informer}\n  filter: {exclude_namespaces: []}\n"
        f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}', wait_for_sync: 5s}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
    )


@pytest.mark.parametrize("cgroup2", [True, False], ids=["cgroup2-without-kubepods", "no-cgroup2"])
def test_pods_only_in_v1(v1_pod: V1Pod, tmp_path: Path, cgroup2: bool) -> None:
    where = "no pod cgroups under the cgroup2 mount" if cgroup2 else "no cgroup2 mount"
    walked = mounts().v1["memory"]
    note = f"pods only in cgroup v1 ({where}"
    with FakeApiServer() as api:
        api.add_pod(make_pod(POD, namespace=NAMESPACE, node=NODE, uid=v1_pod.uid,
                             containers=[(CONTAINER, v1_pod.container_id)]))  # fmt: skip
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        port = free_port()
        config = _config(tmp_path, kubeconfig, port)
        (tmp_path / "check.yaml").write_text(config)
        prefix = v1_pod.namespace(cgroup2)

        command = [*prefix, sys.executable, "-m", "kpod.cli", "check", "--config", str(tmp_path / "check.yaml")]
        check = subprocess.run(command, capture_output=True, text=True, env=clean_env(), timeout=120)
        lines = check.stdout.splitlines()
        (cgroups_line,) = [line for line in lines if line.startswith("cgroups:")]
        assert note in cgroups_line and f"walking {walked})" in cgroups_line, check.stdout + check.stderr
        for receiver in EBPF_RECEIVERS:
            (line,) = [line for line in lines if line.strip().startswith(receiver + " ")]
            assert f"cannot run: {note}" in line, line
        (cpu_line,) = [line for line in lines if line.strip().startswith("cgroup_cpu ")]
        assert "ok: cpuacct.usage + cpu.stat (v1" in cpu_line, cpu_line

        agent = AgentProcess(config, tmp_path, port, prefix=prefix).start()
        try:
            agent.wait_ready(60)
            status = agent.status()
            assert note in status["cgroups"] and status["cgroups"].count(";") >= 1, status["cgroups"]
            for receiver in EBPF_RECEIVERS:
                state = status["receivers"][receiver]
                assert state["state"] == "unavailable" and state["reason"].startswith(note), state
            warnings = [line for line in agent.log().splitlines() if "WARNING" in line and "cgroups:" in line]
            assert len(warnings) == 1 and note in warnings[0], agent.log()[-3000:]

            # cgroup_cpu from the v1 controllers, against the kernel's own counters.
            v1_pod.spinner.go()
            assert v1_pod.spinner.readline(30) == "spun"
            wait_blocked(v1_pod.spinner.pid)  # waiting for its next line
            truth = settled(v1_pod.truth)
            assert truth["kpod_cpu_throttled_periods_total"] > 0, "the quota throttled the spinner"
            labels = {"namespace": NAMESPACE, "pod": POD, "container": CONTAINER}

            def seen() -> dict[str, float]:
                return {s.name: s.value for s in agent.metrics()
                        if s.name in truth and all(s.labels.get(k) == v for k, v in labels.items())}  # fmt: skip

            assert poll_until(lambda: _close(seen(), truth), timeout=20), (seen(), truth)
        finally:
            code = agent.stop()
        assert code == 0, agent.log()[-3000:]


def _close(got: dict[str, float], truth: dict[str, float]) -> bool:
    # Seconds went through a float division and the text exposition: equal to the nanosecond.
    return set(got) == set(truth) and all(abs(got[k] - truth[k]) < 1e-9 for k in truth)


# ----------------------------------------------------------------------------- the choice itself


def _mountinfo(lines: list[tuple[str, str, str]]) -> str:
    """mountinfo text: (mount point, fstype, super options) per line."""
    return "".join(f"{i} 1 0:{i} / {point} rw - {fstype} {fstype} {options}\n"
                   for i, (point, fstype, options) in enumerate(lines, start=30))  # fmt: skip


def test_the_pods_tree_is_cgroup2_when_it_holds_them(tmp_path: Path) -> None:
    unified, memory, cpu = tmp_path / "unified", tmp_path / "memory", tmp_path / "cpu"
    for directory in (unified / "kubepods.slice", memory / "kubepods.slice", cpu):
        directory.mkdir(parents=True)
    both = [(str(unified), "cgroup2", "rw"), (str(memory), "cgroup", "rw,memory"), (str(cpu), "cgroup", "rw,cpu")]
    (unified / "kubepods.slice").rmdir()
    # One v1 hierarchy with a kubepods tree is not a v1 node: the kubelet makes it in cpu and memory.
    assert choose_hierarchy("/nonexistent", _mountinfo(both)).root == str(unified)
    (unified / "kubepods.slice").mkdir()
    (cpu / "kubepods.slice").mkdir()
    text = _mountinfo(both)
    tree = choose_hierarchy("/nonexistent", text)
    assert (tree.root, tree.ebpf_unattributable) == (str(unified), "")
    (unified / "kubepods.slice").rmdir()
    tree = choose_hierarchy("/nonexistent", text)
    assert tree.root == str(memory) and tree.ebpf_unattributable.startswith(
        f"pods only in cgroup v1 (no pod cgroups under the cgroup2 mount {unified}; walking {memory})"
    )
    assert choose_hierarchy("/nonexistent", text, pods_only=False).root == str(unified), "local mode: any cgroup2"
    (memory / "kubepods.slice").rmdir()
    assert choose_hierarchy("/nonexistent", text).root == str(unified), "no v1 pods (cpu alone): cgroup2"
    v1_only = _mountinfo([(str(memory), "cgroup", "rw,memory")])
    assert choose_hierarchy("/nonexistent", v1_only).ebpf_unattributable.startswith(
        "pods only in cgroup v1 (no cgroup2 mount"
    )
    with pytest.raises(FileNotFoundError, match="no cgroup mount"):
        choose_hierarchy("/nonexistent", "")
