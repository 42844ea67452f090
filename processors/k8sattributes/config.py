"""The k8sattributes processor's own settings (`processors: {k8sattributes: {...}}`).

What it reads from the `kpod:` section (discovery, node_name, filter) is described in
kpod.processors.k8sattributes.processor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kpod.units import Duration


@dataclass
class K8sAttributesConfig:
    # Informer mode: a kubeconfig file.  Empty: the in-cluster service account when running
    # in a pod, else $KUBECONFIG, else ~/.kube/config.
    kubeconfig: str = ""
    # start() waits this long for the first pod list, so that the first cycles are labelled;
    # after that it returns and cycles drop pod cgroups (reason not_synced) until the list lands.
    wait_for_sync: Duration = field(default_factory=lambda: Duration.parse("10s"))
    # Server-side length of one watch request (the API server ends it; we resume from the last
    # resourceVersion).
    watch_timeout: Duration = field(default_factory=lambda: Duration.parse("5m"))
    # Connect and read timeout of list and kubelet requests; a watch's read timeout is
    # watch_timeout plus this.
    request_timeout: Duration = field(default_factory=lambda: Duration.parse("30s"))
    # Reconnect backoff after an error: doubles from backoff_initial up to backoff_max.
    backoff_initial: Duration = field(default_factory=lambda: Duration.parse("1s"))
    backoff_max: Duration = field(default_factory=lambda: Duration.parse("30s"))
