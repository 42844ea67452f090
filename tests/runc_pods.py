"""Pods made by runc, laid out the way containerd lays them out for the kubelet.

A pod is a sandbox ("pause") container with its own PID, network, IPC and UTS namespaces, and
app containers that join its network, IPC and UTS namespaces.  Every container is an OCI bundle
(config.json from `runc spec`, a rootfs) whose `linux.cgroupsPath` is exactly what the kubelet
asks for:

    cgroupfs driver  /kubepods/<qos>/pod<uid>/<64-hex container id>   (Guaranteed: /kubepods/pod<uid>/...)
    systemd driver   /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid_>.slice/cri-containerd-<id>.scope

(the systemd names given to runc as plain paths: runc's cgroupfs manager makes them in every v1
hierarchy and in the cgroup2 tree, as containerd's runc does under the systemd driver).  Memory
limits go in `linux.resources.memory.limit`.  Containers are deleted as a runtime deletes them
(`runc kill`, then `runc delete`, which removes the container's cgroup); the pod cgroup, which
the kubelet owns, is removed when the pod goes.

The rootfs of a workload container is a directory with the machine's /usr and /etc bind-mounted
read-only (a Python or C program from the machine runs in it).  A container's stdin and stdout
are pipes held by the test (as containerd's shim holds FIFOs): `send()` and `readline()`.

Cleanup, also when a test fails: every container of our private runc state directory is
force-deleted, the pod cgroups we made are removed, and the shared parents (/kubepods,
kubepods/besteffort...) only when we created them, they bear kernel_util's mark and are empty
(the same lock and mark as kernel_util's cgroup trees).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fake_apiserver import make_pod
from kernel_util import _child_dirs, _mark, _marked, _tree_lock

QOS_CLASSES = ("guaranteed", "burstable", "besteffort")
CFS_PERIOD_US = 100_000  # the kubelet's cpu.cfs_period_us


def cgroup_mounts() -> list[Path]:
    """Every cgroup hierarchy mounted here (v1 controllers, named ones, cgroup2), once each."""
    found: list[Path] = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            if right.split()[0] in ("cgroup", "cgroup2"):
                path = Path(left.split()[4])
                if path not in found:
                    found.append(path)
    return found


def remove_cgroup_dir(path: Path) -> None:
    """rmdir a cgroup, retrying while the tasks of a deleted container are still exiting."""
    for _ in range(100):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)


def pod_cgroup(driver: str, qos: str, uid: str) -> str:
    """The pod's cgroup as the kubelet names it (`--cgroup-root=/`)."""
    assert qos in QOS_CLASSES, qos
    if driver == "cgroupfs":
        return "/kubepods" + ("" if qos == "guaranteed" else f"/{qos}") + f"/pod{uid}"
    assert driver == "systemd", driver
    flat = uid.replace("-", "_")
    if qos == "guaranteed":
        return f"/kubepods.slice/kubepods-pod{flat}.slice"
    return f"/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{flat}.slice"


def container_cgroup(driver: str, qos: str, uid: str, container_id: str) -> str:
    """`linux.cgroupsPath` as containerd passes it to runc for the kubelet."""
    leaf = container_id if driver == "cgroupfs" else f"cri-containerd-{container_id}.scope"
    return f"{pod_cgroup(driver, qos, uid)}/{leaf}"


def new_container_id() -> str:
    return uuid.uuid4().hex + uuid.uuid4().hex  # 64 hex digits, as containerd's


def _run(*args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()[-2000:]}")
    return result


_SPEC_CACHE: dict[str, Any] = {}


def runc_default_spec() -> dict[str, Any]:
    """`runc spec` of the installed runc (its OCI version and defaults)."""
    if not _SPEC_CACHE:
        scratch = Path(f"/tmp/kpod-test-runc-spec-{os.getpid()}-{uuid.uuid4().hex[:6]}")
        scratch.mkdir()
        try:
            _run("runc", "spec", "--bundle", str(scratch))
            _SPEC_CACHE.update(json.loads((scratch / "config.json").read_text()))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return json.loads(json.dumps(_SPEC_CACHE))


@dataclass
class Mount:
    destination: str
    source: str = ""
    type: str = "bind"
    options: Sequence[str] = ("rbind", "ro")

    def spec(self) -> dict[str, Any]:
        return {"destination": self.destination, "type": self.type, "source": self.source or self.type,
                "options": list(self.options)}  # fmt: skip


@dataclass
class RuncContainer:
    runtime: RuncRuntime
    pod: RuncPod
    name: str
    id: str
    bundle: Path
    cgroups_path: str
    process: subprocess.Popen[bytes] | None = None
    pid: int = 0
    deleted: bool = False

    # -- talking to the process -------------------------------------------------------------

    def send(self, line: str) -> None:
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def readline(self, timeout: float = 30.0) -> str:
        assert self.process is not None and self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"container {self.pod.name}/{self.name} printed nothing in {timeout}s: {self.log()}")
        return self.process.stdout.readline().decode().strip()

    def log(self) -> str:
        try:
            return (self.bundle / "stderr.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def proc_state(self) -> str:
        try:
            return Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return ""

    def wait_blocked(self, timeout: float = 10.0) -> None:
        """Until the container's process sleeps (waiting for its next line)."""
        deadline = time.monotonic() + timeout
        while self.proc_state() != "S" and time.monotonic() < deadline:
            time.sleep(0.002)
        assert self.proc_state() == "S", f"{self.name}: process {self.pid} did not block"

    # -- the runtime's view -----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        result = self.runtime.runc("state", self.id, check=False)
        return json.loads(result.stdout) if result.returncode == 0 else {"status": "deleted"}

    def status(self) -> str:
        return str(self.state()["status"])

    def wait_stopped(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.status() != "stopped":
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} still {self.status()} after {timeout}s")
            time.sleep(0.05)

    def cgroup_dirs(self) -> list[Path]:
        """The container's cgroup in every hierarchy where it exists now."""
        relative = self.cgroups_path.lstrip("/")
        return [root / relative for root in cgroup_mounts() if (root / relative).is_dir()]

    def delete(self) -> None:
        """As a runtime stops and removes a container: SIGKILL (if running), wait, delete."""
        if self.deleted:
            return
        if self.status() == "running":
            self.runtime.runc("kill", self.id, "KILL", check=False)
            with contextlib.suppress(AssertionError):
                self.wait_stopped(10)
        self.runtime.runc("delete", "--force", self.id, check=False)
        self.deleted = True
        self._close_pipes()

    def _close_pipes(self) -> None:
        if self.process is not None:
            for stream in (self.process.stdin, self.process.stdout):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()


@dataclass
class RuncPod:
    runtime: RuncRuntime
    namespace: str
    name: str
    uid: str
    qos: str
    driver: str
    sandbox: RuncContainer | None = None
    containers: dict[str, RuncContainer] = field(default_factory=dict)
    created_dirs: list[Path] = field(default_factory=list)  # cgroup dirs made by this pod (ours to remove)
    removed: bool = False

    @property
    def cgroup(self) -> str:
        return pod_cgroup(self.driver, self.qos, self.uid)

    @property
    def netns(self) -> str:
        assert self.sandbox is not None
        return f"/proc/{self.sandbox.pid}/ns/net"

    def run(self, name: str, args: Sequence[str], *, memory_limit: int | None = None, cpu_quota_us: int | None = None,
            mounts: Sequence[Mount] = (), env: Sequence[str] = ()) -> RuncContainer:  # fmt: skip
        """Create and start an app container in this pod (joins the sandbox's namespaces).
        `cpu_quota_us`: a CFS quota per 100 ms period, as the kubelet sets for a CPU limit."""
        assert self.sandbox is not None and name not in self.containers
        container = self.runtime._start(self, name, args, memory_limit=memory_limit, cpu_quota_us=cpu_quota_us,
                                        mounts=mounts, env=env)  # fmt: skip
        self.containers[name] = container
        return container

    def api_object(self) -> dict[str, Any]:
        """The pod as the API server returns it: containerStatuses carry the runc ids."""
        return make_pod(self.name, namespace=self.namespace, uid=self.uid, node=self.runtime.node_name,
                        containers=[(n, c.id) for n, c in self.containers.items()])  # fmt: skip

    def remove(self) -> None:
        """Delete every container (apps first, then the sandbox), then the pod cgroup."""
        if self.removed:
            return
        for container in reversed(list(self.containers.values())):
            container.delete()
        if self.sandbox is not None:
            self.sandbox.delete()
        self.runtime._remove_cgroups(self)
        self.removed = True


@dataclass
class RuncRuntime:
    """One test's runc: a private state directory (so `runc list` shows only ours), bundles
    under `workdir`, and every pod it made (removed by close())."""

    workdir: Path
    node_name: str = "node-a"
    state_dir: Path = field(init=False)
    pods: list[RuncPod] = field(default_factory=list)
    kubelet_dirs: list[Path] = field(default_factory=list)  # kubelet_cgroups() made these

    def __post_init__(self) -> None:
        self.state_dir = Path(f"/run/kpod-test-runc-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self.state_dir.mkdir(mode=0o700)
        (self.workdir / "bundles").mkdir(exist_ok=True)

    def runc(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return _run("runc", "--root", str(self.state_dir), *args, check=check, timeout=timeout)

    def kubelet_cgroups(self) -> None:
        """What the kubelet makes when it starts (cgroupfs driver), before any pod: /kubepods and
        its QoS levels in every hierarchy.  Ours to remove at close() when we made them."""
        with _tree_lock():
            for root in cgroup_mounts():
                for relative in ("kubepods", "kubepods/burstable", "kubepods/besteffort"):
                    path = root / relative
                    if path.exists():
                        continue
                    path.mkdir()
                    if (path / "cpuset.cpus").exists():  # v1 cpuset: empty until given the parent's
                        for name in ("cpuset.cpus", "cpuset.mems"):
                            (path / name).write_text((path.parent / name).read_text())
                    _mark(path)
                    self.kubelet_dirs.append(path)

    def pod(self, namespace: str, name: str, qos: str = "besteffort", driver: str = "cgroupfs") -> RuncPod:
        """A pod with its sandbox running (its own network namespace, loopback up)."""
        pod = RuncPod(self, namespace, name, str(uuid.uuid4()), qos, driver)
        self.pods.append(pod)
        pod.sandbox = self._start(pod, "POD", ["/usr/bin/sleep", "infinity"], sandbox=True)
        _run("nsenter", f"--net={pod.netns}", "ip", "link", "set", "lo", "up")
        return pod

    # -- containers -------------------------------------------------------------------------

    def _spec(self, pod: RuncPod, container_id: str, args: Sequence[str], sandbox: bool, memory_limit: int | None,
              cpu_quota_us: int | None, mounts: Sequence[Mount], env: Sequence[str]) -> dict[str, Any]:  # fmt: skip
        spec = runc_default_spec()
        process = spec["process"]
        process["terminal"] = False
        process["args"] = list(args)
        process["env"] = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                          "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", *env]  # fmt: skip
        spec["hostname"] = pod.name
        spec["mounts"] += [Mount("/usr", "/usr").spec(), Mount("/etc", "/etc").spec(),
                           *(m.spec() for m in mounts)]  # fmt: skip
        linux = spec["linux"]
        linux["cgroupsPath"] = container_cgroup(pod.driver, pod.qos, pod.uid, container_id)
        if memory_limit is not None:
            linux.setdefault("resources", {})["memory"] = {"limit": memory_limit}
        if cpu_quota_us is not None:
            linux.setdefault("resources", {})["cpu"] = {"quota": cpu_quota_us, "period": CFS_PERIOD_US}
        if not sandbox:
            assert pod.sandbox is not None
            shared = {"network": "net", "ipc": "ipc", "uts": "uts"}  # OCI type -> /proc/<pid>/ns/ name
            linux["namespaces"] = [
                {"type": ns["type"], "path": f"/proc/{pod.sandbox.pid}/ns/{shared[ns['type']]}"}
                if ns["type"] in shared else ns
                for ns in linux["namespaces"]
            ]  # fmt: skip
        return spec

    def _rootfs(self, bundle: Path, mounts: Sequence[Mount]) -> None:
        rootfs = bundle / "rootfs"
        for directory in ("usr", "etc", "proc", "dev", "sys", "tmp", "run", "var"):
            (rootfs / directory).mkdir(parents=True, exist_ok=True)
        for link in ("bin", "lib", "lib64", "sbin"):
            if os.path.islink(f"/{link}"):
                (rootfs / link).symlink_to(os.readlink(f"/{link}"))
        for mount in mounts:
            (rootfs / mount.destination.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def _start(self, pod: RuncPod, name: str, args: Sequence[str], *, sandbox: bool = False,
               memory_limit: int | None = None, cpu_quota_us: int | None = None, mounts: Sequence[Mount] = (),
               env: Sequence[str] = ()) -> RuncContainer:  # fmt: skip
        container_id = new_container_id()
        bundle = self.workdir / "bundles" / container_id[:16]
        bundle.mkdir()
        self._rootfs(bundle, mounts)
        spec = self._spec(pod, container_id, args, sandbox, memory_limit, cpu_quota_us, mounts, env)
        (bundle / "config.json").write_text(json.dumps(spec, indent=1))
        container = RuncContainer(self, pod, name, container_id, bundle, spec["linux"]["cgroupsPath"])
        with _tree_lock():
            before = {path for path in self._pod_cgroup_candidates(pod) if path.exists()}
            with open(bundle / "stderr.log", "wb") as stderr:
                container.process = subprocess.Popen(
                    ["runc", "--root", str(self.state_dir), "run", "--detach", "--bundle", str(bundle), container_id],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                )  # fmt: skip
            rc = container.process.wait(60)  # runc exits once the container runs; the pipes stay its stdio
            for path in self._pod_cgroup_candidates(pod):
                if path.exists() and path not in before:
                    _mark(path)
                    pod.created_dirs.append(path)
        if rc != 0:
            container.deleted = True  # nothing to delete but what runc may have left
            self.runc("delete", "--force", container_id, check=False)
            raise AssertionError(f"runc run {pod.name}/{name} failed ({rc}): {container.log()}")
        container.pid = int(container.state()["pid"])
        return container

    # -- cgroups ----------------------------------------------------------------------------

    @staticmethod
    def _pod_cgroup_candidates(pod: RuncPod) -> list[Path]:
        """The pod cgroup and its ancestors (kubepods, the QoS level) in every hierarchy."""
        parts = Path(pod.cgroup.lstrip("/")).parts
        return [root.joinpath(*parts[: i + 1]) for root in cgroup_mounts() for i in range(len(parts))]

    def _remove_cgroups(self, pod: RuncPod) -> None:
        """What the kubelet does after the last container of a pod is gone: rmdir the pod
        cgroup; shared parents only if we created them, they are marked and empty."""
        with _tree_lock():
            for path in sorted(set(pod.created_dirs), key=lambda p: len(p.parts), reverse=True):
                if not path.exists() or _child_dirs(path):
                    continue
                if path.name.startswith("pod") or "-pod" in path.name or _marked(path):
                    remove_cgroup_dir(path)
            pod.created_dirs = [p for p in pod.created_dirs if p.exists()]

    def close(self) -> None:
        """Remove every pod (containers, then cgroups) and the state directory, also after a
        failure half-way: anything still listed in our state directory is force-deleted."""
        for pod in reversed(self.pods):
            with contextlib.suppress(Exception):
                pod.remove()
        listed = self.runc("list", "--format", "json", check=False)
        for entry in json.loads(listed.stdout or "null") or []:
            self.runc("delete", "--force", entry["id"], check=False)
        with _tree_lock():  # the kubelet's cgroups, once no pod of anyone's is below them
            for path in sorted(self.kubelet_dirs, key=lambda p: len(p.parts), reverse=True):
                if path.exists() and _marked(path) and not _child_dirs(path):
                    remove_cgroup_dir(path)
        shutil.rmtree(self.state_dir, ignore_errors=True)


@contextlib.contextmanager
def runc_runtime(workdir: Path, node_name: str = "node-a") -> Iterator[RuncRuntime]:
    runtime = RuncRuntime(workdir, node_name)
    try:
        yield runtime
    finally:
        runtime.close()


# ----------------------------------------------------------------------------- networking


def _ns(netns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run("nsenter", f"--net={netns}", *args)


def _quiet_netns(netns: str) -> None:
    """No IPv6 in a pod netns: no router solicitations or MLD reports on its interfaces, so the
    interface counters hold exactly the traffic of the test."""
    for scope in ("all", "default"):
        _ns(netns, "sysctl", "-qw", f"net.ipv6.conf.{scope}.disable_ipv6=1")


def interface_name(tag: str) -> str:
    return f"kp{os.getpid() % 100000}{tag}{uuid.uuid4().hex[:3]}"[:15]


def link_pods(a_netns: str, b_netns: str, a_ip: str, b_ip: str, prefix: int = 30) -> None:
    """One veth pair between two pod network namespaces, `eth0` on both sides, with static
    neighbour entries (no ARP, so the counters move only with the test's traffic)."""
    a_if, b_if = interface_name("a"), interface_name("b")
    _quiet_netns(a_netns)
    _quiet_netns(b_netns)
    _run("ip", "link", "add", a_if, "type", "veth", "peer", "name", b_if)
    try:
        for ifname, netns in ((a_if, a_netns), (b_if, b_netns)):
            _run("ip", "link", "set", ifname, "netns", netns)
            _ns(netns, "ip", "link", "set", ifname, "name", "eth0")
    except AssertionError:
        _run("ip", "link", "del", a_if, check=False)
        raise
    for netns, ip in ((a_netns, a_ip), (b_netns, b_ip)):
        _ns(netns, "ip", "addr", "add", f"{ip}/{prefix}", "dev", "eth0")
        _ns(netns, "ip", "link", "set", "eth0", "up")
    macs = {ns: json.loads(_ns(ns, "ip", "-j", "link", "show", "eth0").stdout)[0]["address"]
            for ns in (a_netns, b_netns)}  # fmt: skip
    _ns(a_netns, "ip", "neigh", "replace", b_ip, "lladdr", macs[b_netns], "dev", "eth0", "nud", "permanent")
    _ns(b_netns, "ip", "neigh", "replace", a_ip, "lladdr", macs[a_netns], "dev", "eth0", "nud", "permanent")


@dataclass
class HostLink:
    """A network namespace reached from the host by a veth pair (what a CNI gives a pod)."""

    name: str  # `ip netns` name
    host_if: str
    host_ip: str
    pod_ip: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


def free_subnet() -> tuple[str, str]:
    """A /30 (host address, pod address) in 10.213.0.0/16 not in use on this machine."""
    used = _run("ip", "-o", "-4", "addr", "show").stdout
    for _ in range(200):
        base = int.from_bytes(os.urandom(2), "big") & 0xFFFC
        host, pod = f"10.213.{base >> 8}.{(base & 0xFF) + 1}", f"10.213.{base >> 8}.{(base & 0xFF) + 2}"
        if f" {host}/" not in used and f" {pod}/" not in used:
            return host, pod
    raise AssertionError("no free /30 in 10.213.0.0/16")


@contextlib.contextmanager
def host_linked_netns() -> Iterator[HostLink]:
    """A named network namespace with a veth pair to the host; deleted afterwards."""
    name = f"kpod-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    host_if, peer = interface_name("h"), interface_name("p")
    host_ip, pod_ip = free_subnet()
    _run("ip", "netns", "add", name)
    link = HostLink(name, host_if, host_ip, pod_ip)
    try:
        _quiet_netns(link.path)
        _run("ip", "link", "add", host_if, "type", "veth", "peer", "name", peer)
        _run("ip", "link", "set", peer, "netns", name)
        _run("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        _run("ip", "link", "set", host_if, "up")
        _run("ip", "-n", name, "link", "set", peer, "name", "eth0")
        _run("ip", "-n", name, "addr", "add", f"{pod_ip}/30", "dev", "eth0")
        _run("ip", "-n", name, "link", "set", "eth0", "up")
        _run("ip", "-n", name, "link", "set", "lo", "up")
        _run("ip", "-n", name, "route", "add", "default", "via", host_ip)
        yield link
    finally:
        _run("ip", "link", "del", host_if, check=False)
        _run("ip", "netns", "del", name, check=False)


def net_dev(pid: int) -> dict[str, tuple[int, int]]:
    """(rx_bytes, tx_bytes) per interface of process `pid`'s network namespace."""
    out: dict[str, tuple[int, int]] = {}
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]:
        name, _, rest = line.partition(":")
        fields = rest.split()
        out[name.strip()] = (int(fields[0]), int(fields[8]))
    return out


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
