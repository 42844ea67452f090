"""The Helm chart, rendered by Helm's own engine (helm-python-sdk), for every profile and
discovery mode: every object validated against the Kubernetes schemas offline
(kubernetes-validate, strict), the security properties asserted, the rendered agent config
loaded by the agent's own config loader, and the plain manifests compared with a fresh render.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helpers import require_tools
from kpod.exporters.otlp.config import OtlpConfig

from kpod.config import load_config
from scripts import gen_seccomp_profile, render_manifests
from scripts.render_manifests import CHART, MANIFESTS, manifest_texts, objects
from scripts.render_manifests import render as render_chart

REPO = Path(__file__).resolve().parents[1]
PROFILES = ("minimal", "standard", "comprehensive", "custom")
MODES = ("informer", "kubelet")
# Oldest Kubernetes the chart's features need the schemas of, and the newest known.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
HOST_PATHS = {"/sys/fs/cgroup", "/proc"}
IMAGE = "registry.example.com/kpod-metrics"


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """The chart rendered with `values`, plus an image repository (required, no default) unless given."""
    values = copy.deepcopy(values or {})
    values.setdefault("image", {}).setdefault("repository", IMAGE)
    return render_chart(values)


ENV = {"NODE_NAME": "node-a", "NODE_IP": "10.0.0.7", "KUBERNETES_SERVICE_HOST": "10.96.0.1"}

EVERYTHING_ON: dict[str, Any] = {
    "serviceMonitor": {
        "enabled": True,
        "tlsConfig": {"ca": {"secret": {"name": "kpod-ca", "key": "ca.crt"}}},
        "metricRelabelings": [{"action": "drop", "sourceLabels": ["__name__"], "regex": "kpod_syscall_.*"}],
    },
    "prometheusRule": {"enabled": True},
    "metrics": {"tlsSecretName": "kpod-serving", "bearerTokenSecret": {"name": "kpod-scrape", "key": "token"}},
    "priorityClassQuota": {"create": True},
    "rbac": {"kubeletResource": "nodes/proxy"},
    "networkPolicy": {
        "enabled": True,
        "allowedFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "egress": [{"ports": [{"port": 443, "protocol": "TCP"}]}],
    },
    "otlp": {
        "enabled": True,
        "endpoint": "collector.observability:4317",
        "tlsSecretName": "otlp-client",
        "tlsClientCert": True,
        "headers": {"x-tenant": "a"},
        "interval": "60s",
    },
    "createNamespace": True,
    "appArmorProfile": {"type": "Unconfined"},
    "extraEnv": [{"name": "EXTRA", "value": "1"}],
    "config": {
        "filter": {"includeLabels": ["app", "team"]},
        "processors": {"filter/no-lo": {"exclude": {"interface": ["lo"]}}},
        "pipelineProcessors": ["filter/no-lo"],
    },
}


def with_pod_monitor(values: dict[str, Any]) -> dict[str, Any]:
    """The same values with the PodMonitor instead of the ServiceMonitor (one of the two only)."""
    out = copy.deepcopy(values)
    out["podMonitor"] = {**out.pop("serviceMonitor"), "enabled": True}
    return out


def profile_values(profile: str, mode: str) -> dict[str, Any]:
    values: dict[str, Any] = {"config": {"profile": profile, "discovery": {"mode": mode}}}
    if profile == "custom":
        values["config"]["pipelineReceivers"] = ["cgroup_cpu", "cgroup_memory", "cpu_sched"]
    return values


def by_kind(objs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for obj in objs:
        out.setdefault(obj["kind"], []).append(obj)
    return out


def daemonset(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (ds,) = by_kind(objs)["DaemonSet"]
    return ds


def agent_container(objs: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = daemonset(objs)["spec"]["template"]["spec"]["containers"]
    return container


def agent_config(objs: list[dict[str, Any]], tmp_path: Path):
    (cm,) = by_kind(objs)["ConfigMap"]
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    return load_config(str(path), environ=ENV)


def documented_capabilities() -> list[str]:
    """The capabilities docs/CAPABILITIES.md's table marks as needed (`| CAP_X | needed |`)."""
    text = (REPO / "docs" / "CAPABILITIES.md").read_text()
    return re.findall(r"^\|\s*CAP_([A-Z_]+)\s*\|\s*needed\b", text, re.M)


# ----------------------------------------------------------------------------- every render


RENDERS = [(p, m) for p, m in itertools.product(PROFILES, MODES)]


@pytest.mark.parametrize(("profile", "mode"), RENDERS)
def test_every_object_validates_against_kubernetes_schemas(profile: str, mode: str) -> None:
    objs = objects(render(profile_values(profile, mode)))
    kinds = {o["kind"] for o in objs}
    assert {"DaemonSet", "ConfigMap", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Service"} <= kinds
    for obj in objs:
        for version in KUBE_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("kind", ["ServiceMonitor", "PodMonitor"])
def test_everything_enabled_validates(tmp_path: Path, kind: str) -> None:
    objs = objects(render(EVERYTHING_ON if kind == "ServiceMonitor" else with_pod_monitor(EVERYTHING_ON)))
    kinds = by_kind(objs)
    assert set(kinds) >= {kind, "PrometheusRule", "NetworkPolicy", "Namespace", "ResourceQuota"}
    assert not CRD_KINDS - {"PrometheusRule", kind} & set(kinds), "one monitor only"
    for obj in objs:
        if obj["kind"] in CRD_KINDS:
            continue  # no upstream schema: checked below
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)
    (monitor,) = kinds[kind]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    (endpoint,) = monitor["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["honorLabels"] is True and endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == daemonset(objs)["spec"]["selector"]["matchLabels"]
    # The listener serves HTTPS with a bearer token: the monitor scrapes https, trusts the given
    # CA, sends the same Secret's token, and drops what metricRelabelings says.
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {"ca": {"secret": {"name": "kpod-ca", "key": "ca.crt"}}}
    assert endpoint["authorization"] == {"type": "Bearer", "credentials": {"name": "kpod-scrape", "key": "token"}}
    assert endpoint["metricRelabelings"] == [
        {"action": "drop", "sourceLabels": ["__name__"], "regex": "kpod_syscall_.*"}
    ]
    (policy,) = kinds["NetworkPolicy"]
    assert policy["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert policy["spec"]["ingress"][0]["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    (quota,) = kinds["ResourceQuota"]
    assert quota["spec"]["scopeSelector"]["matchExpressions"] == [
        {"scopeName": "PriorityClass", "operator": "In", "values": ["system-node-critical"]}]  # fmt: skip
    container = agent_container(objs)
    assert container["securityContext"]["appArmorProfile"] == {"type": "Unconfined"}
    assert (
        container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS" == container["livenessProbe"]["httpGet"]["scheme"]
    )
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert all(mounts[name]["readOnly"] is True for name in ("otlp-tls", "metrics-tls", "scrape-token"))
    volumes = {v["name"]: v for v in daemonset(objs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["metrics-tls"]["secret"]["secretName"] == "kpod-serving"
    assert volumes["scrape-token"]["secret"]["secretName"] == "kpod-scrape"
    config = agent_config(objs, tmp_path)
    assert [e.id for e in config.exporters] == ["prometheus", "otlp"]
    prometheus = config.exporters[0].config
    assert prometheus.tls.cert_file == mounts["metrics-tls"]["mountPath"] + "/tls.crt"
    assert prometheus.tls.key_file == mounts["metrics-tls"]["mountPath"] + "/tls.key"
    assert prometheus.bearer_token_file == mounts["scrape-token"]["mountPath"] + "/token"
    otlp: OtlpConfig = config.exporters[1].config
    assert otlp.endpoint == "collector.observability:4317"
    assert otlp.tls.ca_file == "/etc/kpod-metrics/otlp-tls/ca.crt" and otlp.tls.key_file.startswith(
        mounts["otlp-tls"]["mountPath"]
    )
    assert otlp.headers == {"x-tenant": "a"} and otlp.interval is not None and otlp.interval.seconds == 60
    assert config.kpod.filter.include_labels == ["app", "team"]
    # The filter processor runs after k8sattributes (which adds the labels it may filter on).
    assert [p.id for p in config.processors] == ["k8sattributes", "filter/no-lo"]
    assert config.processors[1].config.exclude == {"interface": ["lo"]}


def test_monitors_scrape_plain_http_without_tls_or_token() -> None:
    for values in ({"serviceMonitor": {"enabled": True}}, {"podMonitor": {"enabled": True}}):
        (monitor,) = [o for o in objects(render(values)) if o["kind"] in CRD_KINDS]
        (endpoint,) = monitor["spec"].get("endpoints") or monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["scheme"] == "http"
        assert not {"tlsConfig", "authorization", "metricRelabelings"} & set(endpoint)


def test_monitors_carry_a_sample_limit() -> None:
    """A scrape of more samples than sampleLimit is refused by Prometheus: no pod can flood it
    through the agent.  On by default on both monitors; 0 means none."""
    for key in ("serviceMonitor", "podMonitor"):
        for given, expected in ((None, 100000), (250000, 250000), (0, None)):
            values: dict[str, Any] = {key: {"enabled": True}}
            if given is not None:
                values[key]["sampleLimit"] = given
            (monitor,) = [o for o in objects(render(values)) if o["kind"] in CRD_KINDS]
            assert monitor["spec"].get("sampleLimit") == expected, (key, given)


def test_image_repository_is_required_with_a_message_that_says_how() -> None:
    with pytest.raises(helm.HelmError, match=r"image.repository is required: build the image \(make image\)"):
        render_chart({})


# The documents a user reads before `helm install`: their commands must work as written.
HELM_DOCS = [REPO / "README.md", REPO / "deploy" / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _set_values(flags: str) -> dict[str, Any]:
    """`--set a.b=x,c=y --set ...` as Helm reads it (booleans and integers typed, keys dotted)."""
    values: dict[str, Any] = {}
    for assignment in re.findall(r"--set[= ]([^\s`]+)", flags):
        for pair in assignment.split(","):
            key, _, text = pair.partition("=")
            value: Any = {"true": True, "false": False}.get(text, int(text) if text.isdigit() else text)
            *parents, leaf = key.split(".")
            node = values
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    return values


def _helm_commands(text: str) -> list[str]:
    """Every `helm install`/`helm upgrade` command of a document, continuation lines joined."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return re.findall(r"^\s*(helm (?:install|upgrade) .*)$", joined, re.M)


def _leaves(values: dict[str, Any], prefix: str = "") -> list[str]:
    return [
        leaf
        for key, value in values.items()
        for leaf in (_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else [f"{prefix}{key}"])
    ]


def _in_schema(path: str) -> bool:
    """Whether values.schema.json names this dotted value (its properties, level by level)."""
    node = json.loads((CHART / "values.schema.json").read_text())
    for part in path.split("."):
        node = node.get("properties", {}).get(part)
        if node is None:
            return False
    return True


def test_documented_helm_commands_and_settings_render() -> None:
    """A user copies the docs' commands: each `helm install`/`helm upgrade` renders as written
    (image included: the chart has no default image), and every `--set` the prose suggests
    names a value of the chart and renders with the install command's image."""
    commands: list[tuple[str, str]] = []
    suggested: list[tuple[str, str]] = []
    for doc in HELM_DOCS:
        name, text = str(doc.relative_to(REPO)), doc.read_text()
        commands += [(name, command) for command in _helm_commands(text)]
        prose = re.sub(r"^\s*helm (?:install|upgrade) .*$", "", re.sub(r"\\\n\s*", " ", text), flags=re.M)
        suggested += [(name, flag) for flag in re.findall(r"--set[= ][^\s`]+", prose)]
    assert any(name == "README.md" and "install" in command for name, command in commands), commands
    assert suggested, "the docs suggest --set flags (priority class quota, monitors)"
    for name, command in [*commands, *suggested]:
        values = _set_values(command)
        unknown = [leaf for leaf in _leaves(values) if not _in_schema(leaf)]
        assert not unknown, f"{name}: {command}: no such chart value {unknown}"
        if (name, command) in suggested:
            values.setdefault("image", {}).setdefault("repository", IMAGE)
        try:
            objs = objects(render_chart(values))
        except helm.HelmError as error:
            raise AssertionError(f"{name}: `{command}` does not render: {error}") from None
        repository = values["image"]["repository"]
        assert agent_container(objs)["image"].startswith(f"{repository}:"), (name, command)


def test_prometheusrule_groups_pass_promtool(tmp_path: Path) -> None:
    require_tools("promtool")
    (rule,) = by_kind(objects(render({"prometheusRule": {"enabled": True}})))["PrometheusRule"]
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    result = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    source = yaml.safe_load((CHART / "files" / "kpod-metrics.rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


# ----------------------------------------------------------------------------- security


@pytest.mark.parametrize(("profile", "mode"), RENDERS)
def test_least_privilege(profile: str, mode: str) -> None:
    objs = objects(render(profile_values(profile, mode)))
    pod = daemonset(objs)["spec"]["template"]["spec"]
    container = agent_container(objs)
    security = container["securityContext"]
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    assert security["capabilities"]["add"] == documented_capabilities()
    assert security["seccompProfile"] == {"type": "RuntimeDefault"} == pod["securityContext"]["seccompProfile"]
    assert pod["hostPID"] is True  # cgroup.procs gives PIDs in the reader's PID namespace
    assert pod["hostNetwork"] is False
    assert "hostIPC" not in pod
    volumes = {v["name"]: v for v in pod["volumes"]}
    host_paths = {v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v}
    assert host_paths == HOST_PATHS
    for mount in container["volumeMounts"]:
        assert mount["readOnly"] is True, mount
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["proc"] == "/host/proc" and mounts["cgroup"] == "/sys/fs/cgroup"
    # BTF comes from the container's own sysfs (test_a_fresh_sysfs_shows_kernel_btf), no mount.
    assert set(mounts) == {"config", "cgroup", "proc"}


def test_otlp_tls_with_only_a_ca(tmp_path: Path) -> None:
    values = {"otlp": {"enabled": True, "endpoint": "https://collector:4318/v1/metrics", "protocol": "http/protobuf",
                       "tlsSecretName": "collector-ca"}}  # fmt: skip
    config = agent_config(objects(render(values)), tmp_path)
    otlp: OtlpConfig = config.exporters[1].config
    assert otlp.tls.ca_file == "/etc/kpod-metrics/otlp-tls/ca.crt"
    assert otlp.tls.cert_file == "" and otlp.tls.key_file == ""
    assert otlp.protocol == "http/protobuf"


def test_no_host_mount_can_block_a_node_without_btf() -> None:
    """A hostPath whose path is missing keeps the pod in ContainerCreating: the chart mounts only
    /sys/fs/cgroup and /proc (on every Linux node), never /sys/kernel/btf; tracefs is opt-in."""
    pod = daemonset(objects(render({})))["spec"]["template"]["spec"]
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} == HOST_PATHS
    objs = objects(render({"hostMounts": {"tracefs": True}}))
    volumes = {v["name"]: v for v in daemonset(objs)["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tracefs"]["hostPath"]["path"] == "/sys/kernel/tracing"
    mounts = {m["name"]: m for m in agent_container(objs)["volumeMounts"]}
    assert mounts["tracefs"] == {"name": "tracefs", "mountPath": "/sys/kernel/tracing", "readOnly": True}
    for obj in objs:
        kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/sys/kernel/btf/vmlinux"),
                    reason="needs root (mount) and a kernel with BTF")  # fmt: skip
def test_a_fresh_sysfs_shows_kernel_btf(tmp_path: Path) -> None:
    """What a container runtime gives a non-privileged container: a new mount and network
    namespace with sysfs mounted read-only.  That sysfs shows /sys/kernel/btf/vmlinux, the same
    bytes as the host's: the agent needs no hostPath for BTF (so none can block a node)."""
    require_tools("unshare")
    target = tmp_path / "sys"
    target.mkdir()
    script = f"mount -t sysfs -o ro sysfs {target} && sha256sum {target}/kernel/btf/vmlinux"
    result = subprocess.run(["unshare", "--mount", "--net", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    inside = result.stdout.split()[0]
    host = hashlib.sha256(Path("/sys/kernel/btf/vmlinux").read_bytes()).hexdigest()
    assert inside == host
    assert not os.path.ismount(target)  # it lived in the child's namespace only


def test_cgroup_only_deployment_drops_bpf_capabilities() -> None:
    """config.bpf.enabled false: nothing loads BPF programs, so CAP_BPF and CAP_PERFMON go, and
    the schema lets the capability list leave them out; with eBPF on it insists on both."""
    objs = objects(render({"config": {"bpf": {"enabled": False}}}))
    assert agent_container(objs)["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE", "DAC_READ_SEARCH"]
    objs = objects(render({"config": {"bpf": {"enabled": False}}, "capabilities": ["SYS_PTRACE"]}))
    assert agent_container(objs)["securityContext"]["capabilities"]["add"] == ["SYS_PTRACE"]
    with pytest.raises(helm.HelmError, match="PERFMON"):
        render({"capabilities": ["BPF", "SYS_PTRACE"]})


def test_capabilities_doc_names_the_measured_set() -> None:
    assert documented_capabilities() == ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["capabilities"] == documented_capabilities()


def test_proc_and_cgroup_mounts_follow_the_configured_roots(tmp_path: Path) -> None:
    values = {"config": {"cgroup": {"root": "/host/sys/fs/cgroup", "procRoot": "/hostproc"}}}
    objs = objects(render(values))
    mounts = {m["name"]: m["mountPath"] for m in agent_container(objs)["volumeMounts"]}
    assert mounts["proc"] == "/hostproc" and mounts["cgroup"] == "/host/sys/fs/cgroup"
    config = agent_config(objs, tmp_path)
    assert config.kpod.cgroup.proc_root == "/hostproc" and config.kpod.cgroup.root == "/host/sys/fs/cgroup"


@pytest.mark.parametrize("mode", MODES)
def test_rbac_is_read_only_pods_and_the_kubelet_only_in_kubelet_mode(mode: str) -> None:
    objs = objects(render({"config": {"discovery": {"mode": mode}}}))
    kinds = by_kind(objs)
    assert "Role" not in kinds and "RoleBinding" not in kinds
    (role,) = kinds["ClusterRole"]
    rules = [(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]]
    expected = [(("",), ("pods",), ("get", "list", "watch"))]
    if mode == "kubelet":  # the narrow subresource by default (kubelets >= 1.33)
        expected.append((("",), ("nodes/pods",), ("get",)))
    assert rules == expected
    (binding,) = kinds["ClusterRoleBinding"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (account,) = kinds["ServiceAccount"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": "kpod-metrics"}
    ]


def test_kubelet_mode_can_fall_back_to_nodes_proxy() -> None:
    values = {"config": {"discovery": {"mode": "kubelet"}}, "rbac": {"kubeletResource": "nodes/proxy"}}
    (role,) = by_kind(objects(render(values)))["ClusterRole"]
    assert role["rules"][1] == {"apiGroups": [""], "resources": ["nodes/proxy"], "verbs": ["get"]}
    with pytest.raises(helm.HelmError, match="kubeletResource"):
        render({"rbac": {"kubeletResource": "nodes/*"}})


def test_daemonset_shape() -> None:
    objs = objects(render({}))
    ds = daemonset(objs)
    pod = ds["spec"]["template"]["spec"]
    container = agent_container(objs)
    assert pod["tolerations"] == [{"operator": "Exists"}]
    assert pod["priorityClassName"] == "system-node-critical"
    assert ds["spec"]["updateStrategy"]["type"] == "RollingUpdate"
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["NODE_NAME"] == "spec.nodeName" and env["NODE_IP"] == "status.hostIP"
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics", "scheme": "HTTP"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics", "scheme": "HTTP"}
    assert container["resources"]["requests"] and container["resources"]["limits"]
    (service,) = by_kind(objs)["Service"]
    assert service["spec"]["selector"] == ds["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"


def test_config_change_rolls_the_daemonset() -> None:
    def checksum(values: dict[str, Any]) -> str:
        return daemonset(objects(render(values)))["spec"]["template"]["metadata"]["annotations"]["checksum/config"]

    assert checksum({}) == checksum({})
    assert checksum({}) != checksum({"config": {"pollInterval": 15000}})


# ----------------------------------------------------------------------------- the agent config


@pytest.mark.parametrize(("profile", "mode"), RENDERS)
def test_rendered_config_is_valid_for_the_agent(profile: str, mode: str, tmp_path: Path) -> None:
    values = profile_values(profile, mode)
    values["config"].update(
        pollInterval=15000,
        discovery={"mode": mode, "kubeletPollInterval": 45},
        filter={"namespaces": ["shop"], "excludeNamespaces": [], "labelSelector": "app in (web),!canary"},
        syscall={"trackedSyscalls": ["read", "write"]},
        receivers={"net_iface": {"exclude_interfaces": ["lo", "cilium_host"]}},
    )
    objs = objects(render(values))
    config = agent_config(objs, tmp_path)
    kpod = config.kpod
    assert kpod.profile == profile and kpod.discovery.mode == mode
    assert kpod.poll_interval.seconds == 15 and kpod.discovery.kubelet.poll_interval.seconds == 45
    assert kpod.discovery.kubelet.url == "https://10.0.0.7:10250/pods"
    assert kpod.node_name == "node-a"
    assert kpod.cgroup.proc_root == "/host/proc"
    assert kpod.filter.namespaces == ["shop"] and kpod.filter.exclude_namespaces == []
    assert kpod.filter.label_selector == "app in (web),!canary"
    assert kpod.syscall.tracked_syscalls == ["read", "write"]
    receivers = [r.id for r in config.receivers]
    if profile == "custom":
        assert receivers == ["cgroup_cpu", "cgroup_memory", "cpu_sched"]
    else:
        from kpod.profiles import profile_receivers

        assert receivers == [name for name, _ in profile_receivers(profile)]
    if "net_iface" in receivers:
        net = next(r for r in config.receivers if r.id == "net_iface")
        assert net.config.exclude_interfaces == ["lo", "cilium_host"]
    assert [e.id for e in config.exporters] == ["prometheus"]
    port = agent_container(objs)["ports"][0]["containerPort"]
    assert config.exporters[0].config.endpoint == f"0.0.0.0:{port}"


def test_defaults_are_the_agents_defaults_where_the_spec_does_not_differ(tmp_path: Path) -> None:
    """The chart changes only proc_root (the host's /proc is mounted there) and the discovery mode."""
    from kpod.settings import KpodSettings

    config = agent_config(objects(render({})), tmp_path)
    defaults = KpodSettings()
    assert config.kpod.profile == defaults.profile
    assert config.kpod.poll_interval.seconds == defaults.poll_interval.seconds
    assert config.kpod.filter == defaults.filter
    assert config.kpod.syscall == defaults.syscall
    assert config.kpod.bpf.map_max_entries == defaults.bpf.map_max_entries
    assert config.kpod.cgroup.root == defaults.cgroup.root


# ----------------------------------------------------------------------------- schema and lint


# Each wrong value with the place in the values that the schema names: it is refused for its own
# reason (not for another value that the test happens to get wrong).
BAD_VALUES: list[tuple[dict[str, Any], str]] = [
    ({"config": {"pollInterval": "30s"}}, "/config/pollInterval"),
    ({"config": {"pollInterval": 10}}, "/config/pollInterval"),
    ({"config": {"profile": "maximal"}}, "/config/profile"),
    ({"config": {"profile": "custom"}}, "/config/pipelineReceivers"),  # custom needs pipelineReceivers
    ({"config": {"discovery": {"mode": "local"}}}, "/config/discovery/mode"),
    ({"config": {"discovery": {"kubeletPollInterval": "30"}}}, "/config/discovery/kubeletPollInterval"),
    ({"config": {"cgroup": {"procRoot": "host/proc"}}}, "/config/cgroup/procRoot"),
    ({"config": {"filter": {"excludeNamespaces": "kube-system"}}}, "/config/filter/excludeNamespaces"),
    ({"config": {"filters": {}}}, "/config"),  # a typo is an error, not a silently ignored key
    ({"config": {"bpf": {"enabled": "yes"}}}, "/config/bpf/enabled"),
    ({"config": {"bpf": {"mapMaxEntries": 0}}}, "/config/bpf/mapMaxEntries"),
    # not a syscall name (lower case)
    ({"config": {"syscall": {"trackedSyscalls": ["Read"]}}}, "/config/syscall/trackedSyscalls/0"),
    ({"image": {"repository": 5}}, "/image/repository"),
    ({"resources": "small"}, "/resources"),
    ({"capabilities": ["SYS_ADMIN", "BPF", "PERFMON"]}, "/capabilities/0"),
    ({"capabilities": ["SYS_PTRACE"]}, "/capabilities"),
    ({"hostPID": "true"}, "/hostPID"),
    ({"otlp": {"enabled": True}}, "/otlp/endpoint"),  # no endpoint
    ({"otlp": {"protocol": "http"}}, "/otlp/protocol"),
    ({"otlp": {"tlsClientCert": "yes"}}, "/otlp/tlsClientCert"),
    ({"serviceMonitor": {"enabled": 1}}, "/serviceMonitor/enabled"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"tolerations": {"operator": "Exists"}}, "/tolerations"),
    ({"hostMounts": {"tracefs": "no"}}, "/hostMounts/tracefs"),
    # no such mount any more: an error, not silently ignored
    ({"hostMounts": {"btf": True}}, "/hostMounts"),
    # every agent scraped twice
    ({"serviceMonitor": {"enabled": True}, "podMonitor": {"enabled": True}}, "/podMonitor/enabled"),
    # a monitor selecting nothing
    ({"serviceMonitor": {"enabled": True}, "service": {"enabled": False}}, "/service/enabled"),
    ({"serviceMonitor": {"scheme": "ftp"}}, "/serviceMonitor/scheme"),
    ({"metrics": {"bearerTokenSecret": {"name": "t", "key": ""}}}, "/metrics/bearerTokenSecret/key"),
    ({"priorityClassQuota": {"pods": 0}}, "/priorityClassQuota/pods"),
    ({"serviceMonitor": {"sampleLimit": -1}}, "/serviceMonitor/sampleLimit"),
    ({"podMonitor": {"sampleLimit": "100k"}}, "/podMonitor/sampleLimit"),
]


@pytest.mark.parametrize(("values", "where"), BAD_VALUES,
                         ids=[yaml.safe_dump(v, default_flow_style=True).strip() for v, _ in BAD_VALUES])  # fmt: skip
def test_schema_rejects_wrong_values(values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmError) as refused:
        render(values)
    assert f"at '{where}'" in str(refused.value), str(refused.value)


def test_schema_accepts_every_default_and_the_full_example() -> None:
    chart = helm.Chart.load(str(CHART))
    chart.validate_schema({})
    chart.validate_schema(copy.deepcopy(EVERYTHING_ON))
    chart.validate_schema(with_pod_monitor(EVERYTHING_ON))


def test_helm_lint_is_clean() -> None:
    report = helm.lint(str(CHART), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report.get("errors"), report


def test_notes_tell_how_to_verify() -> None:
    notes = render({})["kpod-metrics/templates/NOTES.txt"]
    for command in ("rollout status ds/kpod-metrics", "kpod-metrics check", "/metrics", "/debug/status"):
        assert command in notes


# ----------------------------------------------------------------------------- plain manifests


def test_plain_manifests_equal_a_fresh_render() -> None:
    fresh = manifest_texts()
    committed = {p.name: p.read_text() for p in MANIFESTS.glob("*.yaml")}
    assert set(committed) == set(fresh), "run `make manifests`"
    for name, text in fresh.items():
        assert committed[name] == text, f"deploy/manifests/{name} is stale: run `make manifests`"


def test_plain_manifests_validate() -> None:
    for path in MANIFESTS.glob("*.yaml"):
        for obj in yaml.safe_load_all(path.read_text()):
            if obj and obj["kind"] not in CRD_KINDS:
                kubernetes_validate.validate(obj, KUBE_VERSIONS[-1], strict=True)


def test_render_module_constants_match_the_chart() -> None:
    assert yaml.safe_load((CHART / "Chart.yaml").read_text())["name"] == render_manifests.RELEASE


# ----------------------------------------------------------------------------- seccomp


def _rules_by_syscall(profile: dict[str, Any]) -> dict[str, list[str]]:
    """Every syscall's rules (action, args, conditions) as comparable text."""
    out: dict[str, list[str]] = {}
    for rule in profile["syscalls"]:
        shape = {k: rule.get(k) for k in ("action", "args", "includes", "excludes", "errnoRet")}
        for name in rule["names"]:
            out.setdefault(name, []).append(json.dumps(shape, sort_keys=True))
    return out


@pytest.mark.skipif(not gen_seccomp_profile.BASE.exists(), reason="containers/common's default seccomp profile "
                    "is not installed (make setup installs podman)")  # fmt: skip
def test_shipped_seccomp_profile_is_the_runtime_default_plus_bpf_and_perf_event_open() -> None:
    base = json.loads(gen_seccomp_profile.BASE.read_text())
    shipped = json.loads(gen_seccomp_profile.OUTPUT.read_text())
    assert shipped == gen_seccomp_profile.with_bpf_allowed(base), "stale: run `make manifests`"
    before, after = _rules_by_syscall(base), _rules_by_syscall(shipped)
    changed = {name for name in before.keys() | after.keys() if before.get(name) != after.get(name)}
    assert changed == {"bpf", "perf_event_open"}
    allow = json.dumps({"action": "SCMP_ACT_ALLOW", "args": [], "errnoRet": None, "excludes": {}, "includes": {}},
                       sort_keys=True)  # fmt: skip
    assert after["bpf"] == after["perf_event_open"] == [allow], "allowed once, with no condition"
    assert shipped["defaultAction"] == base["defaultAction"] == "SCMP_ACT_ERRNO"
