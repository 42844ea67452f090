"""The agent raises its soft RLIMIT_NOFILE at start, as a container runtime leaves it (soft 1024,
a higher hard limit): the real agent started with given limits (tests/rlimit_exec.py), its
limits read from /proc/<pid>/limits, its kept-descriptor limits from /debug/status."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from agent_proc import AgentProcess, running_agent
from helpers import free_port

from kpod.cgroup.keptfds import MAX_KEPT, NOFILE_WANTED

TESTS = Path(__file__).resolve().parent
RAISED = "RLIMIT_NOFILE raised"
REFUSED = "cannot raise the soft RLIMIT_NOFILE"


def config_text(port: int, receivers: tuple[str, ...] = ("cgroup_cpu",)) -> str:
    return json.dumps({  # JSON is YAML
        "kpod": {"profile": "custom", "poll_interval": "500ms", "discovery": {"mode": "local"}},
        "receivers": {name: {} for name in receivers},
        "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{port}"}},
        "service": {"pipelines": {"metrics": {"receivers": list(receivers), "exporters": ["prometheus"]}}},
    })  # fmt: skip


def launcher(soft: int, hard: int, refuse: bool = False) -> tuple[str, ...]:
    return (sys.executable, str(TESTS / "rlimit_exec.py"), str(soft), str(hard),
            *(["--refuse-setrlimit"] if refuse else []), "--")  # fmt: skip


def nofile_limits(pid: int) -> tuple[int, int]:
    """(soft, hard) "Max open files" of a process, as the kernel reports it."""
    with open(f"/proc/{pid}/limits") as handle:
        for line in handle:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError(f"no 'Max open files' in /proc/{pid}/limits")


def limits_and_status(agent: AgentProcess) -> tuple[tuple[int, int], dict[str, Any]]:
    """The agent's (soft, hard) RLIMIT_NOFILE and its /debug/status, once it is ready."""
    agent.wait_ready(60)  # generous: CI machines may be busy
    return nofile_limits(agent.pid), agent.status()


def open_files(status: dict[str, Any]) -> dict[str, Any]:
    assert "open_files" in status, sorted(status)
    return status["open_files"]


def our_hard_limit(at_least: int) -> int:
    """The hard limit this process may give the agent (raising it needs CAP_SYS_RESOURCE)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # never RLIM_INFINITY: at most fs.nr_open
    if hard < at_least:
        pytest.skip(f"the hard RLIMIT_NOFILE here is {hard}, below {at_least}: nothing to raise to")
    return hard


def test_soft_1024_is_raised_to_the_hard_limit_at_most_the_cap(tmp_path: Path) -> None:
    hard = our_hard_limit(2048)
    wanted = min(hard, NOFILE_WANTED)
    port = free_port()
    with running_agent(config_text(port), tmp_path, port, prefix=launcher(1024, hard)) as agent:
        limits, status = limits_and_status(agent)
        log = agent.log()
    assert limits == (wanted, hard), log[-2000:]
    files = open_files(status)
    assert (files["soft_limit"], files["hard_limit"], files["raised_from"]) == (wanted, hard, 1024), files
    assert files["raise_refused"] == ""
    lines = [line for line in log.splitlines() if RAISED in line]
    assert len(lines) == 1 and f"1024 -> {wanted} (hard {hard})" in lines[0], log[-2000:]
    assert REFUSED not in log


def test_the_cap_applies_below_a_higher_hard_limit(tmp_path: Path) -> None:
    """raise_nofile_limit stops at what it wants when the hard limit allows more (the agent's
    own cap, NOFILE_WANTED, is above the hard limit of many machines: a smaller one here)."""
    hard = our_hard_limit(4096)
    probe = ("import resource; from kpod.cgroup.keptfds import raise_nofile_limit; "
             "print(raise_nofile_limit(3000), resource.getrlimit(resource.RLIMIT_NOFILE))")  # fmt: skip
    result = subprocess.run([*launcher(1024, hard), sys.executable, "-c", probe], capture_output=True, text=True,
                            timeout=60, cwd=TESTS.parent)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[0] == f"(1024, 3000) (3000, {hard})", result.stdout
    assert NOFILE_WANTED == 4 * MAX_KEPT  # every kind of kept descriptor reaches its cap at it


def test_soft_equal_to_hard_stays_and_says_nothing(tmp_path: Path) -> None:
    port = free_port()
    with running_agent(config_text(port), tmp_path, port, prefix=launcher(1024, 1024)) as agent:
        limits, status = limits_and_status(agent)
        log = agent.log()
    assert limits == (1024, 1024)
    files = open_files(status)
    assert (files["soft_limit"], files["raised_from"], files["raise_refused"]) == (1024, None, ""), files
    assert files["kept_cgroup_directories"]["limit"] == 256
    assert RAISED not in log and REFUSED not in log and "Traceback" not in log, log[-2000:]


def test_the_kept_limits_are_shares_of_the_raised_limit(tmp_path: Path) -> None:
    our_hard_limit(4096)
    port = free_port()
    prefix = launcher(1024, 4096)
    with running_agent(config_text(port, ("cgroup_cpu", "filesystem")), tmp_path, port, prefix=prefix) as agent:
        limits, status = limits_and_status(agent)
    assert limits == (4096, 4096)
    files = open_files(status)
    assert files["kept_cgroup_directories"]["limit"] == 1024, files
    assert files["kept_cgroup_files"]["limit"] == 1024, files
    assert status["receivers"]["filesystem"]["details"]["mount_tables_limit"] == 1024, status["receivers"]
    # Something is kept after the first cycle (the limits are the ones in use).
    assert files["kept_cgroup_directories"]["kept"] + files["kept_cgroup_files"]["kept"] > 0, files


def test_a_refused_setrlimit_is_one_warning_and_the_agent_runs_on(tmp_path: Path) -> None:
    our_hard_limit(4096)
    port = free_port()
    with running_agent(config_text(port), tmp_path, port, prefix=launcher(1024, 4096, refuse=True)) as agent:
        limits, status = limits_and_status(agent)
        agent.wait_until(lambda: b"kpod_collection_cycles_total" in agent.get("/metrics"), 60, "exporting")
        log = agent.log()
    assert limits == (1024, 4096)
    files = open_files(status)
    assert (files["soft_limit"], files["raised_from"]) == (1024, None), files
    assert "seccomp" in files["raise_refused"], files
    assert files["kept_cgroup_directories"]["limit"] == 256, files
    warnings = [line for line in log.splitlines() if REFUSED in line]
    assert len(warnings) == 1 and "from 1024 toward 4096 (hard 4096)" in warnings[0], log[-2000:]
    assert "WARNING" in warnings[0] and "Traceback" not in log and RAISED not in log, log[-2000:]
