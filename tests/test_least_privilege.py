"""Least privilege: the agent as root with every capability dropped but the documented set
(docs/CAPABILITIES.md, the Helm chart's `capabilities`) collects what it collects with all of
them; without one of the eBPF capabilities, the eBPF receivers say so in one line and the
cgroup receivers keep running.

The agent runs under `setpriv --bounding-set=-all,+...` as uid 0: after execve, root's
permitted and effective sets are the bounding set, which is what a container with
`capabilities: {drop: [ALL], add: [...]}` gets.  Nothing here goes through a shell.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from agent_proc import full_profile, running_agent
from helpers import free_port, require_tools
from kernel_util import Workload, cgroup2_root, cgroup_tree, kernel_test, workloads

pytestmark = kernel_test


@pytest.fixture(autouse=True)
def _setpriv() -> None:
    require_tools("setpriv")

# The chart's set (deploy/helm/kpod-metrics/values.yaml: capabilities), measured in docs/CAPABILITIES.md.
DOCUMENTED = ("bpf", "perfmon", "sys_ptrace", "dac_read_search")
# The receivers that load BPF programs (bpf_maps only reports theirs: with none loaded it
# runs and reports nothing).
EBPF_RECEIVERS = {"cpu_sched", "memory", "net_tcp", "syscall"}
BUSY = "while True:\n    time.sleep(0.002)\n"


def with_caps(caps: tuple[str, ...]) -> tuple[str, ...]:
    return ("setpriv", "--bounding-set", ",".join(["-all", *(f"+{c}" for c in caps)]), "--")


def observe(tmp_path: Path, prefix: tuple[str, ...], container: str) -> tuple[dict, set[str], set[str], str]:
    """Run the agent (local mode, largest profile) a few cycles: receiver states, the agent's
    own metric families, the families of our workload's cgroup, and its log."""
    port = free_port()
    config = (
        # A long cycle timeout: a collection slowed by a busy machine is late, not "failing"
        # (the states compared here are about capabilities, not about the machine's load).
        f"kpod: {{profile: {full_profile()}, poll_interval: 300ms, cycle_timeout: 30s, discovery: {{mode: local}},"
        f" cgroup: {{root: {cgroup2_root()}}}}}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'}}\n"
    )
    with running_agent(config, tmp_path, port, prefix=prefix) as agent:
        agent.wait_ready()
        agent.wait_cycles(5)  # several cycles, with the workload switching all along (a sleep: fewer under load)
        states = {rid: (r["state"], r["reason"]) for rid, r in agent.status()["receivers"].items()}
        samples = agent.metrics()
        cap_eff = Path(f"/proc/{agent.pid}/status").read_text()
        assert agent.stop() == 0
    # The agent's own families (no cgroup: collection, BPF programs and maps): deterministic,
    # unlike the per-cgroup families of the whole node, which follow what happens to run
    # (pod-level series have a pod and no container: another test's runc pod has interfaces).
    families = {s.name for s in samples if "container" not in s.labels and "pod" not in s.labels}
    ours = {s.name for s in samples if s.labels.get("container") == container}
    effective = next(line for line in cap_eff.splitlines() if line.startswith("CapEff:"))
    return states, families, ours, effective + "\n" + agent.log()


@pytest.fixture(scope="module")
def busy_cgroup() -> str:
    with cgroup_tree() as tree, workloads() as procs:
        name = f"kpodcaps-{uuid.uuid4().hex[:8]}"
        cgroup = tree.mkdir(name)
        worker = Workload(BUSY)
        procs.append(worker)
        tree.move(worker.pid, cgroup)
        worker.go()
        yield name


@pytest.fixture(scope="module")
def documented_run(tmp_path_factory: pytest.TempPathFactory, busy_cgroup: str) -> tuple[dict, set[str], set[str], str]:
    """One run with exactly the documented capabilities, shared by the tests that compare with it."""
    return observe(tmp_path_factory.mktemp("documented"), with_caps(DOCUMENTED), busy_cgroup)


def test_documented_capabilities_collect_everything(
    tmp_path: Path, busy_cgroup: str, documented_run: tuple[dict, set[str], set[str], str]
) -> None:
    full_states, full_families, full_ours, _ = observe(tmp_path, (), busy_cgroup)
    states, families, ours, log = documented_run
    assert log.startswith("CapEff:\t000000c000080004"), log[:200]  # exactly the four capabilities
    assert states == full_states, (states, full_states)
    running = {rid for rid, (state, _) in states.items() if state == "running"}
    assert EBPF_RECEIVERS & set(states) <= running, states
    assert "cgroup_cpu" in running
    # What our workload's cgroup gets is the same, and so are the agent's own series (BPF
    # programs and maps, collection self-metrics).
    assert ours == full_ours and ours, (ours, full_ours)
    assert "kpod_cpu_context_switches_total" in ours and "kpod_cpu_usage_seconds_total" in ours
    assert families == full_families, (full_families ^ families)
    assert "kpod_bpf_map_entries" in families


@pytest.mark.parametrize("dropped", ["bpf", "perfmon"])
def test_without_an_ebpf_capability_ebpf_receivers_say_so_and_the_rest_runs(
    tmp_path: Path, busy_cgroup: str, dropped: str
) -> None:
    caps = tuple(c for c in DOCUMENTED if c != dropped)
    states, _, ours, log = observe(tmp_path, with_caps(caps), busy_cgroup)
    for rid, (state, reason) in states.items():
        if rid in EBPF_RECEIVERS:
            assert state == "unavailable", (rid, state, reason)
            assert "CAP_BPF+CAP_PERFMON" in reason and "\n" not in reason, reason
            # One warning line per receiver in the log, not a traceback.
            assert sum(f"receiver {rid}: " in line for line in log.splitlines()) == 1, log
        elif rid == "cgroup_cpu":
            assert state == "running", (rid, state, reason)
    assert "Traceback" not in log
    assert "kpod_cpu_usage_seconds_total" in ours  # the cgroup receivers still collect
    assert "kpod_cpu_context_switches_total" not in ours


def test_check_names_the_missing_capability(tmp_path: Path) -> None:
    """`kpod-metrics check` under the reduced set lists the capabilities it has."""
    import subprocess
    import sys

    result = subprocess.run(
        [*with_caps(("perfmon",)), sys.executable, "-m", "kpod.cli", "check"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    out = result.stdout
    assert "capabilities: CAP_PERFMON" in out, out
    assert "cpu_sched" in out and "cannot run: needs root or CAP_BPF+CAP_PERFMON" in out, out




@pytest.mark.parametrize(
    ("dropped", "receivers"),
    [("sys_ptrace", ("net_iface", "filesystem")), ("dac_read_search", ("filesystem",))],
)
def test_without_a_proc_capability_the_loss_is_one_warning_line(
    tmp_path: Path,
    busy_cgroup: str,
    documented_run: tuple[dict, set[str], set[str], str],
    dropped: str,
    receivers: tuple[str, ...],
) -> None:
    """net_iface and filesystem still run without CAP_SYS_PTRACE / CAP_DAC_READ_SEARCH, but
    lose other pods' data; each says what it loses, once, instead of failing silently."""
    caps = tuple(c for c in DOCUMENTED if c != dropped)
    states, _, _, log = observe(tmp_path, with_caps(caps), busy_cgroup)
    name = f"CAP_{dropped.upper()}"
    lines = [line for line in log.splitlines() if f"without {name}: " in line]
    for rid in receivers:
        if rid in states:
            assert states[rid][0] == "running", states[rid]
            assert sum(f"kpod.{rid}" in line or f" {rid}" in line for line in lines) == 1, lines
    assert lines and all("\n" not in line for line in lines)
    # With the full documented set, no such warning.
    assert "without CAP_" not in documented_run[3]
