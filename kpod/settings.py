"""The `kpod:` section of the config file, as typed dataclasses.

Field defaults here are the agent's defaults; `config.example.yaml` documents the same values
and a test keeps the two equal.  The config loader (kpod.config) validates YAML against these
classes: unknown keys, wrong types and out-of-range values are errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kpod.units import Duration


@dataclass
class KubeletSettings:
    url: str = "https://${env:NODE_IP}:10250/pods"
    poll_interval: Duration = field(default_factory=lambda: Duration.parse("30s"))
    # Verification of the kubelet's certificate is on unless this is set.
    insecure_skip_verify: bool = False
    token_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_file: str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"


@dataclass
class DiscoverySettings:
    # informer | kubelet | local; empty = informer inside a pod, local elsewhere.
    mode: str = ""
    kubelet: KubeletSettings = field(default_factory=KubeletSettings)
    # /readyz answers 503 once discovery (informer or kubelet) has failed for longer than this;
    # the last known pods keep being served meanwhile.  0s = discovery never affects readiness.
    failure_window: Duration = field(default_factory=lambda: Duration.parse("5m"))

    CHOICES = ("informer", "kubelet", "local")


@dataclass
class CgroupSettings:
    root: str = "/sys/fs/cgroup"
    proc_root: str = "/proc"
    # How long a removed cgroup (and a deleted pod's labels) stay known: its final counts are
    # exported under its labels that long, then the series goes and its kernel entries are
    # deleted.  At least two intervals of the slowest receiver are used whatever this says.
    gone_retention: Duration = field(default_factory=lambda: Duration.parse("2m"))


@dataclass
class FilterSettings:
    namespaces: list[str] = field(default_factory=list)
    exclude_namespaces: list[str] = field(default_factory=lambda: ["kube-system", "kube-public"])
    label_selector: str = ""
    # Pod labels copied onto every series as label_<name>; off by default (cardinality).
    include_labels: list[str] = field(default_factory=list)


@dataclass
class BpfSettings:
    enabled: bool = True
    program_dir: str = ""  # empty = the objects shipped with the package
    map_max_entries: int = 10240
    # Diagnostic: take an older kernel's route on this one, to test it or to work around a
    # newer route's problem: kprobe (fentry/fexit skipped), tid_hash (per-task stamps in a
    # hash instead of task storage), sock_cgroup_val (the socket's cgroup read as before 5.15).
    force_routes: list[str] = field(default_factory=list)

    FORCE_ROUTES = ("kprobe", "tid_hash", "sock_cgroup_val")


@dataclass
class SyscallSettings:
    # Empty: the architecture's default set (kpod.kernel.syscalls.DEFAULT_TRACKED), which the
    # settings cannot name once for every node: arm64 has epoll_pwait where x86_64 has epoll_wait.
    tracked_syscalls: list[str] = field(default_factory=list)


@dataclass
class KpodSettings:
    profile: str = "standard"  # minimal | standard | comprehensive | custom
    poll_interval: Duration = field(default_factory=lambda: Duration.parse("30s"))
    # A cycle that has not finished after this long is abandoned (receivers still running
    # are reported as timed out).  0 = the poll interval.
    cycle_timeout: Duration = field(default_factory=lambda: Duration.parse("0s"))
    node_name: str = ""  # empty = the host name
    discovery: DiscoverySettings = field(default_factory=DiscoverySettings)
    cgroup: CgroupSettings = field(default_factory=CgroupSettings)
    filter: FilterSettings = field(default_factory=FilterSettings)
    bpf: BpfSettings = field(default_factory=BpfSettings)
    syscall: SyscallSettings = field(default_factory=SyscallSettings)

    PROFILES = ("minimal", "standard", "comprehensive", "custom")
