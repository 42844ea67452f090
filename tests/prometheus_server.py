"""A real Prometheus server against the agent, and the pods and OOM kills the tests give it.

`Prometheus` runs the Debian `prometheus` binary (make setup) with its own config, TSDB and,
optionally, rule files; it is killed by PID on stop().  Queries go through its HTTP API.
`build_pod` lays out a kubepods-shaped pod (one cgroup per container) with its API object for
tests/fake_apiserver.py; `OomCgroup` is a memory cgroup with a 64 MiB limit where a memory hog
is OOM-killed (v1 memcg on a hybrid host, memory.max on pure cgroup2).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_apiserver import make_pod
from helpers import free_port
from kernel_util import CgroupTree, Pod, Workload, cgroup_tree, mounts, pure_cgroup2_memory

PROMETHEUS = "prometheus"  # the Debian package prometheus (make setup), on PATH

Vector = list[tuple[dict[str, str], float]]


@dataclass
class Prometheus:
    """A real Prometheus server with its own config and TSDB, killed by PID on stop()."""

    workdir: Path
    targets: Mapping[str, str]  # job name -> host:port
    interval: str = "1s"  # scrape and rule evaluation interval
    rule_files: tuple[Path, ...] = ()
    # 2.40-3.7: ask for the protobuf exposition and keep native histograms.
    native_histograms: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self) -> Prometheus:
        config = self.workdir / "prometheus.yml"
        rules = "".join(f"\n  - {path}" for path in self.rule_files)
        config.write_text(
            f"global: {{scrape_interval: {self.interval}, scrape_timeout: 1s,"
            f" evaluation_interval: {self.interval}}}\n"
            + (f"rule_files:{rules}\n" if rules else "")
            + "scrape_configs:\n"
            + "".join(
                f"  - job_name: {job}\n    static_configs: [{{targets: ['{target}']}}]\n"
                for job, target in self.targets.items()
            )
        )
        (self.workdir / "data").mkdir()
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    *(["--enable-feature=native-histograms"] if self.native_histograms else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"prometheus exited ({self.process.returncode}):\n{self.log()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(self.url + "/-/ready", timeout=2) as response:
                if response.status == 200:
                    return self
            time.sleep(0.2)
        raise AssertionError(f"prometheus not ready after 30 s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful /api/v1 answer."""
        url = f"{self.url}/api/v1/{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> Vector:
        """An instant query at "now": (labels, value) of each element of the result vector.
        A native histogram sample comes as "histogram": [time, {count, sum, buckets}]: its count."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return [
            (item["metric"], float(item["value"][1] if "value" in item else item["histogram"][1]["count"]))
            for item in data["result"]
        ]

    def series(self, match: str) -> list[dict[str, str]]:
        """The series matching a selector with a sample in the last 5 s, whatever their type
        (an instant query's aggregations skip native histograms in 2.42)."""
        now = time.time()
        return list(self.api("series", **{"match[]": match, "start": f"{now - 5}", "end": f"{now}"}))

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query: [{metric, values: [[unix time, "value"], ...]}, ...]."""
        data = self.api("query_range", query=expr, start=f"{start:.3f}", end=f"{end:.3f}", step=f"{step}")
        assert data["resultType"] == "matrix", data
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The single value of `expr`, or None when the result is empty."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr}: more than one series: {result}"
        return result[0][1] if result else None

    def wait_for(self, expr: str, done: Callable[[Vector], bool], timeout_s: float = 20.0) -> Vector:
        """Poll `expr` until `done(result)` or the timeout; returns the last result either way
        (the caller asserts on it, so a miss fails with the values Prometheus had)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.query(expr)
            if done(result) or time.monotonic() > deadline:
                return result
            time.sleep(0.25)

    def rules(self) -> list[dict[str, Any]]:
        """Every loaded rule with its group: name, type, health, lastError, state (alerts)."""
        return [{**rule, "group": group["name"]} for group in self.api("rules")["groups"] for rule in group["rules"]]


def single(result: Vector) -> float | None:
    return result[0][1] if len(result) == 1 else None


# ------------------------------------------------------------------------------ pods


@dataclass
class KubePod:
    """A pod's cgroups (one CgroupTree each, so one pod can be removed alone) and its API object."""

    name: str
    uid: str
    namespace: str
    node: str
    tree: CgroupTree
    containers: dict[str, Pod]  # container name -> its scope
    container_ids: dict[str, str]
    job: str = ""  # the scrape job selector() adds, when Prometheus scrapes more than one

    def api_object(self) -> dict[str, Any]:
        return make_pod(self.name, namespace=self.namespace, node=self.node, uid=self.uid,
                        containers=list(self.container_ids.items()))  # fmt: skip

    def selector(self, container: str | None = None, **labels: str) -> str:
        matchers = {**({"job": self.job} if self.job else {}), "namespace": self.namespace, "pod": self.name,
                    **({"container": container} if container else {}), **labels}  # fmt: skip
        return "{" + ",".join(f'{k}="{v}"' for k, v in matchers.items()) + "}"


def build_pod(tree: CgroupTree, prefix: str, name: str, containers: list[str], namespace: str,
              node: str, job: str = "") -> KubePod:  # fmt: skip
    """A burstable pod laid out as the kubelet's systemd driver does, with containerd scopes."""
    uid = str(uuid.uuid4())
    flat = uid.replace("-", "_")
    pod_slice = f"{prefix}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{flat}.slice"
    scopes: dict[str, Pod] = {}
    ids: dict[str, str] = {}
    for container in containers:
        cid = uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, as containerd's
        scope = tree.mkdir(f"{pod_slice}/cri-containerd-{cid}.scope")
        scopes[container] = Pod(uid, scope.parent, scope)
        ids[container] = cid
    return KubePod(name, uid, namespace, node, tree, scopes, ids, job)


# ------------------------------------------------------------------------------ OOM kills

MEMORY_HOG = "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"
OOM_LIMIT = 64 << 20


def oom_events(memcg: Path) -> int:
    """The kernel's own OOM kill count of a memory cgroup (v1 memory.oom_control, v2 memory.events)."""
    for name in ("memory.oom_control", "memory.events"):
        with contextlib.suppress(FileNotFoundError):
            for line in (memcg / name).read_text().splitlines():
                key, value = line.split()
                if key == "oom_kill":
                    return int(value)
    raise AssertionError(f"{memcg}: no oom_kill counter")


@dataclass
class OomCgroup:
    """Where a container's memory hog is OOM-killed: on pure cgroup2 the container's own cgroup
    with memory.max; on a hybrid host a v1 memory cgroup of ours (the container's cgroup2
    directory has no memory controller there) holding the limit."""

    memcg: Path
    v1: CgroupTree | None

    @classmethod
    def make(cls, stack: contextlib.ExitStack, container_dir: Path) -> OomCgroup:
        if pure_cgroup2_memory():
            (container_dir / "memory.max").write_text(str(OOM_LIMIT))
            if (container_dir / "memory.swap.max").exists():
                (container_dir / "memory.swap.max").write_text("0")
            return cls(container_dir, None)
        memory_v1 = mounts().v1.get("memory")
        if memory_v1 is None:
            raise AssertionError("no memory controller to OOM-kill in: neither on cgroup2 nor a v1 hierarchy")
        v1 = stack.enter_context(cgroup_tree(memory_v1))
        memcg = v1.mkdir(f"kpod-oom-{uuid.uuid4().hex[:12]}")
        (memcg / "memory.limit_in_bytes").write_text(str(OOM_LIMIT))
        with contextlib.suppress(OSError):  # with swap accounting: no escape into swap either
            (memcg / "memory.memsw.limit_in_bytes").write_text(str(OOM_LIMIT))
        return cls(memcg, v1)

    def kill_a_hog(self, procs: list[Workload], pod: KubePod, container: str) -> None:
        """Run a memory hog in the container until the kernel OOM-kills it (once)."""
        before = oom_events(self.memcg)
        hog = Workload(MEMORY_HOG)
        procs.append(hog)
        pod.tree.move(hog.pid, pod.containers[container].container_dir)
        if self.v1 is not None:
            self.v1.move(hog.pid, self.memcg)
        hog.go()
        rc = hog.wait(60)
        assert rc == -9, f"the memory hog should be OOM-killed (SIGKILL), exit status {rc}"
        assert oom_events(self.memcg) == before + 1
