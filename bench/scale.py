"""Scale: collection cycle time, CPU per cycle, scrape latency and series at 10, 110 and 250 pods,
and the agent's RSS over a long run at 110 pods.

    .venv/bin/python -m bench.scale [--sizes 10,110,250] [--rss-minutes 10] [--baseline DIR] [--write]
    KPOD_BENCH_RSS_MINUTES=1 .venv/bin/python -m bench.scale      (a quick run; 0 skips the RSS run)

The node, as root on this host (the machinery of bench/soak.py and tests/kernel_util.py):
under a cgroup of the bench's own (the agent's cgroup root: nobody else's pods in its view),
N kubepods-shaped pod cgroups (systemd driver, burstable QoS, containerd scopes) in that
cgroup, alternately 2 and 1 containers per pod (1.5 N containers), each container with
one live process: a bash loop waking once a second (`read -t 1`), so the eBPF receivers see
scheduling and system calls in every container at a negligible load.  On this hybrid host the
memory, blkio, cpu and cpuacct controllers live on v1, so the same relative paths are made there
too and the processes moved in, as a kubelet does on a hybrid node (the cgroup receivers read
their v1 files there).  The fake API server (tests/fake_apiserver.py) serves the N pods, and the
agent runs as its own process (`kpod-metrics run`, informer mode, comprehensive profile, poll
1 s, Prometheus exporter), so every pod's series are labelled as on a node.

The agent reaches the API server the way it does in a pod: KUBERNETES_SERVICE_HOST/PORT, a
service account directory with a token and a CA (apiserver.SERVICE_ACCOUNT_DIR pointed at a
temporary one), HTTPS with a certificate that CA signed (tests/fake_kubelet.make_certs).  With a
kubeconfig instead it would import the `kubernetes` package to read it, some 22 MiB of RSS that
no pod pays.  The RSS run is made in both discovery modes a node can use: informer, and kubelet
(a fake kubelet's /pods over HTTPS with the same token and CA, the same pods).

Cycle wall time: nothing added to the agent.  The agent's loop already times each cycle
(refresh + collection + processors + export, i.e. render) and logs it at debug level
(`kpod.agent`: "cycle N: P points in X s"); the bench starts the agent with only that logger at
debug (the rest at info), so the log is one line per cycle and costs nothing measurable.
kpod_collection_duration_seconds{receiver} and /debug/status give per-receiver times only (the
receivers run concurrently, and the refresh, processors and render are outside them);
cycles_total and last_cycle_timestamp give cycle ends, not starts.  Per-receiver medians come
from /debug/status, read once per cycle in a separate window (reading it costs agent CPU).

CPU per cycle: the agent's utime + stime (/proc/<pid>/stat, the counter process_cpu_seconds_total
exports) over a window of cycles in which nothing else talks to the agent, divided by the
cycles the log shows in that window.  It includes the agent's idle work between cycles (the
informer's watch, the HTTP server), which is part of what a cycle costs on a node.

Scrape latency: GET /metrics over one keep-alive loopback connection, plain and gzip, while the
agent keeps cycling (as Prometheus scrapes a running agent).

Before and after in one run: `--baseline DIR` (a worktree of an older commit, set up with
`make setup`) runs that tree's agent (its own interpreter, its working directory) on the same
node: each size is measured for both trees one after the other (the order alternating from
size to size), and the RSS runs of both trees in both modes run at the same time, side by side
for the same minutes.  A tree without the in-cluster client of this one
(processors/k8sattributes/apiserver.py) reaches the API server through a kubeconfig with the
same token and CA: it imports the `kubernetes` package for that, as it did in a pod.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agent_proc import AgentProcess, clean_env, full_profile, rss_kib  # noqa: E402
from fake_apiserver import FakeApiServer, Pod, make_pod  # noqa: E402
from fake_kubelet import FakeKubelet, make_certs  # noqa: E402
from helpers import free_port, server_tls  # noqa: E402
from kernel_util import CgroupTree, cgroup2_root, mounts  # noqa: E402

from bench import sections  # noqa: E402
from bench.sections import Measured, NotMeasured  # noqa: E402

SIZES = (10, 110, 250)
POLL_S = 1.0
NODE = "scale-node"
NAMESPACE = "scale"
CYCLES = 20  # timed cycles per size (plus the status window and the scrapes)
STATUS_CYCLES = 8
SCRAPES = 200
RSS_PODS = 110
RSS_SAMPLE_S = 10.0
RSS_WARMUP_S = 60.0
RSS_MODES = ("informer", "kubelet")
# Targets of issue 17 for the agent's RSS at RSS_PODS pods, by discovery mode.
RSS_TARGET_MIB = {"informer": 50.0, "kubelet": 40.0}
CPU_TARGET_MS = {110: 40.0, 250: 90.0}  # issue 17: CPU per cycle, comprehensive profile
KUBELET_POLL = "10s"  # the default is 30 s; more polls within a short run
TOKEN = "scale-token"
KUBERNETES_IMPORTED = "kpod-bench: the kubernetes package was imported"
# Targets of issue 2 (bench.core measures them on a synthetic batch; here on a real agent).
SCRAPE_P50_TARGET_MS = 2.0
SCRAPE_TARGET_PODS = 110
# A loopback segment: a response body smaller than this goes out as one small write after the
# headers, which Nagle would hold until the client's delayed ACK (~40 ms) without TCP_NODELAY;
# such scrapes slower than SLOW_SCRAPE_MS are listed.
LOOPBACK_MSS = 65483
SLOW_SCRAPE_MS = 20.0
# Controllers whose v1 files the agent reads on a hybrid host (cgroup_memory, disk, cgroup_cpu).
V1_CONTROLLERS = ("memory", "blkio", "cpu", "cpuacct")
CYCLE_LINE = re.compile(r"kpod\.agent: cycle (\d+): (\d+) points in ([0-9.]+)s")
# A container's process: wakes once a second, exits on EOF (if the bench dies, so do they).
WORKLOAD = "while read -t 1 _ || [ $? -gt 128 ]; do :; done"
CLK_TCK = os.sysconf("SC_CLK_TCK")
Tree = tuple[str, Path]  # ("this" or "baseline", its worktree)


@dataclass
class SizeResult:
    pods: int
    containers: int
    tree: str = "this"  # or "baseline" (--baseline)
    cycles: int = 0
    cycle_ms: list[float] = field(default_factory=list)
    cpu_ms_per_cycle: float = 0.0
    points: int = 0
    series: int = 0
    body_bytes: int = 0
    gzip_bytes: int = 0
    plain_ms: list[float] = field(default_factory=list)
    gzip_ms: list[float] = field(default_factory=list)
    receivers_ms: dict[str, float] = field(default_factory=dict)  # median last_duration per receiver
    labelled_pods: int = 0
    rss_mib: float = 0.0
    load_before: float = 0.0
    load_after: float = 0.0
    overruns: int = 0  # cycles longer than the poll interval

    def median_cycle(self) -> float:
        return statistics.median(self.cycle_ms)

    def p99_cycle(self) -> float:
        return _quantile(self.cycle_ms, 0.99)


@dataclass
class RssResult:
    minutes: float
    pods: int
    mode: str = "informer"
    tree: str = "this"
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since ready, KiB)
    cycles: int = 0
    load_before: float = 0.0
    load_after: float = 0.0

    def at(self, seconds: float) -> int:
        """The first sample at or after `seconds` (the last one if the run was shorter)."""
        for t, kib in self.samples:
            if t >= seconds:
                return kib
        return self.samples[-1][1]


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile: with 20 values p99 is the maximum, which is what it should say."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 1)) - 1))]


def _load1() -> float:
    return os.getloadavg()[0]


def _cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)


class _PodSink(Protocol):
    def add_pod(self, pod: Pod) -> Pod: ...


class Cluster:
    """The API server and the kubelet as a pod sees them: HTTPS with a certificate signed by
    the CA in a service account directory that also holds the token, the same pods in both.

    `env()` and `account_dir` are what an agent needs to run in-cluster; `stop()` ends both
    servers (the temporary files are the caller's workdir)."""

    def __init__(self, workdir: Path) -> None:
        certs = make_certs(workdir)
        self.account_dir = workdir / "serviceaccount"
        self.account_dir.mkdir()
        (self.account_dir / "token").write_text(TOKEN + "\n")
        (self.account_dir / "ca.crt").write_text(Path(certs.ca).read_text())
        tls = server_tls(certs.cert, certs.key)
        self.api = FakeApiServer(token=TOKEN, tls=tls)
        self.kubelet = FakeKubelet(token=TOKEN, certs=certs)

    def start(self) -> Cluster:
        self.api.start()
        try:
            self.kubelet.start()
        except Exception:
            self.api.stop()
            raise
        return self

    def stop(self) -> None:
        self.kubelet.stop()
        self.api.stop()

    def add_pod(self, pod: Pod) -> Pod:
        self.kubelet.pods.append(pod)
        return self.api.add_pod(pod)

    def env(self) -> dict[str, str]:
        """The agent's environment in a pod (the service's address), on top of a clean one."""
        return clean_env({"KUBERNETES_SERVICE_HOST": self.api.host, "KUBERNETES_SERVICE_PORT": str(self.api.port)})

    def discovery(self, mode: str) -> str:
        """The `kpod.discovery` setting of `mode`, as YAML flow."""
        if mode == "informer":
            return "{mode: informer}"
        token, ca = self.account_dir / "token", self.account_dir / "ca.crt"
        return (
            f"{{mode: kubelet, kubelet: {{url: '{self.kubelet.url}', poll_interval: {KUBELET_POLL},"
            f" token_file: '{token}', ca_file: '{ca}'}}}}"
        )


class _Node:
    """The pods of the fake node: cgroups (cgroup2 + v1 mirrors), processes, API objects.

    Grows pod by pod; `close()` kills every process we started (by its process group, which is
    only the bash we started) and removes exactly the cgroups we made.
    """

    def __init__(self, api: _PodSink, workload: str = WORKLOAD) -> None:
        self.api = api
        self.workload = workload
        # A cgroup of its own under the cgroup2 root holds this node's kubepods.slice, and the
        # agent's cgroup root is that cgroup: other sessions on the machine build kubepods
        # trees at the real root, and the agent would read their pods' files too.  The v1
        # mirrors keep the relative paths (from kubepods.slice), as the agent looks them up.
        self.top = CgroupTree(Path(cgroup2_root()))
        self.root = self.top.mkdir(f"kpod-bench-{uuid.uuid4().hex[:12]}")
        self.tree = CgroupTree(self.root)
        v1 = mounts().v1
        self.mirrors = [CgroupTree(Path(v1[c])) for c in V1_CONTROLLERS if c in v1]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.pods = 0
        self.containers = 0

    def grow(self, pods: int) -> None:
        while self.pods < pods:
            self._add_pod(self.pods)

    def _add_pod(self, index: int) -> None:
        pod = self.tree.pod()
        scopes = [pod.container_dir]
        if index % 2 == 0:  # every other pod has a sidecar
            scopes.append(self.tree.mkdir(str(pod.pod_dir.relative_to(self.root) / _scope_name())))
        containers = []
        for number, scope in enumerate(scopes):
            relative = scope.relative_to(self.root)
            proc = subprocess.Popen(
                ["/bin/bash", "-c", self.workload], stdin=subprocess.PIPE, start_new_session=True
            )  # fmt: skip
            self.procs.append(proc)
            for mirror in self.mirrors:
                mirror.move(proc.pid, mirror.mkdir(str(relative)))
            self.tree.move(proc.pid, scope)
            cid = scope.name.removeprefix("cri-containerd-").removesuffix(".scope")
            containers.append(("app" if number == 0 else "sidecar", cid))
        self.api.add_pod(make_pod(f"scale-{index}", namespace=NAMESPACE, node=NODE, uid=pod.uid, containers=containers))
        self.pods += 1
        self.containers += len(scopes)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the session this container's bash leads
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.stdin:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        self.procs.clear()
        for tree in (self.tree, *self.mirrors, self.top):
            tree.cleanup()


def _scope_name() -> str:
    return f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"


class _TimedAgent(AgentProcess):
    """The agent with only the `kpod.agent` logger at debug: one "cycle N: P points in X s" line
    per cycle in its log, and otherwise exactly `kpod-metrics run`.  `account_dir`: the
    service account directory the in-cluster config reads instead of the real one."""

    account_dir: Path | None = None
    tree: Path = REPO  # the tree whose agent runs: its interpreter, its working directory

    def start(self) -> _TimedAgent:
        config = self.workdir / f"config-{self.port}.yaml"
        config.write_text(self.config_text)
        account = ""
        if self.account_dir is not None and in_cluster_client(self.tree):
            account = (
                "from kpod.processors.k8sattributes import apiserver\n"
                f"apiserver.SERVICE_ACCOUNT_DIR = {str(self.account_dir)!r}\n"
            )
        bootstrap = (
            "import logging, sys\n"
            "logging.getLogger('kpod.agent').setLevel(logging.DEBUG)\n"
            # Says in the log if anything imports the `kubernetes` package (then goes on).
            "class _Watch:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            f"        if name == 'kubernetes': print({KUBERNETES_IMPORTED!r}, file=sys.stderr, flush=True)\n"
            "sys.meta_path.insert(0, _Watch())\n" + account + "from kpod.cli import main\n"
            f"sys.exit(main(['run', '--config', {str(config)!r}, '--log-level', 'info']))\n"
        )
        python = sys.executable if self.tree == REPO else str(self.tree / ".venv" / "bin" / "python")
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [python, "-c", bootstrap], stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.tree
            )  # fmt: skip
        return self

    def cycle_lines(self) -> list[tuple[int, int, float]]:
        """(cycle number, points, seconds) of every cycle logged so far."""
        return [(int(m[1]), int(m[2]), float(m[3])) for m in CYCLE_LINE.finditer(self.log())]

    def wait_cycles(self, count: int) -> list[tuple[int, int, float]]:
        """Wait until `count` more cycles are logged; returns them."""
        start = len(self.cycle_lines())
        deadline = time.monotonic() + count * POLL_S * 3 + 30
        while time.monotonic() < deadline:
            lines = self.cycle_lines()
            if len(lines) >= start + count:
                return lines[start : start + count]
            if not self.alive():
                raise RuntimeError(f"agent exited:\n{self.log()[-3000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"fewer than {count} cycles logged in time:\n{self.log()[-3000:]}")


def in_cluster_client(tree: Path) -> bool:
    """Whether `tree`'s informer reaches the API server in-cluster without the `kubernetes`
    package (its own client, which reads the service account directory)."""
    return (tree / "processors" / "k8sattributes" / "apiserver.py").exists()


def _start_agent(
    workdir: Path, cluster: Cluster, root: str, mode: str = "informer", tree: Path = REPO, wait: bool = True
) -> _TimedAgent:
    """`tree`'s agent in a pod of `cluster`: in-cluster config (no kubeconfig), discovery
    `mode`; a tree without its own in-cluster client gets a kubeconfig (see the docstring)."""
    port = free_port()
    profile = full_profile()
    processors = ""
    if mode == "informer" and not in_cluster_client(tree):
        kubeconfig = cluster.api.write_kubeconfig(
            str(workdir / f"kubeconfig-{port}"), ca_file=str(cluster.account_dir / "ca.crt"), token=TOKEN
        )
        processors = f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}'}}\n"
    config = (
        f"kpod: {{profile: {profile}, poll_interval: {POLL_S:g}s, node_name: {NODE},"
        f" discovery: {cluster.discovery(mode)},"
        f" cgroup: {{root: {root}}}, filter: {{exclude_namespaces: []}}}}\n"
        + processors
        + f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
    )
    agent = _TimedAgent(config, workdir, port, env=cluster.env())
    agent.account_dir = cluster.account_dir
    agent.tree = tree
    agent.start()
    if wait:
        agent.wait_ready(90)
    return agent


def _check_no_client(agent: _TimedAgent) -> None:
    """In a pod the agent must not import the `kubernetes` package: its RSS would not be a pod's.
    (A baseline tree without its own client imports it: that is what it measured then.)"""
    if in_cluster_client(agent.tree) and KUBERNETES_IMPORTED in agent.log():
        raise RuntimeError(f"the agent imported the `kubernetes` package in-cluster:\n{agent.log()[-3000:]}")


POD_LABEL = re.compile(rb'pod="(scale-\d+)"')


def _labelled_pods(agent: AgentProcess) -> int:
    return len(set(POD_LABEL.findall(agent.get("/metrics", timeout=30))))


def _wait_labelled(agent: AgentProcess, pods: int, timeout_s: float = 90.0) -> int:
    """Wait until every pod's series carry its pod label (discovery listed them all)."""
    deadline = time.monotonic() + timeout_s
    seen = 0
    while time.monotonic() < deadline:
        seen = _labelled_pods(agent)
        if seen >= pods:
            break
        time.sleep(1.0)
    return seen


def _scrapes(agent: AgentProcess, gzip: bool, count: int) -> tuple[list[float], int]:
    import http.client

    headers = {"Accept-Encoding": "gzip"} if gzip else {}
    connection = http.client.HTTPConnection("127.0.0.1", agent.port, timeout=30)
    samples: list[float] = []
    size = 0
    try:
        for _ in range(count):
            began = time.perf_counter()
            connection.request("GET", "/metrics", headers=headers)
            response = connection.getresponse()
            size = len(response.read())
            samples.append((time.perf_counter() - began) * 1000)
    finally:
        connection.close()
    return samples, size


def measure_size(  # type: ignore[no-untyped-def]
    node: _Node, pods: int, workdir: Path, cluster: Cluster, tree: Tree = ("this", REPO), log=print
) -> SizeResult:
    node.grow(pods)
    result = SizeResult(pods=pods, containers=node.containers, tree=tree[0], load_before=_load1())
    agent = _start_agent(workdir, cluster, str(node.root), tree=tree[1])
    try:
        result.labelled_pods = _wait_labelled(agent, pods)
        agent.wait_cycles(3)  # a few cycles past labelling: caches warm, BPF maps populated
        # Quiet window: nothing talks to the agent; CPU from /proc at cycle ends.
        agent.wait_cycles(1)
        ticks_before = _cpu_ticks(agent.pid)
        timed = agent.wait_cycles(CYCLES)
        ticks_after = _cpu_ticks(agent.pid)
        result.cycles = len(timed)
        result.cycle_ms = [seconds * 1000 for _, _, seconds in timed]
        result.points = timed[-1][1]
        result.overruns = sum(1 for ms in result.cycle_ms if ms > POLL_S * 1000)
        result.cpu_ms_per_cycle = (ticks_after - ticks_before) / CLK_TCK * 1000 / len(timed)
        log(
            f"  {tree[0]}, {pods} pods: cycle median {result.median_cycle():.0f} ms,"
            f" CPU {result.cpu_ms_per_cycle:.0f} ms/cycle"
        )
        # Per-receiver times: /debug/status once per cycle, right after it.
        per: dict[str, list[float]] = {}
        for _ in range(STATUS_CYCLES):
            agent.wait_cycles(1)
            for rid, status in agent.status()["receivers"].items():
                if status["state"] == "running":
                    per.setdefault(rid, []).append(status["last_duration_seconds"] * 1000)
        result.receivers_ms = {rid: statistics.median(v) for rid, v in sorted(per.items())}
        # Scrapes while it keeps cycling.
        body = agent.get("/metrics", timeout=30)
        result.body_bytes = len(body)
        result.series = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
        result.plain_ms, _ = _scrapes(agent, gzip=False, count=SCRAPES)
        result.gzip_ms, result.gzip_bytes = _scrapes(agent, gzip=True, count=SCRAPES)
        result.rss_mib = rss_kib(agent.pid) / 1024
        result.load_after = _load1()
        _check_no_client(agent)
    finally:
        agent.stop()
    return result


def measure_rss(  # type: ignore[no-untyped-def]
    node: _Node, minutes: float, workdir: Path, cluster: Cluster, trees: list[Tree], log=print
) -> list[RssResult]:
    """A fresh agent per tree and discovery mode at RSS_PODS pods, all running at once for
    `minutes` once each has labelled every pod: RSS every 10 s (each from its own start), one
    gzip scrape before each sample (as Prometheus would scrape it)."""
    node.grow(RSS_PODS)
    runs: list[tuple[RssResult, _TimedAgent]] = []
    try:
        for name, tree in trees:
            for mode in RSS_MODES:
                result = RssResult(minutes=minutes, pods=RSS_PODS, mode=mode, tree=name, load_before=_load1())
                runs.append((result, _start_agent(workdir, cluster, str(node.root), mode, tree, wait=False)))
        for result, agent in runs:
            agent.wait_ready(90)
            labelled = _wait_labelled(agent, RSS_PODS)
            if labelled < RSS_PODS:
                raise RuntimeError(
                    f"{result.tree} {result.mode}: only {labelled} of {RSS_PODS} pods labelled:\n{agent.log()[-3000:]}"
                )
        ready = time.monotonic()
        end = ready + minutes * 60
        tick = ready
        while True:
            for result, agent in runs:
                agent.get("/metrics", headers={"Accept-Encoding": "gzip"}, timeout=30)
                result.samples.append((time.monotonic() - ready, rss_kib(agent.pid)))
                if not agent.alive():
                    raise RuntimeError(f"agent died:\n{agent.log()[-3000:]}")
            if len(runs[0][0].samples) % 6 == 0:
                log(
                    f"  RSS at {runs[0][0].samples[-1][0]:.0f} s: "
                    + ", ".join(f"{r.tree} {r.mode} {r.samples[-1][1] / 1024:.1f} MiB" for r, _ in runs)
                )
            tick += RSS_SAMPLE_S
            if tick > end + 0.5:
                break
            time.sleep(max(0.0, tick - time.monotonic()))
        for result, agent in runs:
            result.cycles = len(agent.cycle_lines())
            result.load_after = _load1()
            _check_no_client(agent)
    finally:
        for _, agent in runs:
            agent.stop()
    return [result for result, _ in runs]


def run(  # type: ignore[no-untyped-def]
    sizes: tuple[int, ...], rss_minutes: float, baseline: Path | None = None, log=print
) -> tuple[list[SizeResult], list[RssResult]]:
    """Sizes in increasing order (the node grows; pods are never removed in between), each for
    this tree and the baseline's (if any), alternating which goes first; the RSS runs (every
    tree in every discovery mode, at once) happen when the node has RSS_PODS pods.  Cleans up
    everything, also on failure."""
    trees = [("this", REPO)] + ([("baseline", baseline)] if baseline is not None else [])
    results: list[SizeResult] = []
    rss: list[RssResult] = []
    workdir = Path(tempfile.mkdtemp(prefix="kpod-scale-"))
    cluster: Cluster | None = None
    node: _Node | None = None
    try:
        cluster = Cluster(workdir).start()
        node = _Node(cluster)

        def rss_runs() -> None:
            log(f"RSS, {RSS_PODS} pods, {rss_minutes:g} min ...")
            rss.extend(measure_rss(node, rss_minutes, workdir, cluster, trees, log))

        rss_done = rss_minutes <= 0
        for pods in sorted(sizes):
            if not rss_done and pods > RSS_PODS:
                rss_runs()
                rss_done = True
            log(f"{pods} pods ...")
            for tree in trees if len(results) % 2 == 0 else list(reversed(trees)):
                results.append(measure_size(node, pods, workdir, cluster, tree, log))
            if not rss_done and pods == RSS_PODS:
                rss_runs()
                rss_done = True
        if not rss_done:
            rss_runs()
    finally:
        if node is not None:
            node.close()
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results, rss


def render(data: dict[str, Any]) -> str:
    results = [SizeResult(**r) for r in data["sizes"]]
    rss = [RssResult(**{**run, "samples": [tuple(x) for x in run["samples"]]}) for run in data.get("rss") or ()]
    poll_s = data["poll_s"]
    commits: dict[str, str] = data.get("trees") or {"this": ""}

    def tree(name: str) -> str:
        return f"{name} ({commits[name]})" if commits.get(name) else name

    # Sizes in order, this tree first at each; targets are this tree's.
    results.sort(key=lambda r: (r.pods, r.tree != "this"))
    rss.sort(key=lambda r: r.tree != "this")
    ours = [r for r in results if r.tree == "this"]
    rows = []
    for r in results:
        rows.append(
            f"| {r.pods} | {tree(r.tree)} | {r.containers} | {r.series:,} "
            f"| {r.median_cycle():.0f} | {r.p99_cycle():.0f} "
            f"| {r.cpu_ms_per_cycle:.0f} | {r.cpu_ms_per_cycle / (poll_s * 10):.1f} "
            f"| {statistics.median(r.plain_ms):.1f} / {_quantile(r.plain_ms, 0.99):.1f} "
            f"| {statistics.median(r.gzip_ms):.1f} / {_quantile(r.gzip_ms, 0.99):.1f} "
            f"| {r.body_bytes / 1e6:.1f} / {r.gzip_bytes / 1e6:.2f} | {r.rss_mib:.0f} "
            f"| {r.load_before:.1f} / {r.load_after:.1f} |"
        )
    receivers = sorted({rid for r in results for rid in r.receivers_ms})
    receiver_rows = [
        f"| {rid} | "
        + " | ".join(f"{r.receivers_ms[rid]:.1f}" if rid in r.receivers_ms else "-" for r in results)
        + " |"
        for rid in receivers
    ]
    notes = []
    for r in results:
        if r.labelled_pods < r.pods:
            notes.append(f"- {r.pods} pods, {r.tree}: only {r.labelled_pods} pods were labelled when the timing began")
        if r.overruns:
            notes.append(f"- {r.pods} pods, {r.tree}: {r.overruns} of {r.cycles} cycles longer than the poll interval")
    targets = []
    for r in ours:
        p50, gzip_p50 = statistics.median(r.plain_ms), statistics.median(r.gzip_ms)
        if r.pods == SCRAPE_TARGET_PODS:
            targets.append(
                f"- scrape p50 <= {SCRAPE_P50_TARGET_MS:g} ms at {SCRAPE_TARGET_PODS} pods (issue 2): "
                f"plain {p50:.2f} ms, gzip {gzip_p50:.2f} ms: "
                + ("met" if max(p50, gzip_p50) <= SCRAPE_P50_TARGET_MS else "**missed**")
            )
        targets.append(
            f"- {r.pods} pods: cycle p99 {r.p99_cycle():.0f} ms under the {poll_s * 1000:.0f} ms poll interval: "
            + ("met" if r.p99_cycle() < poll_s * 1000 else "**missed**")
        )
    slow = [
        f"{r.pods} pods {r.tree} {label} ({size / 1e3:.0f} kB body, p50 {statistics.median(samples):.0f} ms)"
        for r in results
        for label, samples, size in (("plain", r.plain_ms, r.body_bytes), ("gzip", r.gzip_ms, r.gzip_bytes))
        if statistics.median(samples) > SLOW_SCRAPE_MS and size < LOOPBACK_MSS
    ]
    if slow:
        targets.append(
            f"- scrapes of a body under one loopback segment ({LOOPBACK_MSS:,} bytes) slower than "
            f"{SLOW_SCRAPE_MS:g} ms: " + ", ".join(slow)
        )
    for r in ours:
        target = CPU_TARGET_MS.get(r.pods)
        if target is not None:
            targets.append(
                f"- CPU per cycle <= {target:g} ms at {r.pods} pods (issue 17): {r.cpu_ms_per_cycle:.0f} ms: "
                + ("met" if r.cpu_ms_per_cycle <= target else "**missed**")
            )
    rss_text = _render_rss(rss, data["rss_sample_s"], data["rss_warmup_s"], targets, tree)
    sizes = ", ".join(str(pods) for pods in sorted({r.pods for r in results}))
    side_by_side = ""
    if len(commits) > 1:
        side_by_side = (
            "\n- Before and after in one run: each size measured for this tree and the baseline one after the"
            "\n  other (alternating which goes first), the RSS runs of both at the same time; a baseline without"
            "\n  the in-cluster client reaches the API server through a kubeconfig (same token and CA)."
        )
    return f"""## Scale: cycle time, CPU, scrape latency at {sizes} pods; RSS over time

- Node: real kubepods-shaped cgroups (cgroup2, with v1 memory/blkio/cpu/cpuacct mirrors where the host has them),
  alternately 2 and 1 containers per pod, a live process per container waking once a second; the
  pods served by tests/fake_apiserver.py over HTTPS; the agent as its own process, in-cluster
  (service account token and CA), informer mode, {data["profile"]} profile, poll {poll_s:g} s,
  Prometheus exporter; Python {data["python"]}.
- Cycle: the agent's own timing of run_cycle (cgroup walk, every receiver, k8sattributes, render),
  read from its `kpod.agent` debug line; median and p99 of {data["cycles"]} consecutive cycles.  CPU per
  cycle: the agent's utime+stime (the process_cpu_seconds_total counter) over those cycles / cycles,
  with nothing scraping.  Scrapes: {data["scrapes"]} GETs of /metrics per encoding on one keep-alive
  loopback connection while the agent cycles.  Load: the load average before / after each size.
- Targets: issue 2's scrape p50 <= {SCRAPE_P50_TARGET_MS:g} ms at {SCRAPE_TARGET_PODS} pods, a cycle
  shorter than the poll interval; issue 17's CPU per cycle and RSS (this tree's figures).{side_by_side}

{HEADER}
{chr(10).join(rows)}

Per receiver, median of the last collection's duration over {data["status_cycles"]} cycles (ms of wall
clock, waiting for the GIL and the CPU included):

| receiver | {" | ".join(f"{r.pods} pods, {r.tree}" for r in results)} |
|---|{"---:|" * len(results)}
{chr(10).join(receiver_rows)}
{"".join(chr(10) + n for n in notes)}

Against the targets:

{chr(10).join(targets)}

{rss_text}"""


def _render_rss(
    runs: list[RssResult], sample_s: float, warmup_s: float, targets: list[str], tree: Callable[[str], str]
) -> str:
    """The RSS runs' table (one row per tree and discovery mode); appends this tree's targets to
    `targets`."""
    runs = [run for run in runs if run.samples]
    if not runs:
        return "RSS run: skipped (KPOD_BENCH_RSS_MINUTES=0)."
    rows, marks = [], []
    for run in runs:
        kib = [k for _, k in run.samples]
        warm = run.at(min(warmup_s, run.minutes * 60 / 2))
        end = kib[-1]
        rows.append(
            f"| {tree(run.tree)} | {run.mode} | {kib[0] / 1024:.1f} MiB | {warm / 1024:.1f} MiB | {end / 1024:.1f} MiB "
            f"| {max(kib) / 1024:.1f} MiB | {(end - warm) / 1024:+.2f} MiB | {run.cycles} "
            f"| {run.load_before:.1f} / {run.load_after:.1f} |"
        )
        marks.append(
            f"- {run.tree}, {run.mode}: "
            + " ".join(f"{t / 60:.0f}m:{k / 1024:.1f}" for t, k in run.samples if round(t) % 60 < sample_s / 2)
        )
        target = RSS_TARGET_MIB.get(run.mode)
        if target is not None and run.tree == "this":
            targets.append(
                f"- RSS <= {target:g} MiB at {run.pods} pods, {run.mode} mode (issue 17): "
                f"max {max(kib) / 1024:.1f} MiB over {run.minutes:g} min: "
                + ("met" if max(kib) / 1024 <= target else "**missed**")
            )
    minutes = ", ".join(sorted({f"{run.minutes:g}" for run in runs}))
    warm_s = min(warmup_s, runs[0].minutes * 30)
    return f"""### RSS over {minutes} minutes at {runs[0].pods} pods, by discovery mode

A fresh agent per tree and mode, all at once, in-cluster (service account token and CA), once every
pod is labelled: RSS sampled every {sample_s:g} s, one gzip scrape of /metrics before each sample.

| tree | mode | start (labelled) | after warm-up ({warm_s:.0f} s) | end | max | growth since warm-up | cycles | load |
|---|---|---:|---:|---:|---:|---:|---:|---|
{chr(10).join(rows)}

Per minute (MiB):

{chr(10).join(marks)}
"""


HEADER = (
    "| pods | tree | containers | series | cycle median ms | cycle p99 ms | CPU ms / cycle | % of a CPU at the poll "
    "| scrape plain p50 / p99 ms "
    "| scrape gzip p50 / p99 ms | body MB plain / gzip | RSS MiB | load before / after |\n"
    "|---:|---|---:|---:|---:|---:|---:|---:|---|---|---|---:|---|"
)


def measure(sizes: tuple[int, ...] = SIZES, rss_minutes: float | None = None, baseline: Path | None = None) -> Measured:
    if os.geteuid() != 0:
        raise NotMeasured("needs root (creates cgroups, loads BPF programs)")
    minutes = rss_minutes_from_env() if rss_minutes is None else rss_minutes
    baseline = baseline or sections.baseline_from_env()
    results, rss = run(sizes, minutes, baseline, log=lambda m: print(m, file=sys.stderr))
    command = ".venv/bin/python -m bench.scale"
    if sizes != SIZES:
        command += f" --sizes {','.join(map(str, sizes))}"
    if minutes != 10:
        command += f" --rss-minutes {minutes:g}"
    trees = {"this": _commit_of(REPO)}
    if baseline is not None:
        trees["baseline"] = _commit_of(baseline)
        command += f" --baseline <worktree of {trees['baseline']}>"
    data = {
        "trees": trees,
        "sizes": [asdict(r) for r in results],
        "rss": [asdict(run) for run in rss],
        "profile": full_profile(),
        "python": platform.python_version(),
        "poll_s": POLL_S,
        "cycles": CYCLES,
        "status_cycles": STATUS_CYCLES,
        "scrapes": SCRAPES,
        "rss_sample_s": RSS_SAMPLE_S,
        "rss_warmup_s": RSS_WARMUP_S,
    }
    return Measured(command, data)


def _commit_of(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def rss_minutes_from_env() -> float:
    return float(os.environ.get("KPOD_BENCH_RSS_MINUTES", "10"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--rss-minutes", type=float, default=rss_minutes_from_env())
    parser.add_argument(
        "--baseline", type=Path, help=f"a worktree of an older commit with its .venv (or ${sections.BASELINE_ENV})"
    )
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/scale.md")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so the finally blocks kill our processes and remove our cgroups.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    try:
        measured = measure(tuple(int(s) for s in args.sizes.split(",")), args.rss_minutes, args.baseline)
    except NotMeasured as reason:
        raise SystemExit(f"bench.scale: {reason}") from None
    if args.write:
        print(sections.write("scale", measured).read_text())
    else:
        print(render(measured.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
