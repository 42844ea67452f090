"""A real container engine for the tests: podman, configured by deploy/podman/containers.conf.

`podman(...)` runs podman with that configuration (runc, cgroupfs, the machine's rlimits); the
machine's own containers.conf is never read or changed.  `build_image(tag)` builds the image
with `make image`, the command a user runs.  `ChartRun` turns the agent container of a
rendered DaemonSet into `podman run` flags: every field of the pod and container spec is either
translated or refused with its name, so a chart change changes (or stops) what is tested.

podman's image and container storage is machine-wide: everything made here has a name with
this process's pid and a random part, and is removed by that name.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import require_tools
from runc_pods import cgroup_mounts, remove_cgroup_dir

REPO = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
CHART_SECCOMP_DIR = REPO / "deploy" / "helm" / "kpod-metrics" / "files" / "seccomp"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
BASE_IMAGE = "localhost/kpod-python-base:3.11-bookworm"  # the Makefile's BASE_IMAGE


def engine_env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def engine_skip_reason() -> str | None:
    """Why the container tests cannot run on this host (one line), or None.  A missing engine
    is not a reason: `make setup` installs it, and `require_engine()` fails without it."""
    if os.geteuid() != 0:
        return "needs root (podman and runc as root, cgroups, network namespaces)"
    return None


def require_engine() -> None:
    """Fail (not skip) when the engine `make setup` installs is missing."""
    require_tools("podman", "runc", "mmdebstrap", "make", "ip", "nsenter")


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["podman", *args], capture_output=True, text=True, env=engine_env(), timeout=timeout,
                            **kwargs)  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args[:3])}... exited {result.returncode}: {result.stderr[-3000:]}")
    return result


def unique_name(kind: str) -> str:
    return f"kpod-test-{kind}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


@dataclass(frozen=True)
class BuiltImage:
    name: str
    size_bytes: int
    build_seconds: float
    base_image: str


def build_image(tag: str, log: Path) -> None:
    """`make image` into `tag`, without intermediate layer images (nothing is left behind but
    `tag` itself and the machine's base image, which is made once and reused), its RUN steps
    below a cgroup parent of its own."""
    with open(log, "w") as out, cgroup_parent() as parent:
        result = subprocess.run(
            ["make", "--no-print-directory", "image", f"IMAGE={tag}", "IMAGE_BUILD_FLAGS=--layers=false",
             f"IMAGE_BUILD_CGROUP={parent}"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=engine_env(), timeout=1800,
        )  # fmt: skip
    if result.returncode != 0:
        raise AssertionError(f"make image failed ({result.returncode}); log {log}:\n{log.read_text()[-4000:]}")


def image_size(name: str) -> int:
    return int(podman("image", "inspect", "--format", "{{.Size}}", name).stdout.strip())


def remove_image(name: str) -> None:
    podman("rmi", "--force", name, check=False)


def remove_container(name: str) -> None:
    podman("rm", "--force", "--time", "0", name, check=False)


@contextlib.contextmanager
def cgroup_parent() -> Iterator[str]:
    """A cgroup parent of our own for podman containers (`--cgroup-parent`); podman's default,
    /libpod_parent, would stay behind.  Removed from every hierarchy once the container is gone."""
    name = f"/{unique_name('cgroups')}"
    try:
        yield name
    finally:
        for root in cgroup_mounts():
            remove_cgroup_dir(root / name.lstrip("/"))


def container_pid(name: str) -> int:
    return int(podman("inspect", "--format", "{{.State.Pid}}", name).stdout.strip())


# ----------------------------------------------------------------------------- the chart


class ChartNotEmulated(AssertionError):
    """The rendered DaemonSet sets something these tests do not know how to reproduce."""


# Fields of the pod spec: translated below, or irrelevant to one container on one node.
POD_FIELDS_IGNORED = {"serviceAccountName", "priorityClassName", "dnsPolicy", "nodeSelector", "affinity",
                      "tolerations", "imagePullSecrets"}  # fmt: skip
POD_FIELDS_TRANSLATED = {"containers", "volumes", "hostPID", "hostNetwork", "hostIPC", "securityContext",
                         "automountServiceAccountToken", "terminationGracePeriodSeconds"}  # fmt: skip
CONTAINER_FIELDS_IGNORED = {"name", "image", "imagePullPolicy", "ports", "livenessProbe", "readinessProbe"}
CONTAINER_FIELDS_TRANSLATED = {"args", "command", "env", "resources", "securityContext", "volumeMounts"}
SECURITY_FIELDS = {"privileged", "allowPrivilegeEscalation", "readOnlyRootFilesystem", "runAsUser", "runAsGroup",
                   "runAsNonRoot", "capabilities", "seccompProfile", "appArmorProfile"}  # fmt: skip


def _refuse_unknown(where: str, spec: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(spec) - known)
    if unknown:
        raise ChartNotEmulated(f"the chart sets {where}.{', '.join(unknown)}: tests/engine.py does not emulate it")


def _quantity_bytes(text: str) -> int:
    units = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "k": 10**3, "M": 10**6, "G": 10**9}
    for suffix, factor in units.items():
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _quantity_cpus(text: str) -> str:
    return f"{int(text[:-1]) / 1000:g}" if text.endswith("m") else text


def apparmor_enabled() -> bool:
    try:
        return Path("/sys/module/apparmor/parameters/enabled").read_text().strip() == "Y"
    except OSError:
        return False


@dataclass
class Node:
    """What the kubelet and the CNI give a pod on this node."""

    name: str
    host_ip: str  # status.hostIP
    pod_ip: str = ""  # status.podIP
    netns: str = ""  # path of the pod's network namespace (hostNetwork: false)
    # KUBERNETES_SERVICE_HOST/PORT, as the kubelet injects into every container.
    service_host: str = ""
    service_port: int = 0
    # The projected ServiceAccount volume (token, ca.crt, namespace).
    service_account_dir: str = ""
    # Where Localhost seccomp profiles live (the kubelet's <root-dir>/seccomp).
    seccomp_dir: Path = CHART_SECCOMP_DIR


@dataclass
class ChartRun:
    """`podman run` flags for the agent container of a rendered chart, on `node`."""

    objects: list[dict[str, Any]]
    node: Node
    workdir: Path
    flags: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    entrypoint: list[str] | None = None
    stop_timeout: int = 30
    seccomp: str = ""  # what the container got: RuntimeDefault | Unconfined | Localhost <path>
    readiness_path: str = ""
    metrics_port: int = 0
    check_host_paths: bool = True  # a hostPath of type Directory that is missing fails, as the kubelet would

    def __post_init__(self) -> None:
        (ds,) = [o for o in self.objects if o["kind"] == "DaemonSet"]
        configmaps = {o["metadata"]["name"]: o for o in self.objects if o["kind"] == "ConfigMap"}
        pod = ds["spec"]["template"]["spec"]
        _refuse_unknown("spec.template.spec", pod, POD_FIELDS_IGNORED | POD_FIELDS_TRANSLATED)
        (container,) = pod["containers"]
        _refuse_unknown("containers[0]", container, CONTAINER_FIELDS_IGNORED | CONTAINER_FIELDS_TRANSLATED)
        flags: list[str] = []

        # Namespaces.
        if pod.get("hostPID"):
            flags.append("--pid=host")
        if pod.get("hostIPC"):
            flags.append("--ipc=host")
        if pod.get("hostNetwork"):
            flags.append("--network=host")
        else:
            assert self.node.netns, "hostNetwork: false needs a pod network namespace"
            flags.append(f"--network=ns:{self.node.netns}")

        # Security context (the container's wins over the pod's, as in Kubernetes).
        pod_security = pod.get("securityContext", {})
        _refuse_unknown("spec.template.spec.securityContext", pod_security, SECURITY_FIELDS)
        security = {**pod_security, **container.get("securityContext", {})}
        _refuse_unknown("containers[0].securityContext", security, SECURITY_FIELDS)
        if security.get("privileged"):
            flags.append("--privileged")
        if security.get("allowPrivilegeEscalation") is False:
            flags.append("--security-opt=no-new-privileges")
        if security.get("readOnlyRootFilesystem"):
            # Kubernetes adds no tmpfs of its own to a read-only root; podman would (/tmp, /run).
            flags += ["--read-only", "--read-only-tmpfs=false"]
        if "runAsUser" in security or "runAsGroup" in security:
            flags.append(f"--user={security.get('runAsUser', 0)}:{security.get('runAsGroup', 0)}")
        caps = security.get("capabilities", {})
        # Kubernetes' "ALL" and capability names without the CAP_ prefix.
        flags += [f"--cap-drop={c.lower()}" for c in caps.get("drop", [])]
        flags += [f"--cap-add=CAP_{c}" for c in caps.get("add", [])]
        seccomp = security.get("seccompProfile", {"type": "RuntimeDefault"})
        if seccomp["type"] == "RuntimeDefault":
            self.seccomp = "RuntimeDefault"
        elif seccomp["type"] == "Unconfined":
            flags.append("--security-opt=seccomp=unconfined")
            self.seccomp = "Unconfined"
        elif seccomp["type"] == "Localhost":
            path = self.node.seccomp_dir / seccomp["localhostProfile"]
            assert path.is_file(), f"Localhost seccomp profile {path} does not exist"
            flags.append(f"--security-opt=seccomp={path}")
            self.seccomp = f"Localhost {path}"
        else:
            raise ChartNotEmulated(f"seccompProfile type {seccomp['type']}")
        apparmor = security.get("appArmorProfile")
        if apparmor and apparmor_enabled():
            raise ChartNotEmulated("appArmorProfile on a host with AppArmor enabled")

        # Volumes.
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            _refuse_unknown(f"volumeMounts[{mount['name']}]", mount, {"name", "mountPath", "readOnly"})
            volume = volumes[mount["name"]]
            mode = "ro" if mount.get("readOnly") else "rw"
            if "hostPath" in volume:
                source = volume["hostPath"]["path"]
                kind = volume["hostPath"].get("type", "")
                if self.check_host_paths and kind == "Directory" and not os.path.isdir(source):
                    raise AssertionError(f"hostPath {source} (type Directory) does not exist: the pod would not start")
            elif "configMap" in volume:
                data = configmaps[volume["configMap"]["name"]]["data"]
                source_dir = self.workdir / f"configmap-{mount['name']}"
                source_dir.mkdir(exist_ok=True)
                for key, text in data.items():
                    (source_dir / key).write_text(text)
                source = str(source_dir)
            else:
                raise ChartNotEmulated(f"volume {mount['name']}: {sorted(set(volume) - {'name'})}")
            flags.append(f"--volume={source}:{mount['mountPath']}:{mode}")
        if pod.get("automountServiceAccountToken", True):
            assert self.node.service_account_dir, "automountServiceAccountToken needs a token directory"
            flags.append(f"--volume={self.node.service_account_dir}:{SERVICE_ACCOUNT_DIR}:ro")

        # Environment: the container's, then what the kubelet injects.
        fields = {"spec.nodeName": self.node.name, "status.hostIP": self.node.host_ip,
                  "status.podIP": self.node.pod_ip}  # fmt: skip
        for env in container.get("env", []):
            if "value" in env:
                value = env["value"]
            elif "fieldRef" in env.get("valueFrom", {}):
                path = env["valueFrom"]["fieldRef"]["fieldPath"]
                if path not in fields:
                    raise ChartNotEmulated(f"env {env['name']} from fieldRef {path}")
                value = fields[path]
            else:
                raise ChartNotEmulated(f"env {env['name']}: {env.get('valueFrom')}")
            flags.append(f"--env={env['name']}={value}")
        if self.node.service_host:
            flags += [f"--env=KUBERNETES_SERVICE_HOST={self.node.service_host}",
                      f"--env=KUBERNETES_SERVICE_PORT={self.node.service_port}"]  # fmt: skip

        # Resources: the limits are what the runtime enforces.
        limits = container.get("resources", {}).get("limits", {})
        if "memory" in limits:
            flags.append(f"--memory={_quantity_bytes(limits['memory'])}")
        if "cpu" in limits:
            flags.append(f"--cpus={_quantity_cpus(str(limits['cpu']))}")

        self.stop_timeout = int(pod.get("terminationGracePeriodSeconds", 30))
        self.flags = flags
        self.args = list(container.get("args", []))
        self.entrypoint = container.get("command")
        probe = container.get("readinessProbe", {}).get("httpGet", {})
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        self.readiness_path = probe.get("path", "")
        self.metrics_port = ports.get(probe.get("port"), probe.get("port", 0))

    def command(self, name: str, image: str, *, cgroup_parent: str, args: list[str] | None = None) -> list[str]:
        """`podman run --detach` of `image` as the chart runs it (the container's own cgroup
        goes below `cgroup_parent`)."""
        entry = ["--entrypoint", json.dumps(self.entrypoint)] if self.entrypoint else []
        return ["run", "--detach", f"--name={name}", "--pull=never", f"--cgroup-parent={cgroup_parent}",
                f"--stop-timeout={self.stop_timeout}", *self.flags, *entry, image,
                *(self.args if args is None else args)]  # fmt: skip


def container_logs(name: str) -> str:
    result = podman("logs", name, check=False)
    return result.stdout + result.stderr
