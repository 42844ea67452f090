"""End to end: `kpod-metrics run` in informer mode against the fake API server, on real cgroups.

The agent process gets a kubeconfig (KUBECONFIG) pointing at tests/fake_apiserver.py and a
cgroup root below a unique prefix in the cgroup2 mount, where a pod tree with a process is
created.  /metrics must carry the pod's namespace/pod/container/node and follow the API:
a pod created later appears, a deleted pod's series leave the exposition.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, make_pod
from helpers import free_port
from kernel_util import CgroupTree, cgroup2_skip_reason, cgroup_tree
from kpod.processors.k8sattributes.processor import PODS_METRIC

REPO = Path(__file__).resolve().parents[1]


_REASON = cgroup2_skip_reason()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def pod_cgroup(tree: CgroupTree, prefix: str, uid: str, cid: str) -> Path:
    flat = uid.replace("-", "_")
    return tree.mkdir(
        f"{prefix}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{flat}.slice/cri-containerd-{cid}.scope"
    )


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def series(text: str, metric: str) -> list[dict[str, str]]:
    out = []
    for line in text.splitlines():
        if line.startswith(metric + "{"):
            out.append(dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])))
    return out


def until(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def test_agent_labels_follow_the_api(tmp_path: Path) -> None:
    prefix = f"kpod-e2e-{uuid.uuid4().hex[:10]}"
    port = free_port()
    processes: list[subprocess.Popen[bytes]] = []
    with FakeApiServer() as api, cgroup_tree() as tree:
        try:
            web_uid, web_cid = str(uuid.uuid4()), uuid.uuid4().hex * 2
            web_dir = pod_cgroup(tree, prefix, web_uid, web_cid)
            processes.append(subprocess.Popen(["sleep", "120"]))
            tree.move(processes[-1].pid, web_dir)
            api.add_pod(make_pod("web-1", namespace="shop", uid=web_uid, containers=[("app", web_cid)]))
            config = tmp_path / "config.yaml"
            config.write_text(
                f"""
kpod:
  profile: custom
  poll_interval: 500ms
  node_name: node-a
  discovery: {{mode: informer}}
  cgroup: {{root: {tree.root / prefix}, gone_retention: 2s}}
  filter: {{exclude_namespaces: []}}
receivers:
  cgroup_cpu: {{}}
processors:
  k8sattributes: {{wait_for_sync: 5s, backoff_max: 1s}}
exporters:
  prometheus: {{endpoint: "127.0.0.1:{port}"}}
service:
  pipelines:
    metrics: {{receivers: [cgroup_cpu], processors: [k8sattributes], exporters: [prometheus]}}
"""
            )
            env = dict(os.environ, KUBECONFIG=api.write_kubeconfig(str(tmp_path / "kubeconfig")))
            env.pop("KUBERNETES_SERVICE_HOST", None)
            agent = subprocess.Popen(
                [str(Path(sys.executable).parent / "kpod-metrics"), "run", "--config", str(config)],
                env=env,
                stderr=open(tmp_path / "agent.log", "w"),  # noqa: SIM115 - closed with the process
            )
            processes.append(agent)
            metric = "kpod_cpu_usage_seconds_total"
            assert until(lambda: series(scrape(port), metric)), (tmp_path / "agent.log").read_text()[-3000:]
            assert series(scrape(port), metric) == [
                {"container": "app", "namespace": "shop", "node": "node-a", "pod": "web-1"}
            ]
            # The log says what the first cycle collected: the one pod and its series.
            web_series = [line for line in scrape(port).splitlines() if 'pod="web-1"' in line]
            first = re.search(r"first cycle: (\d+) pods, (\d+) series", (tmp_path / "agent.log").read_text())
            assert first is not None, (tmp_path / "agent.log").read_text()[-3000:]
            assert (int(first[1]), int(first[2])) == (1, len(web_series)), (first[0], web_series)

            # A pod that starts later: its cgroup and its API object appear; its series follows.
            db_uid, db_cid = str(uuid.uuid4()), uuid.uuid4().hex * 2
            pod_cgroup(tree, prefix, db_uid, db_cid)
            api.add_pod(make_pod("db-1", namespace="shop", uid=db_uid, containers=[("pg", db_cid)]))
            assert until(lambda: {s["pod"] for s in series(scrape(port), metric)} == {"web-1", "db-1"})

            # The API deletes web-1 (its cgroup lingers a moment on a real node): its series go
            # once the deleted pod's labels are let go (kpod.cgroup.gone_retention).
            api.delete_pod(web_uid)
            assert until(lambda: {s["pod"] for s in series(scrape(port), metric)} == {"db-1"})
            text = scrape(port)
            assert 'kpod_cgroups_unresolved_total{reason="unknown_pod"}' in text
            assert f"{PODS_METRIC.replace('.', '_')} 1" in text
        finally:
            for proc in processes:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    assert processes[-1].returncode == 0, (tmp_path / "agent.log").read_text()[-3000:]
