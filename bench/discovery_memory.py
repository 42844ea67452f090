"""RSS added by watching a node's pods (informer mode), against the fake API server.

    .venv/bin/python -m bench.discovery_memory --pods 110 --seconds 30 --churn 20 [--write]

The fake API server (tests/fake_apiserver.py) runs in its own process with 110 pods on the
node, each with the bulk of a real pod (managedFields, spec, conditions), and sends pod updates
at `--churn` per second.  A fresh measuring process imports the agent's discovery and the
`kubernetes` client, takes its RSS as the baseline, then starts InformerDiscovery (list +
watch) and samples its RSS while the watch runs.  The figure is the RSS added over the
baseline: the budget is 10 MiB for 110 pods (issue 5).  For comparison, a second process lists
the same pods the client's default way (deserialised into V1Pod model objects) and keeps them.
The client's import cost is reported separately: it is paid once, in every mode but local.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import sections
from bench.sections import Measured

REPO = Path(__file__).resolve().parents[1]
BUDGET_MIB = 10.0


def rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _settle() -> int:
    gc.collect()
    time.sleep(0.2)
    return rss_kib()


def child_informer(kubeconfig: str, pods: int, seconds: float) -> dict[str, float]:
    """Runs in a fresh process: RSS before/after imports, after the list, during the watch."""
    import logging

    start = _settle()
    from kpod.processors.k8sattributes.config import K8sAttributesConfig
    from kpod.processors.k8sattributes.pods import PodStore

    from kpod.units import Duration

    agent = _settle()
    import kubernetes.client  # noqa: F401 - the client's import cost, reported on its own line
    from kpod.processors.k8sattributes.discovery import InformerDiscovery

    imported = _settle()
    store = PodStore()
    config = K8sAttributesConfig(kubeconfig=kubeconfig, watch_timeout=Duration(60))
    discovery = InformerDiscovery(store, logging.getLogger("bench"), "node-a", config)
    # Baseline after the imports: the API client object, its connection, the list, the watch
    # thread and the pods are all in the figure.
    baseline = _settle()
    discovery.start()
    if not discovery.wait_synced(30) or len(store) != pods:
        raise RuntimeError(f"informer did not sync {pods} pods (got {len(store)}): {store.last_error}")
    listed = _settle()
    samples = []
    threads_during = threading.active_count()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(1.0)
        samples.append(rss_kib())
    watched = _settle()
    generation = store.generation
    discovery.stop()
    return {
        "start_kib": start,
        "agent_kib": agent,
        "imported_kib": imported,
        "baseline_kib": baseline,
        "listed_kib": listed,
        "watch_max_kib": max(samples) if samples else watched,
        "watched_kib": watched,
        "store_generations": generation,
        "threads": threads_during,
        "pods": len(store),
    }


def child_kubelet(url: str, pods: int, seconds: float) -> dict[str, float]:
    """Kubelet mode in a fresh process: no `kubernetes` import at all, a poll per second."""
    import logging

    from kpod.processors.k8sattributes.discovery import KubeletDiscovery
    from kpod.processors.k8sattributes.pods import PodStore

    from kpod.settings import KpodSettings
    from kpod.units import Duration

    settings = KpodSettings()
    settings.discovery.kubelet.url = url
    settings.discovery.kubelet.poll_interval = Duration(1.0)
    store = PodStore()
    discovery = KubeletDiscovery(store, logging.getLogger("bench"), settings, 10.0)
    baseline = _settle()
    discovery.start()
    if not discovery.wait_synced(30) or len(store) != pods:
        raise RuntimeError(f"kubelet discovery did not sync {pods} pods (got {len(store)}): {store.last_error}")
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.5)
        samples.append(rss_kib())
    discovery.stop()
    return {
        "start_kib": baseline,
        "watch_max_kib": max(samples) if samples else rss_kib(),
        "polls": discovery.polls,
        "kubernetes_imported": float("kubernetes" in sys.modules),
    }


def child_models(kubeconfig: str, pods: int) -> dict[str, float]:
    """The client's default: deserialise the list into V1Pod objects and keep them."""
    from kubernetes import client, config

    configuration = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    before_api = _settle()
    api = client.CoreV1Api(client.ApiClient(configuration))
    baseline = _settle()
    listed = api.list_pod_for_all_namespaces(field_selector="spec.nodeName=node-a")
    if len(listed.items) != pods:
        raise RuntimeError(f"listed {len(listed.items)} pods, expected {pods}")
    after = _settle()
    return {"api_module_kib": baseline - before_api, "baseline_kib": baseline, "listed_kib": after}


def _child(kind: str, kubeconfig: str, pods: int, seconds: float) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-m", "bench.discovery_memory", "--child", kind, "--kubeconfig", kubeconfig,
         "--pods", str(pods), "--seconds", str(seconds)],
        cwd=REPO, capture_output=True, text=True, timeout=seconds + 120, check=False,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"{kind} child failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _kubelet(pods: int, seconds: float) -> dict[str, float]:
    """A fake kubelet (plain http, in this process) serving the same kind of pods."""
    sys.path.insert(0, str(REPO / "tests"))
    from fake_apiserver import make_pod
    from fake_kubelet import FakeKubelet

    kubelet = FakeKubelet(token="").start()
    kubelet.pods = [make_pod(f"app{i % 10}-{i}", namespace=f"ns{i % 5}") for i in range(pods)]
    try:
        return _child("kubelet", kubelet.url, pods, seconds)
    finally:
        kubelet.stop()


def measure_rss(pods: int = 110, seconds: float = 30.0, churn: float = 20.0) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = os.path.join(tmp, "kubeconfig")
        server = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "fake_apiserver.py"), "--pods", str(pods),
             "--kubeconfig", kubeconfig, "--churn", str(churn)],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert server.stdout is not None
            url = server.stdout.readline().strip()
            if not url.startswith("http"):
                raise RuntimeError("fake API server did not start")
            import urllib.request

            with open(kubeconfig) as handle:
                token = json.load(handle)["users"][0]["user"]["token"]
            request = urllib.request.Request(
                f"{url}/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-a", headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(request) as response:
                list_bytes = len(response.read())
            informer = _child("informer", kubeconfig, pods, seconds)
            models = _child("models", kubeconfig, pods, 0)
            kubelet = _kubelet(pods, seconds)
        finally:
            server.terminate()
            server.wait(10)
    return {"pods": pods, "seconds": seconds, "churn": churn, "list_bytes": list_bytes,
            "informer": informer, "models": models, "kubelet": kubelet}  # fmt: skip


def _mib(kib: float) -> str:
    return f"{kib / 1024:.1f} MiB"


def measure(pods: int = 110, seconds: float = 30.0, churn: float = 20.0) -> Measured:
    return Measured(
        f".venv/bin/python -m bench.discovery_memory --pods {pods} --seconds {seconds:g} --churn {churn:g}",
        {**measure_rss(pods, seconds, churn), "python": platform.python_version()},
    )


def render(result: dict[str, Any]) -> str:
    pods, seconds, churn = result["pods"], result["seconds"], result["churn"]
    informer: dict[str, float] = result["informer"]
    models: dict[str, float] = result["models"]
    kubelet: dict[str, float] = result["kubelet"]
    added_list = informer["listed_kib"] - informer["baseline_kib"]
    added_watch = informer["watch_max_kib"] - informer["baseline_kib"]
    added_models = models["listed_kib"] - models["baseline_kib"]
    verdict = "within" if added_watch / 1024 <= BUDGET_MIB else "OVER"
    return f"""## Kubernetes enrichment: pod discovery memory (informer, {pods} pods)

- Python {result["python"]}.  Fake API server (tests/fake_apiserver.py) in its own process: {pods} pods on
  the node, pod list {result["list_bytes"] / 1024:.0f} KiB of JSON ({result["list_bytes"] / pods / 1024:.1f} KiB
  per pod), {churn:g} pod updates (MODIFIED events) per second during a {seconds:g} s watch.  Discovery threads
  besides the main one: {informer["threads"] - 1:.0f}.

| what | RSS |
|---|---|
| interpreter + agent modules, before the client import | {_mib(informer["agent_kib"])} |
| `kubernetes` package import (informer mode only) | +{_mib(informer["imported_kib"] - informer["agent_kib"])} |
| **added by list + watch of {pods} pods, after the list** | **+{_mib(added_list)}** |
| **added by list + watch of {pods} pods, peak during the watch** | **+{_mib(added_watch)}** |
| budget (issue 5) | {BUDGET_MIB:g} MiB: {verdict} |
| added at the end of the watch (after gc) | +{_mib(informer["watched_kib"] - informer["baseline_kib"])} |
| not paid: the generated `CoreV1Api` module import | +{_mib(models["api_module_kib"])} |
| not paid: the same pods listed the client's default way (V1Pod models) and kept | +{_mib(added_models)} |

Kubelet mode, same {pods} pods polled every second for {seconds:g} s ({kubelet["polls"]:.0f} polls) from a fake
kubelet: **+{_mib(kubelet["watch_max_kib"] - kubelet["start_kib"])}** peak over its baseline of
{_mib(kubelet["start_kib"])}; the `kubernetes` package was
{"imported" if kubelet["kubernetes_imported"] else "not imported"}.
"""


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--churn", type=float, default=20.0)
    parser.add_argument("--child", choices=("informer", "models", "kubelet"))
    parser.add_argument("--kubeconfig", help="informer/models child: the kubeconfig; kubelet child: the URL")
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/k8s.md")
    args = parser.parse_args()
    if args.child == "informer":
        print(json.dumps(child_informer(args.kubeconfig, args.pods, args.seconds)))
        return 0
    if args.child == "kubelet":
        print(json.dumps(child_kubelet(args.kubeconfig, args.pods, args.seconds)))
        return 0
    if args.child == "models":
        print(json.dumps(child_models(args.kubeconfig, args.pods)))
        return 0
    measured = measure(args.pods, args.seconds, args.churn)
    if args.write:
        print(sections.write("k8s", measured).read_text())
    else:
        print(render(measured.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
