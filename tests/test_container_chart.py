"""The built image run the way the chart runs it, against pods made by runc.

The chart is rendered by Helm's engine (scripts/render_manifests.render) and the agent container
of the rendered DaemonSet becomes `podman run` flags in code (tests/engine.py ChartRun): its
capabilities (drop ALL, add the four), read-only root, hostPID, every hostPath mount with its
readOnly flag, the ConfigMap as the config file, NODE_NAME and NODE_IP, the seccomp profile,
the limits.  What the kubelet and the CNI add is emulated: a pod network namespace with a veth
to the node, KUBERNETES_SERVICE_HOST/PORT, and the ServiceAccount token and CA at
/var/run/secrets/kubernetes.io/serviceaccount.  The API server is tests/fake_apiserver.py,
serving HTTPS on the node's address with that CA; the agent's pod discovery is the chart's
default (informer).

Values given to the chart: a 1 s poll, the comprehensive profile, getppid added to the tracked
syscalls (the workload's marker), and `seccompProfile: Localhost` with the profile the chart ships
(files/seccomp/kpod-metrics.json): podman's RuntimeDefault is containers/common's profile (as
CRI-O's), which blocks bpf() for a container without CAP_SYS_ADMIN (test_seccomp_runtime_default
shows it).

Workload pods are made by runc (tests/runc_pods.py) with the kubelet's cgroup paths; ground
truth comes from the kernel or from what the workloads did, never from the agent:

    TCP bytes        exactly what send()/recv() returned, between two pods each in its own netns
    interface bytes  the pod's eth0 counters, and those of the veth peer in the other pod
    filesystem       a 64 MiB tmpfs at /data holding one 5 MiB file: usage is 1280 pages
    syscalls         a static C program's own getppid/read calls, errors included
    major faults     /proc/<pid>/stat majflt of the faulting process
    OOM kill         the memcg's own oom_kill counter

Everything made here is removed on the way out, also after a failure: the agent container, the
runc containers and pod cgroups, the network namespaces and veths, the API server.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import ssl
import textwrap
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from agent_proc import CycleMark, Sample, parse_exposition, wait_cycles
from engine import (
    BuiltImage,
    ChartNotEmulated,
    ChartRun,
    Node,
    cgroup_parent,
    container_logs,
    container_pid,
    engine_skip_reason,
    podman,
    remove_container,
    unique_name,
)
from fake_apiserver import FakeApiServer
from fake_kubelet import make_certs
from helpers import poll_until
from kernel_util import (
    FAULT_FILE_SIZE,
    M_FAIL,
    N_OK,
    ODD_BYTES,
    RECEIVER,
    SENDER,
    SYSCALL_WORKLOAD_C,
    Z_EOF,
    Workload,
    compile_c,
    faults_code,
    kernel_skip_reason,
    mounts,
    settled,
    uncached_file,
)
from prometheus_server import MEMORY_HOG, oom_events
from runc_pods import (
    HostLink,
    Mount,
    RuncContainer,
    RuncPod,
    RuncRuntime,
    host_linked_netns,
    link_pods,
    net_dev,
    runc_runtime,
)

from kpod.cgroup.parsers import parse_cpu_stat
from kpod.kernel.syscalls import default_tracked
from scripts.render_manifests import objects, render

_SKIP = engine_skip_reason() or kernel_skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.kernel, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

NODE = "node-a"
NAMESPACE = "shop"
CHART_VALUES: dict[str, Any] = {
    "config": {
        "pollInterval": 1000,
        "profile": "comprehensive",
        "syscall": {"trackedSyscalls": [*default_tracked(), "getppid"]},
    },
    "seccompProfile": {"type": "Localhost", "localhostProfile": "kpod-metrics.json"},
}
# The image the chart would pull: the session's, under this name (image.repository is required).
IMAGE_VALUES = {"image": {"repository": "localhost/kpod-metrics"}}


def chart(values: dict[str, Any]) -> list[dict[str, Any]]:
    """The chart's objects as Helm's engine renders them with `values`."""
    return objects(render({**IMAGE_VALUES, **values}))


EBPF_RECEIVERS = ("cpu_sched", "memory", "net_tcp", "syscall", "bpf_maps")
DATA_BYTES = 5 << 20
TMPFS_BYTES = 64 << 20


# ----------------------------------------------------------------------------- the node


@dataclass
class ChartNode:
    """The agent container as the chart runs it, on a node whose pods runc makes."""

    api: FakeApiServer
    link: HostLink
    runtime: RuncRuntime
    run: ChartRun
    container: str
    workdir: Path

    @property
    def url(self) -> str:
        return f"http://{self.link.pod_ip}:{self.run.metrics_port}"

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def metrics(self) -> list[Sample]:
        status, body = self.get("/metrics")
        assert status == 200, body[:500]
        return parse_exposition(body.decode())

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/debug/status")[1])

    def logs(self) -> str:
        return container_logs(self.container)[-4000:]

    def wait_cycles(self, count: int = 2, timeout: float = 30.0) -> CycleMark:
        """Until `count` more collection cycles have completed (the newest then started after now)."""
        return wait_cycles(lambda: self.get("/metrics")[1].decode(), count, timeout, self.logs)

    def value(self, name: str, **labels: str) -> float | None:
        found = [
            s.value for s in self.metrics() if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]
        assert len(found) <= 1, f"{name}{labels}: {len(found)} series"
        return found[0] if found else None

    def explain(self, receiver: str, pod: str) -> str:
        """What the agent says of a receiver and a pod, for a failure message: the pod's series of
        that receiver (any labels), the receiver's /debug/status and the end of the agent's log."""
        prefix = {"filesystem": "kpod_fs_"}.get(receiver, f"kpod_{receiver}_")
        series = [(s.name, s.labels, s.value) for s in self.metrics() if s.name.startswith(prefix)
                  and s.labels.get("pod") == pod]  # fmt: skip
        status = self.status()["receivers"].get(receiver)
        return f"series {series}; status {json.dumps(status)}; log {self.logs()}"

    def wait_value(self, name: str, done: Callable[[float | None], bool], timeout: float = 30.0,
                   **labels: str) -> float | None:  # fmt: skip
        """Poll until done(value); returns the last value either way (the caller asserts)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.value(name, **labels)
            if done(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.25)

    def add_pod(self, pod: RuncPod) -> None:
        self.api.add_pod(pod.api_object())

    @contextlib.contextmanager
    def frozen_between_cycles(self, margin_s: float = 0.25, attempts: int = 10) -> Iterator[None]:
        """The agent container paused (freezer) while no collection runs: whatever the block
        does happens between two cycles, however long it takes.

        The agent starts its cycles on a grid (kpod/agent.py: one poll interval apart from the
        first; a late cycle skips ticks, keeping the phase), so the next cycle starts at the
        first tick after the last one's end.  The end is exact on /metrics (wait_cycles); the
        phase is the earliest receiver start of a cycle (/debug/status, of any cycle: its cache
        does not matter), a few ms after its tick, which `margin_s` covers.  The pause counts
        only if `podman pause` returned more than `margin_s` before the next tick; else the
        agent is let go and the next cycle's end tried."""
        poll_s = CHART_VALUES["config"]["pollInterval"] / 1000
        tick = 0.0
        slack: list[float] = []
        for _ in range(attempts):
            tick = self._earliest_tick(tick, poll_s)
            ended = self.wait_cycles(1).ended_unix
            next_start = tick + math.ceil((ended - tick) / poll_s) * poll_s
            podman("pause", self.container)
            slack.append(round(next_start - time.time(), 3))
            if slack[-1] > margin_s:
                break
            podman("unpause", self.container)
        else:
            raise AssertionError(f"could not pause the agent {margin_s} s before its next cycle (time to the next "
                                 f"cycle once paused, each try: {slack}): {self.logs()}")  # fmt: skip
        try:
            yield
        finally:
            podman("unpause", self.container)

    def _earliest_tick(self, tick: float, poll_s: float) -> float:
        """A moment of the agent's cycle grid: the earliest receiver start of the cycle in
        /debug/status, or `tick` if that one was earlier in the grid's phase (0: none yet)."""
        ran = [r for r in self.status()["receivers"].values() if r["last_collect_unix"]]
        began = min(r["last_collect_unix"] - r["last_duration_seconds"] for r in ran)
        if not tick:
            return began
        offset = (began - tick + poll_s / 2) % poll_s - poll_s / 2  # in (-poll/2, poll/2]
        return tick + min(offset, 0.0)


def service_account(directory: Path, token: str, ca_file: str) -> Path:
    """The projected volume the kubelet mounts (token, ca.crt, namespace)."""
    directory.mkdir()
    (directory / "token").write_text(token)
    shutil.copy(ca_file, directory / "ca.crt")
    (directory / "namespace").write_text("kpod-metrics")
    return directory


@pytest.fixture(scope="module")
def chart_node(agent_image: BuiltImage, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChartNode]:
    workdir = tmp_path_factory.mktemp("chart-node")
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(host_linked_netns())
        certs = make_certs(workdir, ip=link.host_ip)
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(certs.cert, certs.key)
        api = stack.enter_context(FakeApiServer(token=f"sa-{uuid.uuid4().hex}", host=link.host_ip, tls=tls))
        runtime = stack.enter_context(runc_runtime(workdir, NODE))
        runtime.kubelet_cgroups()  # the node's kubelet started before the DaemonSet's pod
        sa_dir = service_account(workdir / "serviceaccount", api.token, certs.ca)
        node = Node(NODE, host_ip=link.host_ip, pod_ip=link.pod_ip, netns=link.path, service_host=link.host_ip,
                    service_port=api.port, service_account_dir=str(sa_dir))  # fmt: skip
        run = ChartRun(chart(CHART_VALUES), node, workdir)
        name = unique_name("agent")
        parent = stack.enter_context(cgroup_parent())
        stack.callback(remove_container, name)
        podman(*run.command(name, agent_image.name, cgroup_parent=parent))
        agent_node = ChartNode(api, link, runtime, run, name, workdir)
        # The kubelet's readiness probe, from the node.
        deadline = time.monotonic() + 90
        while not _ready(agent_node):
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            assert state == "running", f"agent container {state}: {agent_node.logs()}"
            assert time.monotonic() < deadline, f"agent not ready after 90 s: {agent_node.logs()}"
            time.sleep(0.5)
        yield agent_node
        # Stopped as the kubelet stops it: SIGTERM, the grace period, then the exit status.
        podman("stop", f"--time={run.stop_timeout}", name)
        code = podman("inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", f"agent exit status {code}: {agent_node.logs()}"


def _ready(chart: ChartNode) -> bool:
    try:
        return chart.get(chart.run.readiness_path, timeout=2)[0] == 200
    except OSError:
        return False


# ----------------------------------------------------------------------------- the chart's settings


def test_the_container_gets_exactly_the_chart_settings(chart_node: ChartNode) -> None:
    """Read back from the kernel: what the running agent process holds is what the chart says."""
    pid = container_pid(chart_node.container)
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    cap_eff = int(fields["CapEff"], 16)
    assert cap_eff == sum(1 << bit for bit in (2, 19, 38, 39)), (
        f"CapEff {fields['CapEff']}"
    )  # DAC_READ_SEARCH, SYS_PTRACE, PERFMON, BPF
    assert int(fields["CapBnd"], 16) == cap_eff and fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2", "a seccomp filter is applied"
    assert fields["Uid"].split()[:2] == ["0", "0"]
    assert Path(f"/proc/{pid}/ns/pid").readlink() == Path("/proc/self/ns/pid").readlink(), "hostPID"
    assert Path(f"/proc/{pid}/ns/net").readlink() != Path("/proc/self/ns/net").readlink(), "own netns"
    mounts = {}
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields_ = line.split()
        mounts[fields_[4]] = fields_[5].split(",")
    assert "ro" in mounts["/"], "readOnlyRootFilesystem"
    for path in ("/sys", "/sys/fs/cgroup", "/host/proc", "/etc/kpod-metrics",
                 "/var/run/secrets/kubernetes.io/serviceaccount"):  # fmt: skip
        seen = mounts.get(path) or mounts.get(path.replace("/var/run/", "/run/"), [])  # /var/run -> /run
        assert "ro" in seen, f"{path} is not mounted read-only: {seen}"
    assert "/sys/fs/cgroup/unified" in mounts, "the host's cgroup tree, v1 and cgroup2, through the chart's mount"
    assert "/sys/fs/cgroup/memory" in mounts or "/sys/fs/cgroup" in mounts


def test_a_chart_change_changes_the_run(tmp_path: Path) -> None:
    node = Node(NODE, host_ip="10.0.0.1", netns="/run/netns/x", service_account_dir=str(tmp_path))

    def flags(values: dict[str, Any]) -> list[str]:
        return ChartRun(chart(values), node, tmp_path).flags

    def flags_unchecked(values: dict[str, Any]) -> list[str]:
        """Flags for a chart whose hostPaths need not exist here (tracefs is not mounted on every host)."""
        return ChartRun(chart(values), node, tmp_path, check_host_paths=False).flags

    default = flags({})
    assert "--cap-add=CAP_BPF" in default and "--cap-drop=all" in default and "--read-only" in default
    assert not any(f.startswith("--security-opt=seccomp") for f in default), "RuntimeDefault: the engine's profile"
    assert "--cap-add=CAP_SYS_RESOURCE" in flags({"capabilities": ["BPF", "PERFMON", "SYS_RESOURCE"]})
    assert "--security-opt=seccomp=unconfined" in flags({"seccompProfile": {"type": "Unconfined"}})
    assert "--network=host" in flags({"hostNetwork": True})
    assert not any("/sys/kernel/btf" in f or "tracing" in f for f in default), "BTF: the container's own sysfs"
    assert "--volume=/sys/kernel/tracing:/sys/kernel/tracing:ro" in flags_unchecked({"hostMounts": {"tracefs": True}})
    assert "--volume=/proc:/host/proc:ro" in default
    with pytest.raises(ChartNotEmulated, match="hostAliases"):
        objs = chart({})
        next(o for o in objs if o["kind"] == "DaemonSet")["spec"]["template"]["spec"]["hostAliases"] = []
        ChartRun(objs, node, tmp_path)


def test_endpoints_answer_a_scraper_outside(chart_node: ChartNode) -> None:
    assert chart_node.get("/healthz")[0] == 200
    assert chart_node.get("/readyz")[0] == 200
    status = chart_node.status()
    assert status["ready"] is True and status["discovery"]["ok"] is True, json.dumps(status["discovery"])
    states = {name: r["state"] for name, r in status["receivers"].items()}
    assert all(states[r] == "running" for r in EBPF_RECEIVERS), f"eBPF receivers: {states}\n{chart_node.logs()}"
    names = {s.name for s in chart_node.metrics()}
    assert {"kpod_bpf_programs_loaded", "kpod_collection_cycles_total", "kpod_pods_discovered"} <= names
    samples = chart_node.metrics()
    loaded = [s.value for s in samples if s.name == "kpod_bpf_programs_loaded"]
    failed = {s.labels["program"]: s.value for s in samples if s.name == "kpod_bpf_programs_failed"}
    assert loaded and loaded[0] >= 10, f"{loaded} BPF programs attached"
    # The programs behind the ground truth below run; a program this kernel cannot take (a
    # function whose signature differs) may be off, never for want of permission.
    needed = ("sched_switch", "oom_mark_victim", "mem_major_fault", "tcp_send_length", "tcp_recv_length",
              "tcp_set_state", "sys_enter", "sys_exit")  # fmt: skip
    assert {p: failed.get(p) for p in needed} == dict.fromkeys(needed, 0.0), failed
    routes = json.dumps(status["receivers"])
    assert "not permitted" not in routes and "EPERM" not in routes, routes


# ----------------------------------------------------------------------------- workloads


PRELUDE = Workload.PRELUDE  # prints "ready", waits for a line

FILL_DATA = textwrap.dedent(
    f"""
    with open('/data/blob', 'wb') as f:
        f.write(b'x' * {DATA_BYTES})
    print('written', flush=True)
    sys.stdin.readline()
    """
)


def python(code: str) -> list[str]:
    return ["python3", "-c", PRELUDE + code]


@pytest.fixture
def pods(chart_node: ChartNode) -> Iterator[list[RuncPod]]:
    """Pods made in one test; removed (and their API objects deleted) after it."""
    made: list[RuncPod] = []
    try:
        yield made
    finally:
        for pod in made:
            with contextlib.suppress(KeyError):
                chart_node.api.delete_pod(pod.uid)
            pod.remove()


def _new_pod(chart_node: ChartNode, pods: list[RuncPod], name: str, **kwargs: str) -> RuncPod:
    pod = chart_node.runtime.pod(NAMESPACE, f"{name}-{uuid.uuid4().hex[:5]}", **kwargs)
    pods.append(pod)
    return pod


def test_tcp_and_interface_bytes_between_runc_pods(chart_node: ChartNode, pods: list[RuncPod]) -> None:
    client = _new_pod(chart_node, pods, "client")  # cgroupfs driver, BestEffort
    server = _new_pod(chart_node, pods, "server", qos="burstable", driver="systemd")
    link_pods(client.netns, server.netns, "10.214.0.1", "10.214.0.2")
    receiver = server.run("receiver", python(RECEIVER), env=["KPOD_TEST_BIND=0.0.0.0"])
    sender = client.run("sender", python(SENDER))
    for pod in (client, server):
        chart_node.add_pod(pod)
    for container in (receiver, sender):
        assert container.readline() == "ready"
        container.send("go")
        container.send("")  # no netns to enter: the container is in its pod's
    port = int(receiver.readline())
    receiver.send("accept")
    sender.send(f"10.214.0.2 {port}")
    sender.send(str(ODD_BYTES))
    sender.send("send")  # the method: plain send() calls
    assert sender.readline() == "connected"
    sender.send("send")
    received = json.loads(receiver.readline())["received"]
    sent = json.loads(sender.readline())["sent"]
    assert sent == received == ODD_BYTES

    # The kernel's counters of both ends of the veth (each in its own pod netns), now quiet.
    client_if, server_if = net_dev(sender.pid)["eth0"], net_dev(receiver.pid)["eth0"]
    assert client_if[1] == server_if[0] and client_if[0] == server_if[1], (client_if, server_if)
    assert client_if[1] > ODD_BYTES, "payload plus headers"

    labels = {"namespace": NAMESPACE, "pod": client.name, "container": "sender"}
    got = chart_node.wait_value("kpod_net_tcp_bytes_sent_total", lambda v: v == ODD_BYTES, **labels)
    assert got == ODD_BYTES, f"agent {got}, send() returned {ODD_BYTES}"
    series = [
        s
        for s in chart_node.metrics()
        if s.name == "kpod_net_tcp_bytes_sent_total" and s.labels.get("pod") == client.name
    ]
    assert [s.labels for s in series] == [{**labels, "node": NODE}]
    server_labels = {"namespace": NAMESPACE, "pod": server.name, "container": "receiver"}
    got = chart_node.wait_value("kpod_net_tcp_bytes_received_total", lambda v: v == ODD_BYTES, **server_labels)
    assert got == ODD_BYTES, f"agent {got}, recv() returned {ODD_BYTES}"
    assert chart_node.value("kpod_net_tcp_connections_total", direction="active", **labels) == 1
    assert chart_node.value("kpod_net_tcp_connections_total", direction="passive", **server_labels) == 1

    # Interface bytes of each pod's netns (pod-level series: no container label).
    for pod, (rx, tx) in ((client, client_if), (server, server_if)):
        where = {"namespace": NAMESPACE, "pod": pod.name, "interface": "eth0"}
        assert chart_node.wait_value("kpod_net_iface_rx_bytes_total", lambda v, rx=rx: v == rx, **where) == rx
        assert chart_node.value("kpod_net_iface_tx_bytes_total", **where) == tx
    print(f"\ncontainer-chart: tcp {ODD_BYTES} B sent and received; eth0 client rx/tx {client_if}, "
          f"server rx/tx {server_if} (agent equal)")  # fmt: skip


def test_filesystem_usage_of_a_container_mount(chart_node: ChartNode, pods: list[RuncPod]) -> None:
    pod = _new_pod(chart_node, pods, "files")
    tmpfs = Mount("/data", "tmpfs", "tmpfs", ("nosuid", "nodev", f"size={TMPFS_BYTES}"))
    writer = pod.run("writer", python(FILL_DATA), mounts=[tmpfs])
    chart_node.add_pod(pod)
    assert writer.readline() == "ready"
    writer.send("go")
    assert writer.readline() == "written"
    where = {"namespace": NAMESPACE, "pod": pod.name, "container": "writer", "mountpoint": "/data"}
    usage = chart_node.wait_value("kpod_fs_usage_bytes", lambda v: v == DATA_BYTES, **where)
    assert usage == DATA_BYTES, (
        f"agent {usage}, tmpfs holds {DATA_BYTES // 4096} pages; {chart_node.explain('filesystem', pod.name)}"
    )
    assert chart_node.value("kpod_fs_capacity_bytes", **where) == TMPFS_BYTES
    assert chart_node.value("kpod_fs_available_bytes", **where) == TMPFS_BYTES - DATA_BYTES


# 0.4 s of CPU under a 20 % quota: about 2 s, most CFS periods ending throttled.
SPIN = "while time.process_time() < 0.4:\n    pass\nprint('spun', flush=True)\nsys.stdin.readline()\n"
CPU_QUOTA_US = 20_000


def cpu_truth(container: RuncContainer) -> dict[str, float]:
    """The kernel's own CPU counters of a container's cgroup, where the cpu controller lives:
    v1 cpuacct.usage and cpu.stat (this hybrid host), else cgroup2's cpu.stat."""
    v1 = mounts().v1
    relative = container.cgroups_path.lstrip("/")
    if "cpu" in v1:
        usage = int(Path(v1["cpuacct"], relative, "cpuacct.usage").read_text()) / 1e9
        stat = parse_cpu_stat(Path(v1["cpu"], relative, "cpu.stat").read_text())
        throttled = stat["throttled_time"] / 1e9
    else:
        stat = parse_cpu_stat(Path(mounts().unified or "", relative, "cpu.stat").read_text())
        usage, throttled = stat["usage_usec"] / 1e6, stat["throttled_usec"] / 1e6
    return {"kpod_cpu_usage_seconds_total": usage, "kpod_cpu_periods_total": stat["nr_periods"],
            "kpod_cpu_throttled_periods_total": stat["nr_throttled"],
            "kpod_cpu_throttled_seconds_total": throttled}  # fmt: skip


def test_cpu_usage_and_throttling_against_the_kernel(chart_node: ChartNode, pods: list[RuncPod]) -> None:
    """A container with a CPU limit (a CFS quota in the OCI spec) spins; once it waits, the
    agent's four CPU counters equal the kernel's own (on this host the v1 cpu and cpuacct
    controllers: cgroup2's cpu.stat there has usage but never throttling)."""
    pod = _new_pod(chart_node, pods, "spin", qos="burstable")
    spinner = pod.run("spinner", python(SPIN), cpu_quota_us=CPU_QUOTA_US)
    chart_node.add_pod(pod)
    assert spinner.readline() == "ready"
    spinner.send("go")
    assert spinner.readline(60) == "spun"
    spinner.wait_blocked()
    truth = settled(lambda: cpu_truth(spinner))
    assert truth["kpod_cpu_throttled_periods_total"] > 0, f"the quota throttled nothing: {truth}"
    labels = {"namespace": NAMESPACE, "pod": pod.name, "container": "spinner"}

    def seen() -> dict[str, float]:
        return {s.name: s.value for s in chart_node.metrics()
                if s.name in truth and all(s.labels.get(k) == v for k, v in labels.items())}  # fmt: skip

    # Seconds went through a float division and the text exposition: equal to the nanosecond.
    close = lambda got: set(got) == set(truth) and all(abs(got[k] - truth[k]) < 1e-9 for k in truth)  # noqa: E731
    assert poll_until(lambda: close(seen()), timeout=30), (seen(), truth)
    print(f"\ncontainer-chart: cpu {truth}")


@pytest.fixture(scope="module")
def syscall_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The syscall workload (kernel_util), static: nothing runs in the container but its own calls."""
    directory = tmp_path_factory.mktemp("syscall-bin")
    compile_c(SYSCALL_WORKLOAD_C, directory, "workload", "-static")
    return directory


def test_syscalls_and_major_faults(chart_node: ChartNode, pods: list[RuncPod], syscall_binary: Path) -> None:
    """Deltas across the workloads' own calls: what runc's init did in the container's cgroup
    before exec is left out by reading the agent once the process waits for its go."""
    pod = _new_pod(chart_node, pods, "work")
    with uncached_file(FAULT_FILE_SIZE) as data:
        bin_mount = Mount("/opt/workload", str(syscall_binary))
        data_mount = Mount("/faults", str(data.parent))
        syscalls = pod.run(
            "syscalls", ["/opt/workload/workload", str(N_OK), str(M_FAIL), "500", str(Z_EOF)], mounts=[bin_mount]
        )
        faulter = pod.run("faults", python(faults_code(Path("/faults") / data.name)), mounts=[data_mount])
        chart_node.add_pod(pod)
        assert syscalls.readline() == "ready" and faulter.readline() == "ready"
        syscalls.wait_blocked()
        faulter.wait_blocked()
        stat = lambda: int(Path(f"/proc/{faulter.pid}/stat").read_text().rsplit(")", 1)[1].split()[9])  # noqa: E731
        majflt_before = stat()
        chart_node.wait_cycles(2)
        sc = {"namespace": NAMESPACE, "pod": pod.name, "container": "syscalls"}
        fl = {"namespace": NAMESPACE, "pod": pod.name, "container": "faults"}
        before = {
            "getppid": chart_node.value("kpod_syscall_count_total", syscall="getppid", **sc) or 0,
            "read": chart_node.value("kpod_syscall_count_total", syscall="read", **sc) or 0,
            "read_errors": chart_node.value("kpod_syscall_errors_total", syscall="read", **sc) or 0,
            "majflt": chart_node.value("kpod_mem_major_page_faults_total", **fl) or 0,
        }
        syscalls.process.stdin.write(b"g")  # type: ignore[union-attr]
        syscalls.process.stdin.flush()  # type: ignore[union-attr]
        assert syscalls.readline() == "done"
        faulter.send("go")
        assert faulter.readline() == "done"
        faulter.wait_blocked()
        majflt = stat() - majflt_before
        assert majflt >= FAULT_FILE_SIZE // 4096 // 2, f"{majflt} major faults: the file was cached"
        chart_node.wait_cycles(2)
        after = {
            "getppid": chart_node.value("kpod_syscall_count_total", syscall="getppid", **sc) or 0,
            "read": chart_node.value("kpod_syscall_count_total", syscall="read", **sc) or 0,
            "read_errors": chart_node.value("kpod_syscall_errors_total", syscall="read", **sc) or 0,
            "majflt": chart_node.value("kpod_mem_major_page_faults_total", **fl) or 0,
        }
        delta = {key: after[key] - before[key] for key in after}
        assert delta == {"getppid": N_OK, "read": 1 + M_FAIL + Z_EOF, "read_errors": M_FAIL, "majflt": majflt}, (
            delta, before)  # fmt: skip
        print(f"\ncontainer-chart: syscalls {delta}, majflt /proc {majflt}")


def _oom_killed(chart_node: ChartNode, pods: list[RuncPod], name: str, delete_at_once: bool) -> tuple[RuncPod, Any]:
    """A Guaranteed pod whose container goes over its 64 MiB limit and is OOM-killed."""
    pod = _new_pod(chart_node, pods, name, qos="guaranteed")
    hog = pod.run("hog", python(MEMORY_HOG), memory_limit=64 << 20)
    chart_node.add_pod(pod)
    assert hog.readline() == "ready"
    (memcg,) = [d for d in hog.cgroup_dirs() if (d / "memory.oom_control").exists() or (d / "memory.events").exists()]
    chart_node.wait_cycles(2)  # the agent knows the pod and its container's cgroup
    with chart_node.frozen_between_cycles() if delete_at_once else contextlib.nullcontext():
        hog.send("go")
        assert hog.readline(60) == "", "the hog's stdout closes when the kernel kills it"
        kills = oom_events(memcg)
        if delete_at_once:
            hog.delete()  # as containerd does on the task's exit event, before the agent's next cycle
        else:
            hog.wait_stopped(10)
    assert kills == 1, f"memory.oom_control counts {kills} kills"
    return pod, hog


def test_oom_kill_of_a_runc_container(chart_node: ChartNode, pods: list[RuncPod]) -> None:
    """Counted with the pod's labels while the killed container's cgroup still exists; then the
    runtime deletes the container, and its cgroups go with it."""
    pod, hog = _oom_killed(chart_node, pods, "oom", delete_at_once=False)
    where = {"namespace": NAMESPACE, "pod": pod.name, "container": "hog"}
    got = chart_node.wait_value("kpod_mem_oom_kills_total", lambda v: v == 1, **where)
    assert got == 1, f"agent {got}, memory.oom_control says 1\n{chart_node.logs()}"
    hog.delete()
    assert not hog.cgroup_dirs(), "runc delete removed the container's cgroups"


def test_oom_kill_counted_when_the_runtime_deletes_the_cgroup_at_once(chart_node: ChartNode,
                                                                      pods: list[RuncPod]) -> None:  # fmt: skip
    pod, hog = _oom_killed(chart_node, pods, "oomfast", delete_at_once=True)
    assert not hog.cgroup_dirs()
    where = {"namespace": NAMESPACE, "pod": pod.name, "container": "hog"}
    got = chart_node.wait_value("kpod_mem_oom_kills_total", lambda v: v == 1, timeout=10, **where)
    assert got == 1, f"agent {got}, memory.oom_control said 1"


# ----------------------------------------------------------------------------- seccomp


def _check_in_container(image: str, values: dict[str, Any], workdir: Path, link: HostLink,
                        cap_add: list[str] | None = None) -> str:  # fmt: skip
    """`kpod-metrics check` in a container with the settings the chart renders for `values`."""
    node = Node(NODE, host_ip=link.host_ip, pod_ip=link.pod_ip, netns=link.path,
                service_account_dir=str(workdir))  # fmt: skip
    objs = chart(values)
    if cap_add is not None:
        (ds,) = [o for o in objs if o["kind"] == "DaemonSet"]
        ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = cap_add
    run = ChartRun(objs, node, workdir)
    name = unique_name("check")
    args = ["check", "--config=/etc/kpod-metrics/config.yaml"]
    with cgroup_parent() as parent:
        try:
            command = run.command(name, "", cgroup_parent=parent, args=args)
            command = [a for a in command if a != "--detach"]
            command[command.index("")] = image
            result = podman(*command, check=False)
        finally:
            remove_container(name)
    assert result.returncode in (0, 1), result.stderr
    return result.stdout


def _receiver_lines(check_output: str) -> dict[str, str]:
    return {name: verdict for name, verdict in (
        line.strip().split(None, 1) for line in check_output.split("receivers:\n", 1)[1].splitlines() if line.strip()
    )}  # fmt: skip


def test_seccomp_runtime_default_is_told_from_a_missing_capability(chart_node: ChartNode, agent_image: BuiltImage,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    """The chart's default (RuntimeDefault) under podman: containers/common's profile refuses
    bpf() to a container without CAP_SYS_ADMIN.  `check` names the seccomp filter, not the
    capabilities; without CAP_BPF it names the capability; with the chart's Localhost profile
    every eBPF receiver is ok."""
    values = {"config": {"profile": "comprehensive"}}
    default = _check_in_container(agent_image.name, values, tmp_path, chart_node.link)
    seccomp_line = next(line for line in default.splitlines() if line.startswith("seccomp:"))
    assert seccomp_line.split(None, 1)[1].startswith("filter: bpf() BLOCKED by the filter (EPERM)"), default
    receivers = _receiver_lines(default)
    for receiver in EBPF_RECEIVERS:
        assert receivers[receiver].startswith("cannot run: bpf() blocked by seccomp"), (receiver, default)
    assert receivers["cgroup_cpu"].startswith("ok"), default

    no_bpf = _check_in_container(agent_image.name, values, tmp_path, chart_node.link,
                                 cap_add=["PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"])  # fmt: skip
    receivers = _receiver_lines(no_bpf)
    for receiver in EBPF_RECEIVERS:
        assert receivers[receiver] == "cannot run: needs root or CAP_BPF+CAP_PERFMON to load tracing BPF programs"
    assert "seccomp" not in "".join(receivers.values())

    localhost = _check_in_container(agent_image.name, {**values, "seccompProfile": CHART_VALUES["seccompProfile"]},
                                    tmp_path, chart_node.link)  # fmt: skip
    assert "seccomp:      filter: bpf() allowed; perf_event_open() allowed" in localhost, localhost
    receivers = _receiver_lines(localhost)
    assert all(receivers[r].startswith("ok") for r in EBPF_RECEIVERS), localhost


def test_seccomp_refusal_in_the_start_up_log_and_status(agent_image: BuiltImage, tmp_path: Path) -> None:
    """The agent itself under RuntimeDefault: the start-up log and /debug/status say seccomp."""
    with contextlib.ExitStack() as stack:
        link = stack.enter_context(host_linked_netns())
        node = Node(NODE, host_ip=link.host_ip, pod_ip=link.pod_ip, netns=link.path, service_account_dir=str(tmp_path))
        values = {"config": {"pollInterval": 500, "profile": "comprehensive", "discovery": {"mode": "kubelet"}}}
        run = ChartRun(chart(values), node, tmp_path)
        name = unique_name("seccomp")
        parent = stack.enter_context(cgroup_parent())
        stack.callback(remove_container, name)
        podman(*run.command(name, agent_image.name, cgroup_parent=parent))
        url = f"http://{link.pod_ip}:{run.metrics_port}/debug/status"
        deadline = time.monotonic() + 60
        status: dict[str, Any] = {}
        while time.monotonic() < deadline and not status.get("cycles"):
            with contextlib.suppress(OSError, ValueError):
                status = json.loads(urllib.request.urlopen(url, timeout=2).read())
            time.sleep(0.3)
        assert status.get("cycles"), container_logs(name)[-3000:]
        for receiver in EBPF_RECEIVERS:
            state = status["receivers"][receiver]
            assert state["state"] == "unavailable" and state["reason"].startswith("bpf() blocked by seccomp"), state
        log = container_logs(name)
        warnings = [json.loads(line)["message"] for line in log.splitlines() if '"warning"' in line]
        assert any(m.startswith("receiver cpu_sched: bpf() blocked by seccomp") for m in warnings), log[-3000:]
