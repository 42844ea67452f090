"""Faults, injected into the real agent process: signals, restarts, failing receivers, full BPF
maps, an API server outage.

Every test runs `python -m kpod.cli run` as a user would (tests/agent_proc.py) and cleans up
what it made (the agent by PID, workloads by PID, cgroups it created), also on failure.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import time
import uuid
from pathlib import Path

import pytest
from agent_proc import (
    AgentProcess,
    bpf_ids_of,
    full_profile,
    pinned_files,
    running_agent,
    still_present,
)
from fake_apiserver import FakeApiServer, make_pod
from helpers import free_port, poll_until
from kernel_util import Workload, cgroup2_root, cgroup_tree, context, kernel_test, workloads

pytestmark = kernel_test

BUSY = "while True:\n    time.sleep(0.002)\n"  # context switches and a little CPU, forever
EBPF_RECEIVERS = ("cpu_sched", "memory", "net_tcp", "syscall")


def local_config(port: int, profile: str, poll: str = "300ms", extra_kpod: str = "", tail: str = "") -> str:
    return (
        f"kpod: {{profile: {profile}, poll_interval: {poll}, discovery: {{mode: local}}, "
        f"cgroup: {{root: {cgroup2_root()}}}{extra_kpod}}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n{tail}"
    )


def wait_for_bpf(agent: AgentProcess) -> None:
    """Until every eBPF receiver of the profile is running (its programs attached)."""

    def loaded() -> bool:
        receivers = agent.status().get("receivers", {})
        ebpf = {rid: r for rid, r in receivers.items() if rid in EBPF_RECEIVERS}
        return bool(ebpf) and all(r["state"] == "running" for r in ebpf.values())

    agent.wait_until(loaded, 60, "running its eBPF receivers")


# ------------------------------------------------------------------------------ signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_signal_leaves_no_bpf_program_map_or_link(tmp_path: Path, sig: int) -> None:
    """Whatever way the agent ends, every BPF object it held is gone and nothing was pinned."""
    pinned_before = pinned_files()
    port = free_port()
    with running_agent(local_config(port, full_profile()), tmp_path, port) as agent:
        agent.wait_ready()
        wait_for_bpf(agent)
        ours = bpf_ids_of(agent.pid)
        assert ours.progs and ours.maps and ours.links, ours
        code = agent.stop(sig)
    if sig == signal.SIGTERM:
        assert code == 0, agent.log()[-2000:]
        assert "Traceback" not in agent.log()
    else:
        assert code == -signal.SIGKILL
    left = still_present(ours)
    assert not left, f"still loaded after {signal.Signals(sig).name}: {left}"
    assert pinned_files() == pinned_before


# ------------------------------------------------------------------------------ restart


def series_of(samples: list, name: str, container: str) -> float | None:
    values = [s.value for s in samples if s.name == name and s.labels.get("container") == container]
    return sum(values) if values else None


def test_restart_counters_reset_or_continue_and_never_go_backwards(tmp_path: Path) -> None:
    """Within a run every counter only grows.  After a restart, counters the kernel keeps
    (cpu.stat) continue from the kernel's value; counters our BPF maps keep start again from
    zero: a plain counter reset for Prometheus, never a negative rate within a run."""
    port = free_port()
    with cgroup_tree() as tree, workloads() as procs:
        name = f"kpodfault-{uuid.uuid4().hex[:8]}"
        cgroup = tree.mkdir(name)
        worker = Workload(BUSY)
        procs.append(worker)
        tree.move(worker.pid, cgroup)
        worker.go()
        config = local_config(port, "minimal")
        runs: list[list[dict[tuple[str, tuple], float]]] = []
        for _ in range(2):
            with running_agent(config, tmp_path, port) as agent:
                agent.wait_ready()
                wait_for_bpf(agent)
                scrapes = []
                for _ in range(6):
                    time.sleep(0.35)
                    scrapes.append({
                        (s.name, tuple(sorted(s.labels.items()))): s.value
                        for s in agent.metrics() if s.name.endswith(("_total", "_count", "_bucket", "_sum"))
                    })  # fmt: skip
                assert agent.stop() == 0
            runs.append(scrapes)
        for scrapes in runs:
            for earlier, later in itertools.pairwise(scrapes):
                backwards = {k: (earlier[k], later[k]) for k in earlier.keys() & later.keys() if later[k] < earlier[k]}
                assert not backwards, f"counters went backwards within a run: {list(backwards.items())[:5]}"
        key_cpu = ("kpod_cpu_usage_seconds_total", name)
        key_switches = ("kpod_cpu_context_switches_total", name)

        def value(scrape: dict, metric: str, container: str) -> float:
            found = [v for (n, labels), v in scrape.items() if n == metric and ("container", container) in labels]
            assert found, f"no {metric} for {container}"
            return sum(found)

        first_end, second_start = runs[0][-1], runs[1][0]
        # cpu.stat is cumulative in the kernel: the second run starts where the first ended.
        assert value(second_start, *key_cpu) >= value(first_end, *key_cpu)
        # The BPF map is new: the second run counts from zero, so its first value is below
        # the first run's last (the workload switches ~500 times a second).
        assert value(second_start, *key_switches) < value(first_end, *key_switches)


# ------------------------------------------------------------------------------ failing receivers


def test_failing_hanging_and_unloadable_receivers_are_isolated(tmp_path: Path, test_plugin: Path) -> None:
    """In the real process: a receiver that raises, one that hangs past the cycle timeout and
    an eBPF receiver whose object does not load are reported (self-metrics, /debug/status),
    and the others keep collecting."""
    program_dir = tmp_path / "bpf"
    program_dir.mkdir()
    from kpod.kernel.ebpf import object_path

    for name in ("mem",):
        shutil.copy(object_path(name), program_dir / f"{name}.bpf.o")
    (program_dir / "cpu_sched.bpf.o").write_bytes(b"\x7fELF not really an object")
    port = free_port()
    config = (
        f"kpod: {{profile: custom, poll_interval: 300ms, cycle_timeout: 1s, discovery: {{mode: local}},"
        f" cgroup: {{root: {cgroup2_root()}}}, bpf: {{program_dir: '{program_dir}'}}}}\n"
        "receivers:\n"
        "  constant/ok: {value: 7}\n"
        "  constant/raises: {fail_collect: true}\n"
        "  constant/hangs: {hang_collect_s: 30}\n"
        "  cpu_sched: {}\n  memory: {}\n  cgroup_cpu: {}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        "service:\n  pipelines:\n    metrics:\n"
        "      receivers: [constant/ok, constant/raises, constant/hangs, cpu_sched, memory, cgroup_cpu]\n"
        "      exporters: [prometheus]\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPOD_")}
    env["PYTHONPATH"] = str(test_plugin)
    with running_agent(config, tmp_path, port, env=env) as agent:
        agent.wait_ready()

        def reported() -> bool:
            receivers = agent.status()["receivers"]
            return (
                receivers["constant/hangs"]["state"] == "failing"
                and receivers["constant/raises"]["state"] == "failing"
                and receivers["cpu_sched"]["state"] == "unavailable"
            )

        agent.wait_until(reported, 30, "reporting the three broken receivers")
        status = agent.status()["receivers"]
        samples = agent.metrics()
        assert agent.alive()
    assert "collect failed: RuntimeError: boom" in status["constant/raises"]["reason"]
    assert "timed out after 1s" in status["constant/hangs"]["reason"]
    reason = status["cpu_sched"]["reason"]
    assert "cpu_sched.bpf.o" in reason and "\n" not in reason, reason
    for healthy in ("constant/ok", "memory", "cgroup_cpu"):
        assert status[healthy]["state"] == "running", (healthy, status[healthy])
    errors = {s.labels["receiver"]: s.value for s in samples if s.name == "kpod_collection_errors_total"}
    assert errors["constant/raises"] >= 1 and errors["constant/hangs"] >= 1 and errors["cpu_sched"] >= 1
    assert errors["constant/ok"] == 0 and errors["cgroup_cpu"] == 0
    names = {s.name for s in samples}
    assert "kpod_cpu_usage_seconds_total" in names  # cgroup_cpu kept collecting
    assert any(s.name == "test_constant_total" and s.labels.get("source") == "constant/ok" for s in samples)
    assert "kpod_cpu_context_switches_total" not in names  # nothing from the receiver that did not load


# ------------------------------------------------------------------------------ full BPF maps


def test_full_map_counts_errors_then_recovers_after_the_cgroups_go() -> None:
    """A map with room for 4 cgroups, 8 busy pods: inserts fail and are counted, nothing
    crashes.  Once the pods are gone their entries are deleted, and a new pod gets an entry."""
    from kernel_util import CgroupTree
    from kpod.receivers.bpf_maps import BpfMapsReceiver
    from kpod.receivers.cpu_sched import CpuSchedReceiver

    from kpod.cgroup.index import CgroupIndex
    from kpod.component import EmptyConfig

    capacity = 4
    ctx = context("cpu_sched", map_max_entries=capacity)
    receiver = CpuSchedReceiver(ctx, EmptyConfig())
    maps = BpfMapsReceiver(context("bpf_maps"), EmptyConfig())

    def map_state() -> tuple[float, float]:
        batch = maps.collect()
        values = {p.metric.name: p.value for p in batch if dict(p.attributes).get("map") == "sched_cgroups"}
        return values["kpod.bpf.map.entries"], values["kpod.bpf.map.update.errors.total"]

    def collect() -> set[int]:
        ctx.cgroups.refresh()
        batch = receiver.collect()
        return {p.cgroup.id for p in batch if p.cgroup is not None}

    def keys() -> set[int]:
        assert receiver.loaded is not None
        table = receiver.loaded.obj.maps["sched_cgroups"]
        return {int.from_bytes(k[:8], "little") for k in table.keys()}  # noqa: SIM118 - a BPF map

    with cgroup_tree() as outer, workloads() as procs:
        # A private node: the index sees only our kubepods tree, so entries of every other
        # cgroup (the host's services, other tests' pods) do not resolve and are deleted like
        # those of gone pods; only our pods keep their slots.
        base = outer.mkdir(f"kpodfault-{uuid.uuid4().hex[:8]}")
        tree = CgroupTree(base)
        ctx.cgroups = CgroupIndex(str(base), scope="kubepods")
        receiver.start()
        try:
            pods = [tree.pod() for _ in range(2 * capacity)]
            # This node's kubepods is not at the top of the hierarchy, where the kernel would
            # classify new pods itself: the index's walk tells it (Kubernetes modes count pods only).
            ctx.cgroups.refresh()
            for pod in pods:
                w = Workload(BUSY)
                procs.append(w)
                tree.move(w.pid, pod.container_dir)
                w.go()
            # Until a fifth pod's task has been scheduled (a busy machine may take a while to
            # run all eight): then the map is full and an insert has failed.
            poll_until(lambda: map_state()[1] > 0, timeout=30, interval=0.05)
            entries, errors = map_state()
            assert entries == capacity and errors > 0
            collect()  # nothing crashes with a full map
            gone = {pod.container_id for pod in pods}
            for w in list(procs):
                w.stop()
            procs.clear()
            ctx.cgroups.gone_retention_s = 0.0  # gone cgroups are let go at once here
            tree.cleanup()
            for _ in range(3):  # a miss is kept one cycle, then deleted
                collect()
            assert not keys() & gone
            # Room again: a new pod is counted.
            pod = tree.pod()
            w = Workload(BUSY)
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            w.go()
            deadline = time.monotonic() + 20
            while pod.container_id not in keys() and time.monotonic() < deadline:
                collect()
                time.sleep(0.02)
            assert pod.container_id in keys()
            assert pod.container_id in collect()
        finally:
            receiver.shutdown()
            for w in procs:
                w.stop()
            tree.cleanup()


# ------------------------------------------------------------------------------ API server outage

OUTAGE_S = float(os.environ.get("API_OUTAGE_S", "6"))


def scope_id(container_dir: Path) -> str:
    return container_dir.name.removeprefix("cri-containerd-").removesuffix(".scope")


def test_api_server_outage_keeps_labels_and_catches_up(tmp_path: Path) -> None:
    """The API server goes away for API_OUTAGE_S seconds (6 in `make test`, 120 in `make soak`):
    the last known labels are served all along, the same agent process resumes the watch, and
    a pod created during the outage appears after it."""
    root = cgroup2_root()
    port = free_port()
    with FakeApiServer() as api, cgroup_tree() as tree, workloads() as procs:
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))

        def pod_with_cgroup(name: str) -> None:
            pod = tree.pod()
            w = Workload(BUSY)
            procs.append(w)
            tree.move(w.pid, pod.container_dir)
            w.go()
            api.add_pod(make_pod(name, namespace="outage", node="node-a", uid=pod.uid,
                                 containers=[("app", scope_id(pod.container_dir))]))  # fmt: skip

        pod_with_cgroup("before-0")
        config = (
            "kpod: {profile: custom, poll_interval: 1s, node_name: node-a, discovery: {mode: informer},"
            f" cgroup: {{root: {root}}}, filter: {{exclude_namespaces: []}}}}\n"
            "receivers:\n  cgroup_cpu: {}\n"
            f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}', backoff_initial: 200ms, backoff_max: 2s,"
            " request_timeout: 2s, watch_timeout: 30s}\n"
            f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
            "service:\n  pipelines:\n    metrics: {receivers: [cgroup_cpu], processors: [k8sattributes],"
            " exporters: [prometheus]}\n"
        )

        def pods_seen(agent: AgentProcess) -> set[str]:
            return {s.labels.get("pod", "") for s in agent.metrics() if s.name == "kpod_cpu_usage_seconds_total"}

        with running_agent(config, tmp_path, port) as agent:
            agent.wait_ready()
            agent.wait_until(lambda: "before-0" in pods_seen(agent), 20, "labelling before-0")
            pid = agent.pid
            api.stop()
            began = time.monotonic()
            pod_with_cgroup("during-0")  # the cgroup exists now; the API event waits in history
            while time.monotonic() - began < OUTAGE_S:
                seen = pods_seen(agent)
                assert "before-0" in seen, "labels lost during the outage"
                assert "during-0" not in seen
                time.sleep(min(1.0, OUTAGE_S / 4))
            api.start()
            agent.wait_until(lambda: "during-0" in pods_seen(agent), 60, "labelling the pod made during the outage")
            assert "before-0" in pods_seen(agent)
            assert agent.pid == pid and agent.alive()
            errors = [s for s in agent.metrics() if s.name == "kpod_collection_errors_total" and s.value]
            assert not errors, errors
        # The informer watched again after the outage (resumed or relisted: the server decides).
        resumed = [q for path, q in api.requests if q.get("watch") == "true"]
        assert len(resumed) >= 2
