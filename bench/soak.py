"""Pod churn soak: the agent under N pod create/delete cycles, checked for leaks.

    .venv/bin/python -m bench.soak --cycles 500 [--write]

What one cycle is, on this host, as root: a kubepods-shaped pod cgroup (systemd driver,
containerd scope) under the cgroup2 mount with a live process in it (a shell that forks a
`sleep` every 50 ms, so the eBPF receivers see scheduling, and fork/exit churn), and the
pod's ADDED event from the fake API server (tests/fake_apiserver.py); the pod `--window`
cycles older is deleted from the API (DELETED event), its processes killed and its cgroup
removed.  Each pod also gets a second container that runs for 10 ms and whose cgroup is removed
at once, long before the next cycle: the agent knows it only from the kernel's cgroup events.
Gone cgroups and deleted pods are kept 2 s (kpod.cgroup.gone_retention).  The agent runs as
its own process (`python -m kpod.cli run`) in informer mode with a kubeconfig pointing at the
fake server, at poll 1 s, with the largest profile installed.

Measured (min of 5 samples a few hundred ms apart, so that a collection thread or an HTTP
connection that happens to exist at that instant does not count as a leak): RSS, threads
(/proc/<pid>/task) and file descriptors (/proc/<pid>/fd) after warm-up and at the end, after
every pod is gone and twice the retention plus 3 poll intervals passed; BPF map entries (kpod_bpf_map_entries) before
and after; the cgroup ids of deleted pods still present as keys of our BPF maps (bpftool map
dump by the ids the agent holds); series of deleted pods still in the exposition.

Bounds (issue 9): RSS growth <= 5 MiB after warm-up, no thread or fd growth, no key of a
deleted pod left in a BPF map (while live pods did have keys), no series of a deleted pod.
`measure()` runs a 100-cycle soak for `make bench`; tests/test_soak.py runs a short one in
`make test` and the 500-cycle one in `make soak` (which writes docs/perf/soak.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from agent_proc import (  # noqa: E402 - test helpers live in tests/
    AgentProcess,
    bpf_ids_of,
    fd_count,
    full_profile,
    rss_kib,
    thread_count,
)
from fake_apiserver import FakeApiServer, make_pod  # noqa: E402
from helpers import free_port  # noqa: E402
from kernel_util import CgroupTree, cgroup2_root  # noqa: E402

from bench import sections  # noqa: E402
from bench.sections import Measured, NotMeasured  # noqa: E402

RSS_BOUND_KIB = 5 * 1024
POLL = "1s"
NODE = "soak-node"
# Gone cgroups' counts and deleted pods' labels are kept this long (kpod.cgroup.gone_retention):
# the end of the run waits for it before looking for leftovers.
RETENTION_S = 2.0


@dataclass
class SoakResult:
    cycles: int
    window: int
    profile: str
    seconds: float = 0.0
    rss_warm_kib: int = 0
    rss_end_kib: int = 0
    rss_peak_kib: int = 0
    threads_warm: int = 0
    threads_end: int = 0
    fds_warm: int = 0
    fds_end: int = 0
    map_entries_before: dict[str, float] = field(default_factory=dict)
    map_entries_after: dict[str, float] = field(default_factory=dict)
    map_update_errors: float = 0.0
    stale_map_keys: int = 0  # keys of deleted pods' cgroups still in our BPF maps
    soak_keys_mid: int = 0  # keys of live soak pods' cgroups, sampled mid-run (shows they are seen)
    orphan_map_keys: int = 0  # keys at the end of cgroups that exist nowhere any more (anyone's)
    stale_series: list[str] = field(default_factory=list)  # series of deleted pods
    pods_labelled: int = 0  # distinct soak pods that appeared in the exposition
    discovery_pods_end: float = -1.0
    collection_errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_end_kib - self.rss_warm_kib

    def violations(self) -> list[str]:
        out = []
        if self.rss_growth_kib > RSS_BOUND_KIB:
            out.append(f"RSS grew {self.rss_growth_kib / 1024:.1f} MiB after warm-up (bound 5 MiB)")
        if self.threads_end > self.threads_warm:
            out.append(f"threads {self.threads_warm} -> {self.threads_end}")
        if self.fds_end > self.fds_warm:
            out.append(f"fds {self.fds_warm} -> {self.fds_end}")
        if self.stale_map_keys:
            out.append(f"{self.stale_map_keys} BPF map keys of deleted pods left")
        if self.map_entries_before and not self.soak_keys_mid:
            out.append("no soak pod ever had a BPF map entry: the map check saw nothing")
        if self.stale_series:
            out.append(f"{len(self.stale_series)} series of deleted pods left, e.g. {self.stale_series[0]}")
        if self.discovery_pods_end != 0:
            out.append(f"discovery still knows {self.discovery_pods_end} pods")
        return out


class _Pod:
    """One soak pod: its cgroup, its process group, its API object."""

    def __init__(self, tree: CgroupTree, api: FakeApiServer, index: int) -> None:
        self.pod = tree.pod()
        self.name = f"soak-{index}"
        self.cgroup_ids = {os.stat(self.pod.container_dir).st_ino, os.stat(self.pod.pod_dir).st_ino}
        # A new session: the shell and its sleeps are one process group we can kill at once.
        self.proc = subprocess.Popen(
            ["/bin/sh", "-c", "read _; while :; do sleep 0.05; done"],
            stdin=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        tree.move(self.proc.pid, self.pod.container_dir)
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")  # start forking only once inside the cgroup
        self.proc.stdin.flush()
        cid = self.pod.container_dir.name.removeprefix("cri-containerd-").removesuffix(".scope")
        # A container that lives for a moment and is gone before the next cycle (a Job's, an
        # init container, a crash loop): known to the agent only from the kernel's events.
        scope = f"cri-containerd-{uuid.uuid4().hex * 2}.scope"
        job = tree.mkdir(str((self.pod.pod_dir / scope).relative_to(tree.root)))
        self.cgroup_ids.add(os.stat(job).st_ino)
        job_id = job.name.removeprefix("cri-containerd-").removesuffix(".scope")
        api.add_pod(make_pod(self.name, namespace="soak", node=NODE, uid=self.pod.uid,
                             containers=[("app", cid), ("job", job_id)]))  # fmt: skip
        brief = subprocess.Popen(["/bin/sh", "-c", f"echo $$ > {job}/cgroup.procs && exec sleep 0.01"])
        brief.wait(10)
        _rmdir(tree, job)

    def delete(self, tree: CgroupTree, api: FakeApiServer) -> None:
        api.delete_pod(self.pod.uid)
        self.kill()
        for path in (self.pod.container_dir, self.pod.pod_dir):
            _rmdir(tree, path)

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # the group this pod's shell leads
            self.proc.wait(10)
        if self.proc.stdin:
            self.proc.stdin.close()


def _rmdir(tree: CgroupTree, path: Path) -> None:
    for _ in range(100):
        try:
            path.rmdir()
            break
        except FileNotFoundError:
            break
        except OSError:
            time.sleep(0.02)  # a killed sleep still exiting
    if path in tree.created:
        tree.created.remove(path)


def _quiet_min(pid: int, measure, samples: int = 5) -> int:  # type: ignore[no-untyped-def]
    values = []
    for _ in range(samples):
        values.append(measure(pid))
        time.sleep(0.2)
    return min(values)


def _bpf_keys(map_ids: frozenset[int]) -> set[int]:
    """The cgroup ids (first 8 key bytes) in our per-cgroup BPF maps."""
    keys: set[int] = set()
    for map_id in map_ids:
        out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(map_id)], capture_output=True, text=True)
        if out.returncode != 0:
            continue
        try:
            entries = json.loads(out.stdout or "[]")
        except json.JSONDecodeError:
            continue
        for entry in entries:
            key = entry.get("key") if isinstance(entry, dict) else None
            if isinstance(key, list) and len(key) >= 8:
                keys.add(int.from_bytes(bytes(int(b, 16) for b in key[:8]), "little"))
    return keys


def _existing_cgroup_ids(root: str) -> set[int]:
    ids: set[int] = set()
    for directory, _, _ in os.walk(root):
        with contextlib.suppress(OSError):
            ids.add(os.stat(directory).st_ino)
    return ids


def _map_entries(agent: AgentProcess) -> dict[str, float]:
    return {s.labels["map"]: s.value for s in agent.metrics() if s.name == "kpod_bpf_map_entries"}


def run_soak(cycles: int, window: int = 5, workdir: Path | None = None, log=print) -> SoakResult:  # type: ignore[no-untyped-def]
    """Run the soak; raises only for setup problems (not root...).  Cleans up everything."""
    profile = full_profile()
    result = SoakResult(cycles=cycles, window=window, profile=profile)
    workdir = workdir or Path(tempfile.mkdtemp(prefix="kpod-soak-"))
    root = cgroup2_root()
    port = free_port()
    # Warm-up ends once the retained state (gone cgroups, deleted pods, then their carried
    # counts: twice the retention) has reached its steady size, a few cycles after that.
    warmup = max(cycles // 10, int((2 * RETENTION_S + 3) / 0.1))
    if warmup >= cycles:
        raise ValueError(f"{cycles} cycles end before the warm-up ({warmup} cycles, {warmup / 10:g} s)")
    # The agent's cgroup root is a directory of our own: a kubepods tree directly below the
    # cgroup2 root is shared with anything else that makes pods on this host (other test runs),
    # whose cgroups would come and go in the agent's descriptors, series and maps mid-soak.
    outer = CgroupTree(Path(root))
    tree = CgroupTree(outer.mkdir(f"kpod-soak-{uuid.uuid4().hex[:10]}"))
    live: list[_Pod] = []
    deleted_ids: set[int] = set()
    deleted_names: set[str] = set()
    seen: set[str] = set()
    api = FakeApiServer().start()
    agent: AgentProcess | None = None
    try:
        kubeconfig = api.write_kubeconfig(str(workdir / "kubeconfig"))
        config = (
            f"kpod: {{profile: {profile}, poll_interval: {POLL}, node_name: {NODE}, discovery: {{mode: informer}},"
            f" cgroup: {{root: {tree.root}, gone_retention: {RETENTION_S:g}s}}, filter: {{exclude_namespaces: []}}}}\n"
            f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}', backoff_initial: 200ms, backoff_max: 2s}}\n"
            f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
        )
        agent = AgentProcess(config, workdir, port).start()
        agent.wait_ready(60)
        agent.wait_cycles(3, 60)  # eBPF receivers started, a few cycles done
        ours = bpf_ids_of(agent.pid)
        result.map_entries_before = _map_entries(agent)
        began = time.monotonic()
        for i in range(cycles):
            live.append(_Pod(tree, api, i))
            if len(live) > window:
                old = live.pop(0)
                old.delete(tree, api)
                deleted_ids |= old.cgroup_ids
                deleted_names.add(old.name)
            time.sleep(0.1)
            if i % 10 == 0:
                # Scrape like Prometheus would, and note which pods got labelled.
                seen |= {s.labels.get("pod", "") for s in agent.metrics() if s.labels.get("namespace") == "soak"}
            if i == cycles // 2:
                alive = set().union(*(pod.cgroup_ids for pod in live))
                result.soak_keys_mid = len(_bpf_keys(ours.maps) & alive)
            if i == warmup:
                result.rss_warm_kib = _quiet_min(agent.pid, rss_kib)
                result.threads_warm = _quiet_min(agent.pid, thread_count)
                result.fds_warm = _quiet_min(agent.pid, fd_count)
                log(f"warm-up done at cycle {i}: RSS {result.rss_warm_kib} KiB")
            result.rss_peak_kib = max(result.rss_peak_kib, rss_kib(agent.pid))
            if not agent.alive():
                raise RuntimeError(f"agent died at cycle {i}:\n{agent.log()[-2000:]}")
            if i % 100 == 99:
                log(f"cycle {i + 1}: RSS {rss_kib(agent.pid)} KiB, {thread_count(agent.pid)} threads")
        for old in live:
            old.delete(tree, api)
            deleted_ids |= old.cgroup_ids
            deleted_names.add(old.name)
        live.clear()
        result.seconds = time.monotonic() - began
        # Gone cgroups and deleted pods are let go after the retention, their carried counts
        # after the retention again; then three cycles: they leave maps and exposition.  Each
        # step is taken by a cycle that began after its retention ended: waited for as cycles
        # (two: the second began after the call), not as seconds, which a busy machine stretches.
        agent.wait_cycles(2, 60)  # the gone cgroups noticed
        for _ in range(2):
            time.sleep(RETENTION_S)
            agent.wait_cycles(2, 60)
        agent.wait_cycles(3, 60)
        result.rss_end_kib = _quiet_min(agent.pid, rss_kib)
        result.threads_end = _quiet_min(agent.pid, thread_count)
        result.fds_end = _quiet_min(agent.pid, fd_count)
        samples = agent.metrics()
        result.map_entries_after = {s.labels["map"]: s.value for s in samples if s.name == "kpod_bpf_map_entries"}
        result.map_update_errors = sum(s.value for s in samples if s.name == "kpod_bpf_map_update_errors_total")
        result.stale_series = sorted(
            {f"{s.name}{{pod={s.labels['pod']}}}" for s in samples if s.labels.get("pod") in deleted_names}
        )
        # The gauge of pods discovery knows (renamed once: accept both names).
        pods = [s.value for s in samples if s.name in ("kpod_discovery_pods", "kpod_pods_discovered")]
        result.discovery_pods_end = pods[0] if pods else -1.0
        result.collection_errors = {
            s.labels["receiver"]: s.value for s in samples if s.name == "kpod_collection_errors_total" and s.value
        }
        end_keys = _bpf_keys(ours.maps)
        result.stale_map_keys = len(end_keys & deleted_ids)
        result.orphan_map_keys = len(end_keys - _existing_cgroup_ids(root))
        result.pods_labelled = len(seen & deleted_names)
        code = agent.stop()
        if code != 0:
            result.notes.append(f"agent exit code {code}")
    finally:
        for pod in live:
            pod.kill()
        if agent is not None and agent.alive():
            agent.stop()
        tree.cleanup()
        outer.cleanup()
        api.stop()
    return result


def render(data: dict[str, Any]) -> str:
    result = SoakResult(**data["result"])
    verdict = result.violations()
    rows = [
        ("cycles (pod create + delete)",
         f"{result.cycles} in {result.seconds:.0f} s, {result.window} pods alive at a time"),
        ("profile", result.profile),
        ("RSS after warm-up -> end", f"{result.rss_warm_kib / 1024:.1f} -> {result.rss_end_kib / 1024:.1f} MiB "
                                     f"(growth {result.rss_growth_kib / 1024:+.2f} MiB; "
                                     f"bound {RSS_BOUND_KIB / 1024:g} MiB)"),
        ("RSS peak", f"{result.rss_peak_kib / 1024:.1f} MiB"),
        ("threads after warm-up -> end", f"{result.threads_warm} -> {result.threads_end}"),
        ("fds after warm-up -> end", f"{result.fds_warm} -> {result.fds_end}"),
        ("BPF map entries before -> after", ", ".join(
            f"{m} {result.map_entries_before.get(m, 0):.0f} -> {v:.0f}"
            for m, v in sorted(result.map_entries_after.items())
        ) or "no eBPF receivers"),
        ("map update errors", f"{result.map_update_errors:.0f}"),
        ("keys of live soak pods in BPF maps, mid-run", str(result.soak_keys_mid)),
        ("keys of deleted soak pods left in BPF maps (end)", str(result.stale_map_keys)),
        ("keys of cgroups that no longer exist, anyone's (end)", str(result.orphan_map_keys)),
        ("series of deleted pods left in /metrics", str(len(result.stale_series))),
        ("soak pods seen labelled in scrapes", str(result.pods_labelled)),
        ("pods discovery knows at the end", f"{result.discovery_pods_end:.0f}"),
        ("receiver collection errors", json.dumps(result.collection_errors) if result.collection_errors else "none"),
    ]  # fmt: skip
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    notes = "".join(f"\n- note: {n}" for n in result.notes)
    return f"""## Pod churn soak

- Agent: its own process, informer mode against tests/fake_apiserver.py, poll {POLL}; Python {data["python"]}.

| what | figure |
|---|---|
{table}

Result: {"within every bound" if not verdict else "OUT OF BOUNDS: " + "; ".join(verdict)}.
{notes}
"""


def measure(cycles: int = 100, window: int = 5, command: str = "", workdir: Path | None = None, log=None) -> Measured:  # type: ignore[no-untyped-def]
    """Run the soak and keep its figures (SoakResult) for render(); 100 cycles (about a minute)
    is what `make bench` runs."""
    if os.geteuid() != 0:
        raise NotMeasured("needs root (creates cgroups, loads BPF programs)")
    result = run_soak(cycles, window, workdir=workdir, log=log or (lambda m: print(m, file=sys.stderr)))
    return Measured(
        command or f".venv/bin/python -m bench.soak --cycles {cycles}",
        {"result": asdict(result), "python": platform.python_version()},
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=500)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/soak.md")
    args = parser.parse_args()
    measured = measure(args.cycles, args.window, log=lambda m: print(m, file=sys.stderr))
    if args.write:
        print(sections.write("soak", measured).read_text())
    else:
        print(render(measured.data))
    return 1 if SoakResult(**measured.data["result"]).violations() else 0


if __name__ == "__main__":
    sys.exit(main())
