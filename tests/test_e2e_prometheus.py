"""End to end as an operator meets it: `kpod-metrics run` scraped by a real Prometheus server.

A kubepods-shaped cgroup tree (below a unique prefix of the cgroup2 mount, so the agent sees
only our cgroups) holds three pods of two containers each, with workloads whose effect the
kernel itself tells us:

    client  sender    TCP: an odd number of bytes to server/receiver (send() return values)
            syscalls  the compiled C workload of test_bpf_syscall.py (exact syscall counts)
    server  receiver  TCP: receives them (recv() return values)
            faults    major faults on an mmap of a file dropped from the page cache, then
                      sleeps (majflt and context switches from /proc/<pid>/{stat,status})
    batch   hogs      two CPU hogs pinned to one CPU (run-queue contention)
            oom       a memory hog OOM-killed by its memory limit (v1 memcg on a hybrid host,
                      memory.max on pure cgroup2), counted by the kernel's own oom_kill

The fake API server serves these pods (containerStatuses carry the scopes' container ids);
the agent runs as its own process in informer mode (comprehensive profile, poll 1 s) with two
Prometheus exporters: the default one (histograms: both) and one with `histograms: classic`.  The
Debian `prometheus` binary (2.42, --enable-feature=native-histograms) scrapes both every second
into its own temporary TSDB: job `kpod` gets the protobuf exposition and stores native
histograms, job `classic` gets OpenMetrics and stores `_bucket` series, from the same cycles of
the same agent.  Every assertion is a PromQL query against Prometheus's HTTP API, compared with
the ground truth, and the native histograms with the classic ones.
Everything started here (workloads, agent, Prometheus) is killed by PID and every cgroup we
made is removed, also when an assertion fails.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from agent_proc import AgentProcess, clean_env
from fake_apiserver import FakeApiServer
from helpers import free_port, require_tools
from kernel_util import (
    FAULT_FILE_SIZE,
    GO_DELAY,
    KUBELET_CONTROLLERS,
    M_FAIL,
    N_OK,
    ODD_BYTES,
    SYSCALL_WORKLOAD_C,
    Z_EOF,
    Workload,
    cgroup2_root,
    cgroup_tree,
    compile_c,
    faults_code,
    finish_syscall_workload,
    kernel_test,
    proc_status_switches,
    pure_cgroup2_memory,
    started_syscall_workload,
    stat_majflt,
    transfer,
    uncached_file,
    wait_blocked,
    workloads,
)
from prometheus_server import OomCgroup, Prometheus, build_pod, single

from kpod.kernel.syscalls import default_tracked

NAMESPACE = "e2e"
NODE = "node-e2e"
JOB = "kpod"  # the default exporter (histograms: both): native histograms in Prometheus
CLASSIC_JOB = "classic"  # the exporter with histograms: classic
HOG_SECONDS_BEFORE_QUANTILE = 33.0  # the [30s] rate window lies entirely inside the contention
RUNQ_P99 = (
    "histogram_quantile(0.99, sum by (le, pod) "
    f'(rate(kpod_cpu_runqueue_latency_seconds_bucket{{job="{CLASSIC_JOB}"}}[30s])))'
)
RUNQ_P99_NATIVE = (
    f'histogram_quantile(0.99, sum by (pod) (rate(kpod_cpu_runqueue_latency_seconds{{job="{JOB}"}}[30s])))'
)
# The histograms compared native against classic: (metric, pod, container, extra matchers).
HISTOGRAMS = (
    ("kpod_cpu_runqueue_latency_seconds", "batch", "hogs", ""),
    ("kpod_net_tcp_rtt_seconds", "client", "sender", ""),
    ("kpod_syscall_latency_seconds", "client", "syscalls", ',syscall="getppid"'),
    ("kpod_syscall_latency_seconds", "client", "syscalls", ',syscall="read"'),
)
HISTOGRAM_NAMES = {metric for metric, _, _, _ in HISTOGRAMS}
# A histogram's classic series: one per finite bound (26, the kernel's slots), +Inf, _sum, _count.
CLASSIC_SERIES_PER_HISTOGRAM = 29

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    *kernel_test,
]


def not_histograms(series: list[dict[str, str]]) -> set[tuple[tuple[str, str], ...]]:
    """The label sets of the series that are not histograms (nor their _bucket/_sum/_count),
    without job and instance."""
    kept = set()
    for one in series:
        name = one["__name__"]
        if name in HISTOGRAM_NAMES or name.rsplit("_", 1)[0] in HISTOGRAM_NAMES:
            continue
        kept.add(tuple(sorted((k, v) for k, v in one.items() if k not in ("job", "instance"))))
    return kept


def within_one_bucket(a: float, b: float) -> bool:
    """Two quantiles of the same data, both histograms with power-of-two buckets: at most one
    bucket apart (a factor of two)."""
    return a > 0 and b > 0 and abs(math.log2(a / b)) <= 1


# ------------------------------------------------------------------------------ pods


def proc_file(pid: int, name: str) -> str:
    with open(f"/proc/{pid}/{name}") as handle:
        return handle.read()


@dataclass
class Truth:
    """Per-process counters before "go" and once blocked again after the work."""

    pid: int
    switches: int = 0
    majflt: int = 0

    @classmethod
    def before(cls, pid: int) -> Truth:
        return cls(pid, proc_status_switches(proc_file(pid, "status")), stat_majflt(proc_file(pid, "stat")))

    def delta(self) -> Truth:
        wait_blocked(self.pid)
        now = Truth.before(self.pid)
        return Truth(self.pid, now.switches - self.switches, now.majflt - self.majflt)


# Nice 10: the two hogs compete with each other as much as ever (that is the contention we
# measure), but yield to the agent and Prometheus when those land on their CPU (CI has 2 CPUs).
HOG = "os.nice(10)\nwhile True:\n    pass\n"


def agent_config(cgroup_root: str, kubeconfig: str, port: int, classic_port: int) -> str:
    tracked = [*default_tracked(), "getppid"]  # the profile's set plus the workload's marker syscall
    return (
        f"kpod:\n  profile: comprehensive\n  poll_interval: 1s\n  node_name: {NODE}\n"
        f"  discovery: {{mode: informer}}\n  cgroup: {{root: '{cgroup_root}', gone_retention: 2s}}\n"
        f"  filter: {{exclude_namespaces: []}}\n  syscall: {{tracked_syscalls: [{', '.join(tracked)}]}}\n"
        f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}', wait_for_sync: 5s,"
        f" backoff_initial: 200ms, backoff_max: 2s}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        f"  prometheus/classic: {{endpoint: '127.0.0.1:{classic_port}', histograms: classic}}\n"
        "service: {pipelines: {metrics: {exporters: [prometheus, prometheus/classic]}}}\n"
    )


# ------------------------------------------------------------------------------ the test


def test_prometheus_scrapes_ground_truth(tmp_path: Path) -> None:
    require_tools("prometheus")
    began = time.monotonic()
    root = cgroup2_root()
    prefix = f"kpod-e2e-prom-{uuid.uuid4().hex[:10]}"
    # v2: memory.max needs the controller
    controllers = KUBELET_CONTROLLERS if pure_cgroup2_memory() else ()
    binary = compile_c(SYSCALL_WORKLOAD_C, tmp_path, "workload")
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()

    with contextlib.ExitStack() as stack:
        # Unwound in reverse: Prometheus, agent and workloads die before cgroups are removed,
        # and the TSDB (megabytes, not worth keeping) goes last.
        stack.callback(shutil.rmtree, prom_dir, ignore_errors=True)
        api = stack.enter_context(FakeApiServer())
        client = build_pod(stack.enter_context(cgroup_tree(root, controllers)), prefix, "client",
                           ["sender", "syscalls"], NAMESPACE, NODE, JOB)  # fmt: skip
        server = build_pod(stack.enter_context(cgroup_tree(root, controllers)), prefix, "server",
                           ["receiver", "faults"], NAMESPACE, NODE, JOB)  # fmt: skip
        batch = build_pod(stack.enter_context(cgroup_tree(root, controllers)), prefix, "batch", ["hogs", "oom"],
                          NAMESPACE, NODE, JOB)  # fmt: skip
        oom = OomCgroup.make(stack, batch.containers["oom"].container_dir)
        data = stack.enter_context(uncached_file(FAULT_FILE_SIZE))
        procs = stack.enter_context(workloads())
        server_procs: list[Workload] = []
        for pod in (client, server, batch):
            api.add_pod(pod.api_object())

        agent_port, classic_port = free_port(), free_port()
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        agent = AgentProcess(agent_config(f"{root}/{prefix}", kubeconfig, agent_port, classic_port), tmp_path,
                             agent_port, env=clean_env())  # fmt: skip
        agent.start()
        stack.callback(agent.stop)  # SIGTERM by PID, SIGKILL if it lingers
        agent.wait_ready(60)
        receivers = agent.status()["receivers"]
        not_running = {name: r for name, r in receivers.items() if r["state"] != "running"}
        assert not not_running, f"receivers not running: {not_running}\n{agent.log()[-3000:]}"

        prom = Prometheus(prom_dir, {JOB: f"127.0.0.1:{agent_port}", CLASSIC_JOB: f"127.0.0.1:{classic_port}"},
                          native_histograms=True)  # fmt: skip
        stack.callback(prom.stop)  # before start(): a Prometheus that never gets ready dies too
        prom.start()
        prom_started = time.monotonic()

        # --- CPU contention: two hogs pinned to one CPU in batch/hogs, running until the end.
        cpu = min(os.sched_getaffinity(0))
        hogs = [Workload(HOG, cpu=cpu) for _ in range(2)]
        procs.extend(hogs)
        for hog in hogs:
            batch.tree.move(hog.pid, batch.containers["hogs"].container_dir)
        for hog in hogs:
            hog.go()
        hogs_started = time.monotonic()

        # --- TCP: client/sender -> server/receiver, an odd byte count.
        a, b = transfer(client.tree, procs, client.containers["sender"], server.containers["receiver"])
        server_procs.append(b)
        a.send("send")
        received = json.loads(b.readline())["received"]
        sent = json.loads(a.readline())["sent"]
        assert sent == ODD_BYTES and received == ODD_BYTES, (sent, received)

        # --- Syscalls: the C workload in client/syscalls.
        syscall_proc = stack.enter_context(started_syscall_workload(binary))
        client.tree.move(syscall_proc.pid, client.containers["syscalls"].container_dir)
        syscall_truth = Truth.before(syscall_proc.pid)
        time.sleep(GO_DELAY)
        finish_syscall_workload(syscall_proc)
        syscall_switches = syscall_truth.delta().switches

        # --- Major faults and context switches: server/faults.
        faulter = Workload(faults_code(data))
        procs.append(faulter)
        server_procs.append(faulter)
        server.tree.move(faulter.pid, server.containers["faults"].container_dir)
        fault_truth = Truth.before(faulter.pid)
        faulter.go()
        assert faulter.readline() == "done"
        faults = fault_truth.delta()
        # Most pages faulted one by one (none would if the file had stayed in the page cache).
        assert faults.majflt >= FAULT_FILE_SIZE // 4096 // 2, faults
        assert faults.switches >= 1000, faults  # most sleeps switched out

        # --- One OOM kill: batch/oom.
        oom.kill_a_hog(procs, batch, "oom")

        # ------------------------------------------------ what Prometheus has, against the truth
        def equals(want: float) -> Callable[[list[tuple[dict[str, str], float]]], bool]:
            return lambda result: single(result) == want

        def exact(expr: str, want: float) -> None:
            result = prom.wait_for(expr, equals(want))
            assert single(result) == want, f"{expr}: Prometheus has {result}, the kernel says {want}"

        sent_expr = "kpod_net_tcp_bytes_sent_total" + client.selector()
        exact(sent_expr, sent)
        # Exactly the sender's series, with the pod's labels from the API server.
        ((labels, _),) = prom.query(sent_expr)
        assert {k: labels.get(k) for k in ("namespace", "pod", "container", "node", "job")} == {
            "namespace": NAMESPACE, "pod": "client", "container": "sender", "node": NODE, "job": JOB}  # fmt: skip
        exact("kpod_net_tcp_bytes_received_total" + server.selector(), received)
        assert single(prom.query("kpod_net_tcp_bytes_received_total" + client.selector())) == 0
        assert single(prom.query("kpod_net_tcp_bytes_sent_total" + server.selector())) == 0
        exact("kpod_net_tcp_connections_total" + client.selector("sender", direction="active"), 1)
        exact("kpod_net_tcp_connections_total" + server.selector("receiver", direction="passive"), 1)

        # The workload's exact counts (see test_bpf_syscall.py): M reads fail with EBADF, Z read
        # EOF; getuid is not tracked.  The read that waited for "go" began before the workload
        # was moved into its pod: in Kubernetes modes a call entered outside any pod is not
        # counted (only pods' tasks get a start stamp).
        exact("kpod_syscall_count_total" + client.selector("syscalls", syscall="getppid"), N_OK)
        exact("kpod_syscall_count_total" + client.selector("syscalls", syscall="read"), M_FAIL + Z_EOF)
        exact("kpod_syscall_errors_total" + client.selector("syscalls", syscall="read"), M_FAIL)
        exact("kpod_syscall_errors_total" + client.selector("syscalls", syscall="getppid"), 0)
        assert not prom.query("kpod_syscall_count_total" + client.selector("syscalls", syscall="getuid"))

        exact("kpod_mem_major_page_faults_total" + server.selector("faults"), faults.majflt)
        # One kill, in the batch pod's oom container; every other container has the series at 0.
        exact(f'sum(kpod_mem_oom_kills_total{{job="{JOB}"}})', 1)
        ((oom_labels, _),) = prom.query(f'kpod_mem_oom_kills_total{{job="{JOB}"}} > 0')
        assert (oom_labels["pod"], oom_labels["container"]) == ("batch", "oom"), oom_labels
        zero = prom.query(f'kpod_mem_oom_kills_total{{job="{JOB}"}} == 0')
        assert {labels["pod"] for labels, _ in zero} >= {"client", "server"}

        switches_seen: dict[str, tuple[int, float]] = {}  # container -> (/proc, Prometheus), for the log
        for pod, container, truth in ((server, "faults", faults.switches), (client, "syscalls", syscall_switches)):
            expr = "kpod_cpu_context_switches_total" + pod.selector(container)
            result = prom.wait_for(expr, lambda r, truth=truth: (single(r) or 0) >= truth)
            switches = single(result)
            assert switches is not None and switches >= truth, f"{expr}: {result}, /proc says {truth}"
            # Its own switches, not several times as many (a cgroup's count is its tasks').
            assert switches <= truth * 1.5 + 50, (expr, switches, truth)
            switches_seen[container] = (truth, switches)

        # ------------------------------------------------ a deleted pod's series go stale
        # (once kpod.cgroup.gone_retention, 2 s here, has passed for its labels and cgroups)
        assert prom.query(f'count({{pod="server",namespace="{NAMESPACE}"}})'), "server had series"
        for proc in server_procs:
            proc.stop()
        api.delete_pod(server.uid)
        server.tree.cleanup()
        gone = prom.wait_for(f'{{pod="server",namespace="{NAMESPACE}"}}', lambda r: not r, timeout_s=15)
        assert not gone, f"series of the deleted pod are not stale: {gone[:5]}"
        assert prom.query('count({pod="client"})') and prom.query('count({pod="batch"})'), "others stay"
        assert prom.value(f'kpod_pods_discovered{{job="{JOB}"}}') == 2

        # ------------------------------------------------ run-queue latency of the contended pod
        time.sleep(max(0.0, hogs_started + HOG_SECONDS_BEFORE_QUANTILE - time.monotonic()))
        result = prom.wait_for(RUNQ_P99, lambda r: any(m.get("pod") == "batch" and math.isfinite(v) for m, v in r),
                               timeout_s=10)  # fmt: skip
        p99 = {m.get("pod"): v for m, v in result}.get("batch")
        assert p99 is not None and math.isfinite(p99) and p99 > 0, f"{RUNQ_P99}: {result}"

        # ------------------------------------------------ native histograms against the classic ones
        # During the contention: p99 over the same 30 s, from the native and the classic series.
        result = prom.wait_for(RUNQ_P99_NATIVE, lambda r: any(m.get("pod") == "batch" for m, _ in r), timeout_s=10)
        p99_native = {m.get("pod"): v for m, v in result}.get("batch")
        assert p99_native is not None and within_one_bucket(p99_native, p99), (p99_native, p99)
        for hog in hogs:  # no more run-queue events in batch/hogs: its histogram stops changing
            hog.stop()
        compared = {}
        for metric, pod_name, container, extra in HISTOGRAMS:
            matchers = f'namespace="{NAMESPACE}",pod="{pod_name}",container="{container}"{extra}'
            native = f'{metric}{{job="{JOB}",{matchers}}}'
            classic = f'{{job="{CLASSIC_JOB}",{matchers}}}'
            pairs = {
                f"histogram_count({native})": f"{metric}_count{classic}",
                f"histogram_sum({native})": f"{metric}_sum{classic}",
                f"histogram_quantile(0.99, {native})":
                    f"histogram_quantile(0.99, sum by (le) ({metric}_bucket{classic}))",
            }
            # Both jobs scrape the same cycles, at their own moments: wait for a cycle both have.
            deadline = time.monotonic() + 15
            while True:
                values = {n: (single(prom.query(n)), single(prom.query(c))) for n, c in pairs.items()}
                (count_n, count_c), (sum_n, sum_c), (q_n, q_c) = values.values()
                if (count_n == count_c and sum_n == sum_c) or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert count_n is not None and count_n > 0 and count_n == count_c, (native, values)
            assert sum_n == sum_c, (native, values)
            assert q_n is not None and q_c is not None and within_one_bucket(q_n, q_c), (native, values)
            compared[f"{metric}{{{pod_name}/{container}{extra}}}"] = (count_n, q_n, q_c)

        # Series per pod: a histogram is one series natively, 29 classically; nothing else differs.
        series_counts = {}
        for pod_name in ("client", "batch"):
            native_series = prom.series(f'{{job="{JOB}",namespace="{NAMESPACE}",pod="{pod_name}"}}')
            classic_series = prom.series(f'{{job="{CLASSIC_JOB}",namespace="{NAMESPACE}",pod="{pod_name}"}}')
            native_hist = [one for one in native_series if one["__name__"] in HISTOGRAM_NAMES]
            assert len(native_hist) >= 2, native_hist
            assert len(classic_series) - len(native_series) == (CLASSIC_SERIES_PER_HISTOGRAM - 1) * len(native_hist)
            assert not_histograms(native_series) == not_histograms(classic_series)
            series_counts[pod_name] = (len(classic_series), len(native_series))

        # ------------------------------------------------ the target itself
        assert prom.value(f'up{{job="{JOB}"}}') == 1
        elapsed = time.monotonic() - prom_started
        window = f"{math.ceil(elapsed) + 5}s"  # everything Prometheus scraped
        scrapes = prom.value(f'count_over_time(up{{job="{JOB}"}}[{window}])')
        # Every second, as configured (the first one comes up to an interval late).
        assert scrapes is not None and scrapes >= 0.8 * elapsed - 2, (scrapes, elapsed)
        assert prom.value(f'min_over_time(up{{job="{JOB}"}}[{window}])') == 1, "a scrape failed"
        slowest = prom.value(f'max_over_time(scrape_duration_seconds{{job="{JOB}"}}[{window}])')
        # Every scrape ended within scrape_timeout (up == 1 above); how fast is a figure for the
        # benchmarks, printed here, not asserted (a busy machine is not a failure).
        assert slowest is not None
        samples = prom.value(f'max_over_time(scrape_samples_scraped{{job="{JOB}"}}[{window}])')
        print(
            f"\ne2e-prometheus: tcp {sent} B, getppid {N_OK}, read {M_FAIL + Z_EOF} ({M_FAIL} errors), "
            f"majflt {faults.majflt}, context switches (/proc, Prometheus) {switches_seen}, oom 1; "
            f"p99 run-queue latency of batch {p99 * 1e3:.3f} ms (native {p99_native * 1e3:.3f} ms); native vs "
            f"classic (count, p99 native, p99 classic) {compared}; series per pod (classic, native) "
            f"{series_counts}; slowest scrape "
            f"{slowest * 1e3:.1f} ms over {scrapes:.0f} scrapes of up to {samples:.0f} samples, "
            f"{time.monotonic() - began:.0f} s"
        )

        rc = agent.stop()
        assert rc == 0, f"agent exit status {rc}:\n{agent.log()[-3000:]}"
