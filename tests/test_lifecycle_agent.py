"""Containers that die, restart and live briefly, against the agent as its own process.

Informer mode against tests/fake_apiserver.py, real kubepods-shaped cgroups, real processes
that enter their container cgroup themselves (as a runtime starts them) and whose cgroup is
removed the moment they exit (as runc removes a dead container's cgroup).  Ground truth: the
bytes the workload sent, the calls it made, the kernel's own OOM kill counter.

- OOM kill, then the container's cgroup removed at once, with the default 30 s poll: the
  container's kpod_mem_oom_kills_total is 0 before and exactly 1 after, under its pod and
  container (v1 memory limit on a hybrid host, memory.max on pure cgroup2).
- A container created, used and removed between two cycles: its exact TCP bytes and
  syscalls under its pod and container.
- A restart (same container name, new cgroup): counters never decrease within the run, also
  after the old cgroup is let go.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_proc import AgentProcess, Sample, free_port
from fake_apiserver import FakeApiServer, make_pod
from kernel_util import (
    KUBELET_CONTROLLERS,
    ODD_BYTES,
    CgroupTree,
    Pod,
    cgroup2_root,
    cgroup_tree,
    kernel_test,
    mounts,
    pure_cgroup2_memory,
    uncached_file,
)

pytestmark = kernel_test

NODE = "lifecycle-node"
NAMESPACE = "life"
RECEIVERS = ("memory", "syscall", "net_tcp", "cpu_sched", "cgroup_cpu")


def agent_config(kubeconfig: str, port: int, poll: str, retention: str = "2m") -> str:
    receivers = ", ".join(RECEIVERS)
    return (
        f"kpod: {{profile: custom, poll_interval: {poll}, node_name: {NODE}, discovery: {{mode: informer}},"
        f" cgroup: {{root: {cgroup2_root()}, gone_retention: {retention}}}, filter: {{exclude_namespaces: []}},"
        f" syscall: {{tracked_syscalls: [getppid]}}}}\n"
        "receivers: {memory: {}, syscall: {}, net_tcp: {rtt: false}, cpu_sched: {},"
        " cgroup_cpu: {}}\n"
        f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}', backoff_initial: 200ms, backoff_max: 2s}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        f"service: {{pipelines: {{metrics: {{receivers: [{receivers}], processors: [k8sattributes],"
        " exporters: [prometheus]}}}\n"
    )


@contextlib.contextmanager
def running(tmp_path: Path, poll: str, retention: str = "2m") -> Iterator[tuple[AgentProcess, FakeApiServer]]:
    api = FakeApiServer().start()
    port = free_port()
    agent = AgentProcess(agent_config(api.write_kubeconfig(str(tmp_path / "kubeconfig")), port, poll, retention),
                         tmp_path, port)  # fmt: skip
    try:
        agent.start()
        agent.wait_ready(240)  # generous: five BPF objects verified under qemu TCG on a busy host
        yield agent, api
    finally:
        agent.stop()
        api.stop()


def container_hex(pod: Pod) -> str:
    return pod.container_dir.name.removeprefix("cri-containerd-").removesuffix(".scope")


def new_container(tree: CgroupTree, pod: Pod) -> Pod:
    """Another container cgroup in the same pod (a restart's new instance, or a Job's)."""
    scope = f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
    path = tree.mkdir(str((pod.pod_dir / scope).relative_to(tree.root)))
    return Pod(pod.uid, pod.pod_dir, path)


def remove_when_empty(tree: CgroupTree, cgroup: Path, timeout_s: float = 10.0) -> None:
    """rmdir the moment the last task has left (what runc does for a dead container)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            cgroup.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            assert time.monotonic() < deadline, f"{cgroup} stayed busy"
            time.sleep(0.005)
    if cgroup in tree.created:
        tree.created.remove(cgroup)


def run_in(cgroup: Path, code: str, *extra: Path) -> subprocess.Popen[bytes]:
    """A process that enters `cgroup` (and `extra` v1 cgroups) first, then runs `code`."""
    enter = " && ".join(f"echo $$ > {c}/cgroup.procs" for c in (cgroup, *extra))
    return subprocess.Popen(["/bin/sh", "-c", f"{enter} && exec {sys.executable} -c \"$0\"", code])


def series(samples: list[Sample], name: str, pod: str, container: str, **labels: str) -> list[float]:
    return [
        s.value
        for s in samples
        if s.name == name
        and s.labels.get("namespace") == NAMESPACE
        and s.labels.get("pod") == pod
        and s.labels.get("container") == container
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]


# --- OOM kill, then the cgroup removed at once, default poll ------------------------------------

HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"


def test_oom_kill_of_a_container_removed_at_once_counts_one_with_the_default_poll(tmp_path: Path) -> None:
    v1_memory = mounts().v1.get("memory")
    pure = pure_cgroup2_memory()
    if not v1_memory and not pure:
        pytest.skip("no memory controller to limit a cgroup with (neither v1 nor on cgroup2)")
    controllers = KUBELET_CONTROLLERS if pure else ()
    with cgroup_tree(controllers=controllers) as tree, cgroup_tree(v1_memory or cgroup2_root()) as v1:
        pod = tree.pod()
        memcg: Path | None = None
        if pure:
            (pod.container_dir / "memory.max").write_text(str(64 << 20))
            swap = pod.container_dir / "memory.swap.max"
            if swap.exists():
                swap.write_text("0")
        else:
            memcg = v1.mkdir(f"kpod-test-oom-{uuid.uuid4().hex[:12]}")
            (memcg / "memory.limit_in_bytes").write_text(str(64 << 20))
        with running(tmp_path, poll="30s") as (agent, api):
            api.add_pod(make_pod("oom-1", namespace=NAMESPACE, node=NODE, uid=pod.uid,
                                 containers=[("app", container_hex(pod))]))  # fmt: skip
            # The series exists at 0 first: increase() sees the kill.  The pod arrived after the
            # first cycle: wait for the next (up to the 30 s poll).
            agent.wait_until(
                lambda: series(agent.metrics(), "kpod_mem_oom_kills_total", "oom-1", "app") == [0.0], 45, "a 0 series"
            )
            done = agent.cycle_mark().cycles
            hog = run_in(pod.container_dir, HOG, *([memcg] if memcg else []))
            assert hog.wait(120) == -9, "the hog should be OOM-killed"
            remove_when_empty(tree, pod.container_dir)  # at once, as runc does
            if memcg is not None:
                remove_when_empty(v1, memcg)
            between = agent.cycle_mark().cycles == done
            assert between, "a cycle ran between the kill and the removal: not the case tested"
            agent.wait_cycles(1, 45)
            samples = agent.metrics()
            assert series(samples, "kpod_mem_oom_kills_total", "oom-1", "app") == [1.0]
            assert not [s for s in samples if s.name == "kpod_mem_oom_kills_total" and s.value
                        and s.labels.get("pod") != "oom-1" and s.labels.get("namespace") == NAMESPACE]  # fmt: skip


# --- a container that lives between two cycles --------------------------------------------------

SENDS_AND_CALLS = """
import mmap, os, socket, sys, time
port, nbytes, calls = (int(x) for x in sys.argv[1:4])
c = socket.create_connection(('127.0.0.1', port))
data = b'j' * nbytes
sent = 0
while sent < nbytes:
    sent += c.send(data[sent:])
c.close()
for _ in range(calls):
    os.getppid()
# Major faults: every page of a file not in the page cache, no read-ahead (MADV_RANDOM).
f = open(sys.argv[4], 'rb')
m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
m.madvise(mmap.MADV_RANDOM)
total = sum(m[off] for off in range(0, len(m), 4096))
# Voluntary context switches, each a wake-up that waits in the run queue.
for _ in range(SLEEPS):
    time.sleep(0.0002)
"""

CALLS = 777
SLEEPS = 500
FAULT_FILE = 4 << 20  # 1024 pages


class Listener:
    """A TCP listener in the test process (not in any pod): counts what it receives."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.received: list[int] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            total = 0
            with conn:
                while chunk := conn.recv(65536):
                    total += len(chunk)
            self.received.append(total)

    def close(self) -> None:
        self.sock.close()


def run_job(cgroup: Path, port: int, nbytes: int, calls: int, fault_file: Path) -> None:
    code = (
        SENDS_AND_CALLS.replace("sys.argv[1:4]", f"[{port}, {nbytes}, {calls}]")
        .replace("sys.argv[4]", repr(str(fault_file)))
        .replace("SLEEPS", str(SLEEPS))
    )
    proc = run_in(cgroup, code)
    assert proc.wait(60) == 0


def test_a_container_born_and_removed_between_two_cycles_is_counted_exactly(tmp_path: Path) -> None:
    listener = Listener()
    try:
        with cgroup_tree() as tree, running(tmp_path, poll="10s") as (agent, api):
            pod = tree.pod()  # the pod's first container: a long-lived "app" with no work
            api.add_pod(make_pod("job-1", namespace=NAMESPACE, node=NODE, uid=pod.uid,
                                 containers=[("app", container_hex(pod))]))  # fmt: skip
            for _attempt in range(3):
                # Right after a cycle's end: the job has the rest of the poll interval to live and
                # go (the next cycle starts one interval after that one started).
                done = agent.wait_cycles(1, 30).cycles
                job = new_container(tree, pod)
                status = {"name": "job", "containerID": f"containerd://{container_hex(job)}", "ready": False,
                          "restartCount": 0, "state": {"terminated": {"exitCode": 0}}}  # fmt: skip
                api.update_pod(pod.uid, lambda p, s=status: p["status"]["containerStatuses"].append(s))
                with uncached_file(FAULT_FILE) as fault_file:
                    run_job(job.container_dir, listener.port, ODD_BYTES, CALLS, fault_file)
                remove_when_empty(tree, job.container_dir)
                if agent.cycle_mark().cycles == done:
                    break  # no cycle ended while the job lived: born, worked and removed between two
            else:
                pytest.fail("a cycle kept running while the job lived")
            # The mark counts cycles that ended: the next one may have begun before the removal and
            # still be running (on a loaded node a cycle takes seconds), its counts read before the
            # job's sends.  Cycles run one at a time, so the second to end from now began after
            # the removal: its exposition holds what the job did, all of it.
            agent.wait_cycles(2, 45)
            agent.wait_until(lambda: len(listener.received) == _attempt + 1, 10, "the listener saw the connection")
            assert listener.received[-1] == ODD_BYTES, "the listener got everything"
            samples = agent.metrics()
            assert series(samples, "kpod_net_tcp_bytes_sent_total", "job-1", "job") == [ODD_BYTES]
            assert series(samples, "kpod_syscall_count_total", "job-1", "job", syscall="getppid") == [CALLS]
            assert series(samples, "kpod_syscall_errors_total", "job-1", "job", syscall="getppid") == [0.0]
            # Its switches, run-queue waits and major faults too: at least one per sleep and
            # per page (its start-up and exit add a few, nothing takes any away).
            (switches,) = series(samples, "kpod_cpu_context_switches_total", "job-1", "job")
            assert switches >= SLEEPS
            (waits,) = series(samples, "kpod_cpu_runqueue_latency_seconds_count", "job-1", "job")
            assert waits >= SLEEPS
            (faults,) = series(samples, "kpod_mem_major_page_faults_total", "job-1", "job")
            assert faults >= FAULT_FILE // 4096
    finally:
        listener.close()


# --- a restart: the same container name in a new cgroup ----------------------------------------

WORK = """
import os, time
for _ in range(300):
    os.getppid()
    time.sleep(0.005)
"""

MONOTONIC = ("kpod_syscall_count_total", "kpod_cpu_context_switches_total", "kpod_cpu_usage_seconds_total")


def test_a_restarted_containers_counters_never_decrease(tmp_path: Path) -> None:
    """Instance 1 makes 300 getppid() and dies (its cgroup removed at once); instance 2 starts
    in a new cgroup under the same name.  Scraped every cycle (poll 1 s) until the old cgroup
    is let go (retention 3 s) and beyond: no series of {pod, container="app"} ever decreases,
    and the syscall count ends at exactly 600."""
    with cgroup_tree() as tree, running(tmp_path, poll="1s", retention="3s") as (agent, api):
        first = tree.pod()
        api.add_pod(make_pod("web-1", namespace=NAMESPACE, node=NODE, uid=first.uid,
                             containers=[("app", container_hex(first))]))  # fmt: skip
        history: dict[tuple[str, str], list[float]] = {}

        def scrape() -> None:
            for s in agent.metrics():
                if s.labels.get("pod") == "web-1" and s.labels.get("container") == "app" and s.name in MONOTONIC:
                    history.setdefault((s.name, s.labels.get("syscall", "")), []).append(s.value)

        agent.wait_cycles(1, 20)
        worker = run_in(first.container_dir, WORK)
        while worker.poll() is None:
            scrape()
            time.sleep(0.3)
        assert worker.returncode == 0
        remove_when_empty(tree, first.container_dir)
        second = new_container(tree, first)

        def restarted(pod: dict) -> None:
            status = pod["status"]["containerStatuses"][0]
            status["lastState"] = {"terminated": {"containerID": status["containerID"], "exitCode": 137}}
            status["containerID"] = f"containerd://{container_hex(second)}"
            status["restartCount"] = 1

        api.update_pod(first.uid, restarted)
        worker = run_in(second.container_dir, WORK)
        while worker.poll() is None:
            scrape()
            time.sleep(0.3)
        assert worker.returncode == 0
        end = time.monotonic() + 8  # past the old cgroup's retention (3 s) and a few cycles
        while time.monotonic() < end:
            scrape()
            time.sleep(0.3)
        for key, values in history.items():
            drops = [(a, b) for a, b in itertools.pairwise(values) if b < a]
            assert not drops, f"{key} went back: {drops[:3]} in {values}"
        assert history[("kpod_syscall_count_total", "getppid")][-1] == 600
        assert ("kpod_cpu_context_switches_total", "") in history

