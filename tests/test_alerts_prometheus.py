"""The shipped alerting rules, loaded by a real Prometheus that scrapes the real agent.

Prometheus (the Debian binary) loads deploy/helm/kpod-metrics/files/kpod-metrics.rules.yaml as it
is and scrapes the agent (its own process: the standard profile, informer discovery against the
fake API server, only our kubepods tree) every 2 s, evaluating the rules every 2 s.  The scrape
job is called "node-agents": the rules must not depend on the job's name.

1. An idle node: pods whose processes block on a read, a tmpfs volume far from full.  For IDLE_S
   no alert is pending or firing (ALERTS has no sample), every rule evaluates without error, and
   the recording rules the alerts read have data (the silence is not an empty query).
2. A full filesystem: the files pod's two containers share one tmpfs (mounted in a private mount
   namespace both live in), which is filled up: KpodFilesystemFull's expression has exactly one
   element, naming that tmpfs (its device number, fstype tmpfs), not one per container.
3. An OOM kill in batch/oom, whose series was there at 0 before, and whose cgroup is removed
   right after the kill (as a runtime removes a dead container's): KpodOOMKill fires (it has no
   `for:`), for that container only.
4. The agent stops: KpodAgentDown's expression is true for its target.
5. The agent starts again on the same port with map_max_entries 4, and a new pod has six
   containers whose processes context-switch (sleep 50 ms in a loop): sched_cgroups, one entry
   per cgroup that switches, fills (4 entries, failed inserts).  KpodBpfMapNearlyFull's
   expression names it, and every map it names is a hash map, none an array (whose slots are
   all preallocated).

The `for:` durations (5 to 15 minutes) are not waited for live.  Instead the series Prometheus
scraped are replayed through `promtool test rules`, one scrape per minute: values as the agent
emitted them, absences as absences (a series that went away is marked stale).  There every alert
goes through its `for:`: nothing fires at the end of the idle phase although every `for:` has
passed on the idle series, and each event's alert fires with its labels.  The replay's copy of
the rules differs from the shipped file only in having no annotations (their texts are checked
by tests/promtool/kpod-metrics.rules.test.yaml); the rules it tests are all time-scale free
(gauges against thresholds, increase() > 0, up == 0), so one scrape per minute changes nothing
but the clock.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_proc import AgentProcess, clean_env
from fake_apiserver import FakeApiServer
from helpers import free_port, require_tools
from kernel_util import (
    KUBELET_CONTROLLERS,
    Workload,
    cgroup2_root,
    cgroup_tree,
    kernel_test,
    pure_cgroup2_memory,
    workloads,
)
from prometheus_server import KubePod, OomCgroup, Prometheus, Vector, build_pod

REPO = Path(__file__).resolve().parents[1]
RULES = REPO / "deploy" / "helm" / "kpod-metrics" / "files" / "kpod-metrics.rules.yaml"
NAMESPACE = "alerts"
NODE = "node-alerts"
JOB = "node-agents"
INTERVAL_S = 2
IDLE_S = 150  # a few minutes; replayed one scrape per minute it outlasts every for: (15m at most)
TMPFS_SIZE = 1 << 20
HELD_S = 50  # how long each event's state is kept: replayed, longer than its alert's for:

pytestmark = [pytest.mark.e2e, pytest.mark.slow, *kernel_test]

BLOCKED = "sys.stdin.readline()\n"  # an idle container: its process sleeps in read()
SWITCHING = "while True:\n    time.sleep(0.05)\n"  # context-switches 20 times a second, barely any CPU
BUSY_CONTAINERS = [f"c{i}" for i in range(6)]  # more than map_max_entries (4) in step 5


def rule_exprs() -> dict[str, str]:
    return {r["alert"]: r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]
            if "alert" in r}  # fmt: skip


def agent_config(cgroup_root: str, kubeconfig: str, port: int, map_max_entries: int = 10240) -> str:
    return (
        f"kpod:\n  profile: standard\n  poll_interval: 1s\n  node_name: {NODE}\n"
        f"  discovery: {{mode: informer}}\n  cgroup: {{root: '{cgroup_root}'}}\n"
        f"  filter: {{exclude_namespaces: []}}\n  bpf: {{map_max_entries: {map_max_entries}}}\n"
        f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}', wait_for_sync: 5s,"
        f" backoff_initial: 200ms, backoff_max: 2s}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
    )


# ------------------------------------------------------------------------------ a shared tmpfs


@dataclass
class SharedTmpfs:
    """A tmpfs mounted in a private mount namespace that two processes live in (as two containers
    of a pod share an emptyDir with medium Memory).  Gone with its processes."""

    mountpoint: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self) -> SharedTmpfs:
        self.mountpoint.mkdir()
        holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size={TMPFS_SIZE} kpod-alerts '{self.mountpoint}' && echo ready && exec sleep 3600"],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        self.procs.append(holder)
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"ready"
        self.procs.append(subprocess.Popen(["nsenter", f"--mount=/proc/{holder.pid}/ns/mnt", "sleep", "3600"]))
        return self

    @property
    def device(self) -> str:
        st = os.stat(f"/proc/{self.procs[0].pid}/root{self.mountpoint}")
        return f"{os.major(st.st_dev)}:{os.minor(st.st_dev)}"

    def fill(self) -> None:
        # cat stops at ENOSPC: every block of the tmpfs is used.
        subprocess.run(["nsenter", f"--mount=/proc/{self.procs[0].pid}/ns/mnt", "sh", "-c",
                        f"cat /dev/zero > '{self.mountpoint}/fill'"], capture_output=True, timeout=30)  # fmt: skip

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(10)
            if proc.stdout:
                proc.stdout.close()


@contextlib.contextmanager
def shared_tmpfs(mountpoint: Path) -> Iterator[SharedTmpfs]:
    tmpfs = SharedTmpfs(mountpoint)
    try:
        yield tmpfs.start()
    finally:
        tmpfs.stop()


def remove_cgroup(path: Path) -> None:
    """rmdir an emptied cgroup, retrying while its last task finishes exiting."""
    for _ in range(100):
        try:
            path.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    path.rmdir()


# ------------------------------------------------------------------------------ the replay


@dataclass
class Timeline:
    """Wall-clock moments of the run, turned into replay steps (one per scrape interval)."""

    start: float
    marks: dict[str, float] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = time.time()

    def step(self, name: str) -> int:
        return round((self.marks[name] - self.start) / INTERVAL_S)


def series_names() -> list[str]:
    """Every scraped series a rule reads (recording rules' outputs are recomputed by promtool)."""
    text = " ".join(r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"])
    return sorted(set(re.findall(r"(?<![\w:])(kpod_[a-z0-9_]+|up)(?![\w:])", text)))


def promtool_series(prom: Prometheus, timeline: Timeline, end: float) -> list[dict[str, str]]:
    """The scraped series as promtool input: per step the value Prometheus had, "stale" where a
    series had gone away (so that no 5-minute lookback carries it on), "_" before it existed.
    Of the BPF maps only sched_cgroups, the one whose fill step 5 makes certain: another map
    filled by the pods' cgroups may hover around the 90 % line."""
    steps = round((end - timeline.start) / INTERVAL_S) + 1
    out: list[dict[str, str]] = []
    for name in series_names():
        selector = f'{name}{{job="{JOB}"}}'
        if name.startswith("kpod_bpf_map"):
            selector = f'{name}{{job="{JOB}",map="sched_cgroups"}}'
        for item in prom.query_range(selector, timeline.start, end, INTERVAL_S):
            labels = {k: v for k, v in item["metric"].items() if k != "__name__"}
            values: list[str | None] = [None] * steps
            for t, v in item["values"]:
                index = round((float(t) - timeline.start) / INTERVAL_S)
                if 0 <= index < steps:
                    values[index] = v
            seen = False
            rendered: list[str] = []
            for v in values:
                if v is not None:
                    rendered.append(v)
                    seen = True
                elif seen and rendered[-1] not in ("stale", "_"):
                    rendered.append("stale")
                else:
                    rendered.append("_")
            text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
            out.append({"series": f"{name}{{{text}}}", "values": " ".join(rendered)})
    return out


def replay(prom: Prometheus, timeline: Timeline, end: float, expected: list[dict[str, Any]],
           workdir: Path) -> subprocess.CompletedProcess[str]:  # fmt: skip
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    rules_path = workdir / "rules-without-annotations.yaml"
    rules_path.write_text(yaml.safe_dump(rules, sort_keys=False))
    tests = {
        "rule_files": [str(rules_path)],
        "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": promtool_series(prom, timeline, end),
                   "alert_rule_test": expected}],
    }  # fmt: skip
    path = workdir / "replay.test.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False, width=1 << 20))
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=300)


# ------------------------------------------------------------------------------ the test


def test_alerts_fire_only_when_they_should(tmp_path: Path) -> None:
    require_tools("prometheus", "promtool", "unshare", "nsenter")
    exprs = rule_exprs()
    root = cgroup2_root()
    prefix = f"kpod-alerts-{uuid.uuid4().hex[:10]}"
    controllers = KUBELET_CONTROLLERS if pure_cgroup2_memory() else ()
    prom_dir = tmp_path / "prometheus"
    prom_dir.mkdir()

    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, prom_dir, ignore_errors=True)
        api = stack.enter_context(FakeApiServer())

        def pod(name: str, containers: list[str]) -> KubePod:
            made = build_pod(stack.enter_context(cgroup_tree(root, controllers)), prefix, name, containers,
                             NAMESPACE, NODE)  # fmt: skip
            api.add_pod(made.api_object())
            return made

        idle, files, batch = pod("idle", ["app"]), pod("files", ["writer-a", "writer-b"]), pod("batch", ["oom"])
        oom = OomCgroup.make(stack, batch.containers["oom"].container_dir)
        procs = stack.enter_context(workloads())
        sleeper = Workload(BLOCKED)
        procs.append(sleeper)
        idle.tree.move(sleeper.pid, idle.containers["app"].container_dir)
        tmpfs = stack.enter_context(shared_tmpfs(tmp_path / "shared"))
        for proc, container in zip(tmpfs.procs, ("writer-a", "writer-b"), strict=True):
            files.tree.move(proc.pid, files.containers[container].container_dir)

        port = free_port()
        kubeconfig = api.write_kubeconfig(str(tmp_path / "kubeconfig"))
        cgroup_root = f"{root}/{prefix}"
        agent = AgentProcess(agent_config(cgroup_root, kubeconfig, port), tmp_path, port, env=clean_env())
        agent.start()
        stack.callback(lambda: agent.stop())
        agent.wait_ready(60)

        prom = Prometheus(prom_dir, {JOB: f"127.0.0.1:{port}"}, interval=f"{INTERVAL_S}s", rule_files=(RULES,))
        stack.callback(prom.stop)
        prom.start()
        up = prom.wait_for(f'up{{job="{JOB}"}}', lambda r: [v for _, v in r] == [1.0], timeout_s=30)
        assert [v for _, v in up] == [1.0], up
        timeline = Timeline(time.time())

        # ------------------------------------------------ 1. idle
        time.sleep(IDLE_S)
        timeline.mark("idle_end")
        window = f"{IDLE_S - 2 * INTERVAL_S}s"  # from the first scrape's rule evaluations on
        fired = prom.query(f"count by (alertname, alertstate) (count_over_time(ALERTS[{window}]))")
        assert not fired, f"alerts pending or firing on an idle node: {fired}"
        broken = [(r["name"], r.get("lastError")) for r in prom.rules() if r["health"] != "ok"]
        assert not broken, f"rules that do not evaluate: {broken}"
        # The alerts' inputs exist: the silence above is about values, not missing series.
        for expr in ("node_device:kpod_fs_fill_ratio", 'kpod_bpf_map_entries{map="sched_cgroups"}',
                     f'kpod_build_info{{job="{JOB}"}}', "kpod_collection_duration_seconds"):  # fmt: skip
            assert prom.query(expr), f"{expr}: no data"
        ((device_labels, idle_fill),) = prom.query(f'node_device:kpod_fs_fill_ratio{{device="{tmpfs.device}"}}')
        assert idle_fill == 0.0 and device_labels["fstype"] == "tmpfs", (device_labels, idle_fill)

        # ------------------------------------------------ 2. a full filesystem
        tmpfs.fill()
        timeline.mark("fill")
        full_expr = exprs["KpodFilesystemFull"]
        result = prom.wait_for(full_expr, lambda r: bool(r), timeout_s=20)
        assert [(m.get("node"), m.get("device"), m.get("fstype")) for m, _ in result] == [
            (NODE, tmpfs.device, "tmpfs")], f"one element naming the full tmpfs, got {result}"  # fmt: skip
        assert result[0][1] == 1.0
        # Both containers report it; the rule folds them into one filesystem.
        per_container = prom.query(f'kpod_fs_usage_bytes{{device="{tmpfs.device}"}}')
        assert sorted(m["container"] for m, _ in per_container) == ["writer-a", "writer-b"], per_container

        # ------------------------------------------------ 3. an OOM kill
        # The agent knows the container before any kill: its series is there, at 0, so that
        # increase() sees the first kill (a series born at 1 reads as no increase).
        before = prom.query(f"kpod_mem_oom_kills_total{batch.selector('oom')}")
        assert [v for _, v in before] == [0.0], f"kpod_mem_oom_kills_total of batch/oom before a kill: {before}"
        oom.kill_a_hog(procs, batch, "oom")
        # As a runtime does when a container's main process dies: its cgroup goes at once
        # (the kill is counted all the same, under the labels the container had).
        remove_cgroup(batch.containers["oom"].container_dir)
        firing = prom.wait_for('ALERTS{alertname="KpodOOMKill",alertstate="firing"}', lambda r: bool(r), 30)
        timeline.mark("oom_firing")  # the scrape that saw the kill came before this
        assert [(m["namespace"], m["pod"], m["container"]) for m, _ in firing] == [(NAMESPACE, "batch", "oom")], (
            f"KpodOOMKill: {firing}; kpod_mem_oom_kills_total: {prom.query('kpod_mem_oom_kills_total')}")  # fmt: skip

        time.sleep(max(0.0, timeline.marks["fill"] + HELD_S - time.time()))
        timeline.mark("fill_end")

        # ------------------------------------------------ 4. the agent stops
        assert agent.stop() == 0
        timeline.mark("down")
        down = prom.wait_for(exprs["KpodAgentDown"], lambda r: bool(r), timeout_s=20)
        assert [(m.get("job"), m.get("instance")) for m, _ in down] == [(JOB, f"127.0.0.1:{port}")], down
        # Meanwhile a pod arrives whose six containers context-switch.
        busy = pod("busy", BUSY_CONTAINERS)
        for container in BUSY_CONTAINERS:
            switcher = Workload(SWITCHING)
            procs.append(switcher)
            busy.tree.move(switcher.pid, busy.containers[container].container_dir)
            switcher.go()
        time.sleep(max(0.0, timeline.marks["down"] + 20 - time.time()))

        # ------------------------------------------------ 5. a full BPF map
        timeline.mark("restart")  # the last scrape before this one found the agent down
        agent = AgentProcess(agent_config(cgroup_root, kubeconfig, port, map_max_entries=4), tmp_path, port,
                             env=clean_env())  # fmt: skip
        agent.start()
        agent.wait_ready(60)
        map_expr = exprs["KpodBpfMapNearlyFull"]
        full_maps: Vector = prom.wait_for(map_expr, lambda r: any(m.get("map") == "sched_cgroups" for m, _ in r), 30)
        names = {m.get("map", "") for m, _ in full_maps}
        assert "sched_cgroups" in names, f"{map_expr}: {full_maps}"
        assert not {n for n in names if n.endswith("_errors") or "." in n}, f"an array map counted as full: {names}"
        # Each map named is a hash map: only those have a capacity (other maps, sized above
        # map_max_entries, may fill with the pods' cgroups too).
        for name in names:
            assert prom.value(f'kpod_bpf_map_capacity{{job="{JOB}",map="{name}"}}'), f"{name}: not a hash map"
        # Six cgroups switching all the time into a map of 4: inserts keep failing.
        failing = f'increase(kpod_bpf_map_update_errors_total{{job="{JOB}",map="sched_cgroups"}}[1m]) > 0'
        assert prom.wait_for(failing, lambda r: bool(r), 20), f"{failing}: no failed insert"
        timeline.mark("map_full")
        time.sleep(max(0.0, timeline.marks["map_full"] + HELD_S - time.time()))
        end = time.time()

        # ------------------------------------------------ the replay, through every for:
        def at(step: int, alert: str, labels: list[dict[str, str]]) -> dict[str, Any]:
            return {"eval_time": f"{step}m", "alertname": alert,
                    "exp_alerts": [{"exp_labels": {**x}} for x in labels]}  # fmt: skip

        fs = {"node": NODE, "device": tmpfs.device, "fstype": "tmpfs"}
        expected = [at(timeline.step("idle_end"), name, []) for name in sorted(exprs)]
        expected += [
            at(timeline.step("fill_end"), "KpodFilesystemFull", [{"severity": "critical", **fs}]),
            at(timeline.step("fill_end"), "KpodFilesystemNearlyFull", [{"severity": "warning", **fs}]),
            at(timeline.step("oom_firing") + 1, "KpodOOMKill",
               [{"severity": "warning", "node": NODE, "namespace": NAMESPACE, "pod": "batch", "container": "oom"}]),
            at(timeline.step("restart") - 1, "KpodAgentDown",
               [{"severity": "warning", "job": JOB, "instance": f"127.0.0.1:{port}"}]),
            at(round((end - timeline.start) / INTERVAL_S) - 1, "KpodBpfMapNearlyFull",
               [{"severity": "warning", "map": "sched_cgroups"}]),
        ]  # fmt: skip
        result = replay(prom, timeline, end, expected, tmp_path)
        assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
        print(f"\nalerts: idle {IDLE_S}s silent, replayed {round((end - timeline.start) / INTERVAL_S)} scrapes; "
              f"tmpfs {tmpfs.device}, full maps {sorted(names)}")  # fmt: skip
