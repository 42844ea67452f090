"""What `kpod-metrics check` asks of pod discovery: the likeliest first failure in a cluster.

Informer mode: is the API server reachable with the configured token and CA, and may this
identity list and watch the pods of its node (one list with limit=1, one watch request whose
answer status is all we read; RBAC answers 403 to either).  Kubelet mode: one poll of the
kubelet's /pods, TLS verified unless insecure_skip_verify.  Local mode: nothing to reach.

Each finding is one line; a failure names the fix.  Nothing here runs in `kpod-metrics run`.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import ssl
import urllib.parse

from kpod.processors.k8sattributes import apiserver
from kpod.processors.k8sattributes.config import K8sAttributesConfig
from kpod.processors.k8sattributes.discovery import KubeletDiscovery
from kpod.processors.k8sattributes.pods import PodStore

from kpod.component import ComponentUnavailable, Finding
from kpod.settings import KpodSettings

RBAC_FIX = (
    "fix: bind a ClusterRole with pods get/list/watch to this service account "
    "(the chart's rbac.create: true does; `kubectl auth can-i list pods --as=system:serviceaccount:<ns>:<sa>`)"
)
TOKEN_FIX = (
    "fix: mount a valid service account token (automountServiceAccountToken: true), or correct the kubeconfig's user"
)
KUBELET_CA_FIX = (
    "fix: kpod.discovery.kubelet.ca_file must be the CA that signed the kubelet's serving certificate "
    "(kubelets self-sign unless serverTLSBootstrap is on; only then is it the cluster CA); "
    "insecure_skip_verify: true as a last resort"
)
KUBELET_RBAC_FIX = (
    "fix: RBAC get on nodes/pods (kubelets >= 1.33, KubeletFineGrainedAuthz) or nodes/proxy (older "
    "kubelets): the chart's rbac.kubeletResource"
)
KUBELET_UNREACHABLE_FIX = (
    "fix: is the kubelet at this address (kpod.discovery.kubelet.url), and may the pod reach the node on port 10250?"
)
# What KubeletDiscovery.fetch() says -> the fix.
KUBELET_FIXES = (
    ("TLS certificate not trusted", KUBELET_CA_FIX),
    ("HTTP 403", KUBELET_RBAC_FIX),
    (
        "HTTP 401",
        "fix: the kubelet must accept service account tokens (webhook authentication, "
        "authentication.webhook.enabled in its config), and the token must be this service account's",
    ),
    ("token file", "fix: automountServiceAccountToken: true, or set kpod.discovery.kubelet.token_file"),
    ("CA file", "fix: kpod.discovery.kubelet.ca_file must be a readable PEM file"),
)


def check_discovery(settings: KpodSettings, config: K8sAttributesConfig) -> list[Finding]:
    mode = settings.discovery.mode
    if mode == "informer":
        return check_api_server(settings.node_name, config)
    if mode == "kubelet":
        return check_kubelet(settings, config)
    return [Finding(True, f"{mode or 'local'}: labels from cgroup paths, no Kubernetes to reach")]


# ------------------------------------------------------------------------------ API server


def check_api_server(node: str, config: K8sAttributesConfig) -> list[Finding]:
    try:
        server = apiserver.load(config.kubeconfig)
    except ComponentUnavailable as error:
        return [Finding(False, f"informer: {error}; fix: run in a pod with a service account, or set "
                               "processors.k8sattributes.kubeconfig")]  # fmt: skip
    ca = _ca_source(config.kubeconfig)
    timeout = max(1.0, min(config.request_timeout.seconds, 10.0))
    selector = ("fieldSelector", f"spec.nodeName={node}")
    asks = (("list", [selector, ("limit", "1")]), ("watch", [selector, ("watch", "true"), ("timeoutSeconds", "1")]))
    for verb, query in asks:
        try:
            status, body = _ask(server, "/api/v1/pods?" + urllib.parse.urlencode(query), timeout)
        except (OSError, http.client.HTTPException) as error:  # DNS, refused, TLS, timeout
            return [Finding(False, _connection_failure(server.url, ca, error))]
        if status != 200:
            return [Finding(False, _refusal(server.url, node, verb, status, body))]
    return [Finding(True, f"informer: API server {server.url} accepts the token and its certificate verifies "
                          f"against {ca}; may list and watch the pods of node {node!r}")]  # fmt: skip


def _ca_source(kubeconfig: str) -> str:
    if kubeconfig:
        return f"the CA of kubeconfig {kubeconfig}"
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return os.path.join(apiserver.SERVICE_ACCOUNT_DIR, "ca.crt")
    return "the CA of $KUBECONFIG"


def _ask(server: apiserver.ApiServer, target: str, timeout: float) -> tuple[int, str]:
    """(HTTP status, start of the body unless 200) of one GET.  A watch's 200 is all we need:
    the connection is closed without waiting for events."""
    connection = server.connect(timeout)
    try:
        headers = {"Accept": "application/json"}
        authorization = server.authorization()
        if authorization:
            headers["Authorization"] = authorization
        connection.request("GET", target, headers=headers)
        response = connection.getresponse()
        body = "" if response.status == 200 else response.read(2048).decode("utf-8", "replace")
        return response.status, body
    finally:
        connection.close()


def _refusal(host: str, node: str, verb: str, status: int, body: str) -> str:
    message = ""
    try:
        message = str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        message = body.strip()[:200]
    detail = f" ({message})" if message and message.lower() not in ("unauthorized", "forbidden") else ""
    if status == 401:
        return f"informer: API server {host} refused the token (401 Unauthorized){detail}; {TOKEN_FIX}"
    if status == 403:
        return f"informer: may not {verb} the pods of node {node!r} (403 Forbidden){detail}; {RBAC_FIX}"
    return f"informer: API server {host} answered {status} to {verb} pods{detail}; fix: see the API server's logs"


def _connection_failure(host: str, ca: str, error: BaseException) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return (
            f"informer: API server {host}: its certificate is not trusted by {ca} ({error.verify_message}); "
            "fix: the CA must be the cluster's (the service account's ca.crt, or the kubeconfig's "
            "certificate-authority)"
        )
    if isinstance(error, ssl.SSLError):
        return f"informer: API server {host}: TLS failed ({error}); fix: is {host} the API server's HTTPS address?"
    return (
        f"informer: cannot reach the API server {host} ({error}); fix: check KUBERNETES_SERVICE_HOST/PORT "
        "(or the kubeconfig's server) and that egress to it is allowed (networkPolicy.egress)"
    )


# ------------------------------------------------------------------------------ kubelet


def check_kubelet(settings: KpodSettings, config: K8sAttributesConfig) -> list[Finding]:
    kubelet = settings.discovery.kubelet
    if "${" in kubelet.url or getattr(kubelet.url, "unset", ()):
        return [Finding(False, f"kubelet: url {kubelet.url!r}: an environment variable is not set; "
                               "fix: set it (the chart sets NODE_IP from status.hostIP)")]  # fmt: skip
    timeout = max(1.0, min(config.request_timeout.seconds, 10.0))
    discovery = KubeletDiscovery(PodStore(), logging.getLogger("kpod.check"), settings, timeout)
    try:
        pods = discovery.fetch()
    except ValueError as error:
        message = str(error).replace(" (the token was rejected)", "")
        fix = next((fix for marker, fix in KUBELET_FIXES if marker in message), KUBELET_UNREACHABLE_FIX)
        return [Finding(False, f"kubelet: {message}; {fix}")]
    if kubelet.url.startswith("https://") and kubelet.insecure_skip_verify:
        tls = "its certificate is NOT verified (insecure_skip_verify)"
    elif kubelet.url.startswith("https://"):
        tls = f"its certificate verifies against {kubelet.ca_file}"
    else:
        tls = "plain http"
    return [Finding(True, f"kubelet: {kubelet.url} answers with {len(pods)} pods; {tls}")]
