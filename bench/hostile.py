"""The bounds of docs/SECURITY.md under attack, measured on real agent processes.

    .venv/bin/python -m bench.hostile

- the metrics port, the agent in a 256 MiB memory cgroup with a bearer token: peak RSS growth
  under header floods; scrape latency idle and, side by side in the same run, under 3000
  trickling clients; the agent's threads meanwhile;
- hung FUSE mounts (tests/hung_fuse.py): the statfs worker's threads and memory before and with
  five hung calls, the filesystem collection's duration, the time SIGTERM takes to end the agent;
- a pod with 3000 tmpfs mounts and 500 interfaces: its series, the measurements per cycle;
- scrape latency of the agent's server beside the standard library's threaded server it
  replaced (bench/core.py's scrape_latency), serving the same bytes in one run.

The attacks are the tests' (tests/hostile.py, tests/test_hostile_*.py); this module measures
what the tests only bound.  Needs root (cgroups, namespaces, mounts).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agent_proc import AgentProcess, free_port, rss_kib, thread_count  # noqa: E402
from hostile import (  # noqa: E402
    BIG_HEAD,
    MANY_MOUNTS,
    TOKEN,
    Scratch,
    agent_config,
    flood,
    oom_kills,
    pod_cgroups,
    port_agent,
    run,
    slow_clients,
    status_kib,
    trickle,
    truncated_answered,
)

from bench.core import scrape_latency  # noqa: E402
from bench.sections import Measured, NotMeasured  # noqa: E402

HUNG_FUSE = str(REPO / "tests" / "hung_fuse.py")


def _scrape_ms(agent: AgentProcess) -> float:
    began = time.perf_counter()
    agent.get("/metrics", {"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    return (time.perf_counter() - began) * 1000


def _value(agent: AgentProcess, name: str) -> float:
    return sum(x.value for x in agent.metrics() if x.name == name)


def port(workdir: Path) -> dict[str, Any]:
    s = Scratch()
    try:
        agent = port_agent(s, workdir)
        memcg = Path(agent.prefix[-1])
        time.sleep(1.0)
        idle = [_scrape_ms(agent) for _ in range(50)]
        rss_before = status_kib(agent.pid, "VmRSS")
        hwm_before = status_kib(agent.pid, "VmHWM")
        for _ in range(3):
            flood(agent.port, 32)
        flood(agent.port, 64, hold_s=2.0)
        growth = status_kib(agent.pid, "VmHWM") - max(rss_before, hwm_before)
        threads_before = thread_count(agent.pid)
        clients = slow_clients(agent.port)
        s.defer("attack sockets", lambda: [c.close() for c in clients])
        under, failures, most_threads, step = [], 0, threads_before, 0
        began = time.monotonic()
        while time.monotonic() - began < 12.0:
            trickle(clients, step)
            step += 1
            try:
                under.append(_scrape_ms(agent))
            except OSError:
                failures += 1
            most_threads = max(most_threads, thread_count(agent.pid))
            time.sleep(0.2)
        answered = truncated_answered(clients)
        return {
            "memory_limit_mib": 256, "head_mb": round(len(BIG_HEAD) / 1e6, 1),
            "flood_requests": 96, "flood_held": 64, "peak_rss_growth_kib": growth, "rss_before_kib": rss_before,
            "oom_kills": oom_kills(memcg), "alive": agent.alive(),
            "slow_clients": len(clients), "scrapes_under_attack": len(under), "scrape_failures": failures,
            "idle_p50_ms": statistics.median(idle), "idle_max_ms": max(idle),
            "attack_p50_ms": statistics.median(under) if under else None,
            "attack_max_ms": max(under) if under else None,
            "threads_before": threads_before, "threads_most": most_threads, "truncated_answered": answered,
        }  # fmt: skip
    finally:
        s.close()


def _pod(s: Scratch, cgroup: Path, directories: list[Path]) -> Any:
    proc = s.spawn([sys.executable, HUNG_FUSE, *map(str, directories)], cgroup)
    if proc.stdout is None or proc.stdout.readline().strip() != "ready":
        raise RuntimeError("hung_fuse.py did not start")
    return proc


def mounts(workdir: Path) -> dict[str, Any]:
    s = Scratch()
    try:
        base, pods = pod_cgroups(s, pods=3)
        (a,), (b,), (c,) = pods
        _pod(s, b, [s.mkdir(workdir / "b-ok")])
        port_number = free_port()
        # 1 s cycles: a busy machine must not make the 300 ms default cycle the thing measured.
        config = agent_config(base, port_number, {"filesystem": "{max_stuck_mounts_per_pod: 3}"}, poll="1s")
        agent = AgentProcess(config, workdir, port_number).start()
        s.defer(f"agent {agent.pid}", agent.stop)
        agent.wait_ready()
        agent.wait_until(lambda: _value(agent, "kpod_fs_capacity_bytes") > 0, 30, "measuring")
        worker = agent.status()["receivers"]["filesystem"]["details"]["statfs_worker_pid"]
        time.sleep(1.0)
        idle = {"threads": thread_count(worker), "rss_kib": rss_kib(worker),
                "collect_ms": agent.status()["receivers"]["filesystem"]["last_duration_seconds"] * 1000}  # fmt: skip
        hung_pods = [
            _pod(s, a, [s.mkdir(workdir / "a-ok"), *(s.mkdir(workdir / f"a-hang{i}") for i in range(2))]),
            _pod(s, c, [s.mkdir(workdir / "c-ok"), *(s.mkdir(workdir / f"c-hang{i}") for i in range(6))]),
        ]
        agent.wait_until(lambda: _value(agent, "kpod_filesystem_stuck_mounts") == 5, 30, "five stuck mounts")
        time.sleep(1.0)
        durations = []
        for _ in range(10):
            durations.append(agent.status()["receivers"]["filesystem"]["last_duration_seconds"] * 1000)
            time.sleep(0.3)
        hung = {"threads": thread_count(worker), "rss_kib": rss_kib(worker), "collect_ms": statistics.median(durations),
                "timeouts": _value(agent, "kpod_filesystem_probe_timeouts_total")}  # fmt: skip
        began = time.monotonic()
        code = agent.stop(timeout_s=5.0)
        exit_s = time.monotonic() - began
        for proc in hung_pods:
            proc.stdin.close()
            proc.wait(10)
        waited = time.monotonic()
        while os.path.exists(f"/proc/{worker}") and time.monotonic() - waited < 10:
            time.sleep(0.05)
        return {"idle": idle, "hung": hung, "hung_calls": 5, "exit_code": code, "exit_s": exit_s,
                "worker_gone_after_pods_s": time.monotonic() - waited}  # fmt: skip
    finally:
        s.close()


def caps(workdir: Path) -> dict[str, Any]:
    s = Scratch()
    try:
        base, ((hostile,),) = pod_cgroups(s, pods=1)
        ns = s.netns()
        batch = workdir / "links.batch"
        batch.write_text("".join(f"link add v{i}a type veth peer name v{i}b\n" for i in range(250)))
        run("ip", "-n", ns, "-batch", str(batch))
        mounts_dir = workdir / "mounts"
        mounts_dir.mkdir()
        proc = s.spawn(["ip", "netns", "exec", ns, sys.executable, "-c", MANY_MOUNTS, str(mounts_dir), "3000"],
                       hostile)  # fmt: skip
        if proc.stdout is None or proc.stdout.readline().strip() != "ready":
            raise RuntimeError("the 3000-mount pod did not start")
        port_number = free_port()
        config = agent_config(base, port_number, {"filesystem": "", "net_iface": ""}, poll="1s")
        agent = AgentProcess(config, workdir, port_number).start()
        s.defer(f"agent {agent.pid}", agent.stop)
        agent.wait_ready()
        agent.wait_until(lambda: _value(agent, "kpod_fs_capacity_bytes") > 0, 30, "measuring")
        time.sleep(3.0)
        samples = agent.metrics()
        status = agent.status()["receivers"]
        return {
            "mounts": 3000, "interfaces": 500,
            "fs_series": sum(1 for x in samples if x.name.startswith("kpod_fs_")),
            "net_series": sum(1 for x in samples if x.name.startswith("kpod_net_iface_")),
            "probes_per_cycle": status["filesystem"]["details"]["last_cycle"]["probes"],
            "fs_collect_ms": status["filesystem"]["last_duration_seconds"] * 1000,
            "net_collect_ms": status["net_iface"]["last_duration_seconds"] * 1000,
        }  # fmt: skip
    finally:
        s.close()


def measure() -> Measured:
    if os.geteuid() != 0:
        raise NotMeasured("needs root (cgroups, namespaces, mounts)")
    with tempfile.TemporaryDirectory(prefix="kpod-bench-hostile-") as tmp:
        directories = [Path(tmp, name) for name in ("port", "mounts", "caps")]
        for directory in directories:
            directory.mkdir()
        data = {"port": port(directories[0]), "mounts": mounts(directories[1]), "caps": caps(directories[2]),
                "scrape": scrape_latency()}  # fmt: skip
    return Measured(".venv/bin/python -m bench.hostile", data)


def render(data: dict[str, Any]) -> str:
    p, m, c = data["port"], data["mounts"], data["caps"]
    rows = [
        ("header flood: peak RSS growth (VmHWM) of the agent in a "
         f"{p['memory_limit_mib']} MiB memory cgroup, {p['flood_requests']} requests of {p['head_mb']} MB "
         f"then {p['flood_held']} held open", f"+{p['peak_rss_growth_kib']} KiB",
         f"RSS before {p['rss_before_kib'] / 1024:.1f} MiB, {p['oom_kills']} OOM kills, alive: {p['alive']}"),
        ("scrape latency idle, p50 / max", f"{p['idle_p50_ms']:.2f} / {p['idle_max_ms']:.2f} ms", "50 scrapes"),
        (f"scrape latency under {p['slow_clients']} trickling clients, p50 / max",
         f"{p['attack_p50_ms']:.2f} / {p['attack_max_ms']:.2f} ms",
         f"{p['scrapes_under_attack']} scrapes, {p['scrape_failures']} failed"),
        ("the agent's threads before / at most under the slow clients", f"{p['threads_before']} / {p['threads_most']}",
         f"truncated requests answered: {p['truncated_answered']}"),
        ("statfs worker: threads / RSS, nothing hung",
         f"{m['idle']['threads']} / {m['idle']['rss_kib'] / 1024:.1f} MiB",
         f"filesystem collection {m['idle']['collect_ms']:.1f} ms"),
        (f"statfs worker: threads / RSS, {m['hung_calls']} calls hung",
         f"{m['hung']['threads']} / {m['hung']['rss_kib'] / 1024:.1f} MiB",
         f"filesystem collection {m['hung']['collect_ms']:.1f} ms (median), {m['hung']['timeouts']:.0f} timeouts"),
        ("SIGTERM to exit, calls still hung", f"{m['exit_s']:.2f} s", f"exit code {m['exit_code']}; the worker "
         f"gone {m['worker_gone_after_pods_s']:.2f} s after the pods ended"),
        (f"a pod with {c['mounts']} mounts and {c['interfaces']} interfaces: its series (filesystem / interfaces)",
         f"{c['fs_series']} / {c['net_series']}", f"{c['probes_per_cycle']} measurements per cycle; collection "
         f"{c['fs_collect_ms']:.1f} / {c['net_collect_ms']:.1f} ms"),
    ]  # fmt: skip
    scrape = data.get("scrape")
    if scrape is not None:  # bench/core.py's scrape_latency: the server before issue 19 beside this one
        rows += [
            (f"scrape latency, {label}, 110-pod exposition: this agent's server / the standard library's threaded "
             "server it replaced, p50", f"{scrape[f'{label}_p50_ms']:.2f} / {scrape[f'stdlib_{label}_p50_ms']:.2f} ms",
             f"p99 {scrape[f'{label}_p99_ms']:.2f} / {scrape[f'stdlib_{label}_p99_ms']:.2f} ms; "
             f"{scrape['scrapes']:.0f} GETs each, the two servers taking turns in rounds (bench/core.py)")
            for label in ("plain", "gzip")
        ]  # fmt: skip
    table = ["| figure | measured | context |", "|---|---|---|"]
    table += [f"| {name} | {value} | {context} |" for name, value, context in rows]
    return "## Hostile pods and clients: the bounds under attack\n\n" + "\n".join(table) + "\n"


if __name__ == "__main__":
    print(json.dumps(measure().data, indent=1))
