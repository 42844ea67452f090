"""The k8sattributes processor: namespace / pod / container / node labels on every per-cgroup
point, from node-scoped pod discovery.

    processor.py  the processor: resolve each point's cgroup, drop it or label it
    config.py     its settings
    resolve.py    cgroup -> Resource or a drop reason (LocalResolver, PodResolver)
    podpath.py    pure parser: cgroup path -> pod uid, container id, runtime, QoS
    pods.py       PodInfo and the PodStore discovery fills (copy on write)
    podlist.py    pure decoder: a PodList's chunks -> PodInfo, pod by pod as they arrive
    discovery.py  InformerDiscovery, KubeletDiscovery: fill the PodStore in a thread
    apiserver.py  how the informer reaches the API server (in-cluster config or a kubeconfig)
    check.py      what `kpod-metrics check` asks of discovery (one request, one line with the fix)
    selector.py   Kubernetes label selectors and the pod filter
"""

from kpod.processors.k8sattributes.check import check_discovery
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.processor import K8sAttributesProcessor

from kpod.component import Factory

factory = Factory(
    type="k8sattributes",
    kind="processor",
    config_class=K8sAttributesConfig,
    create=K8sAttributesProcessor,
    description="namespace/pod/container/node labels from node-scoped pod discovery",
    check=check_discovery,
)

__all__ = ["factory"]
