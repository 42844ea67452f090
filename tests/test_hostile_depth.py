"""A pod nests cgroups past PATH_MAX, and hides a subtree the agent may not list.

Issue 19: a chain of 25 cgroups with 200-character names (a path of about 5000 bytes, past the
4096 of PATH_MAX), with a process at the bottom, produced no series and no error: every open()
and stat() of it failed with ENAMETOOLONG and the walk skipped it in silence.  Here a real agent
process (cgroup files and an eBPF receiver) reads such a chain through openat from a parent
directory, and a cgroup it cannot list (mode 000, the agent without CAP_DAC_READ_SEARCH) is
counted by reason instead of vanishing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest
from agent_proc import AgentProcess, Sample, free_port
from hostile import Scratch, agent_config, scratch, skip_reason
from kernel_util import kernel_skip_reason, mounts

from kpod.cgroup.parsers import parse_cpu_stat

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
    pytest.mark.skipif(kernel_skip_reason() is not None, reason=str(kernel_skip_reason())),
    pytest.mark.skipif(shutil.which("setpriv") is None, reason="setpriv not installed"),
]
__all__ = ["scratch"]

LEVELS, NAME_LENGTH = 25, 200
# The agent without CAP_DAC_READ_SEARCH (and, as always, without CAP_DAC_OVERRIDE): a cgroup of
# mode 000 is then one it cannot list.
NO_DAC = ("setpriv", "--bounding-set", "-all,+bpf,+perfmon,+sys_ptrace", "--")
BUSY = "import time\nwhile True:\n    sum(range(20000))\n    time.sleep(0.001)\n"


class Chain:
    """`LEVELS` nested cgroups of NAME_LENGTH-character names, made and removed through dir fds."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self.names = [f"{i:02d}-{uuid.uuid4().hex}".ljust(NAME_LENGTH, "x") for i in range(LEVELS)]
        self.made = 0

    @property
    def paths(self) -> list[str]:
        return [str(self.top) + "".join("/" + n for n in self.names[: i + 1]) for i in range(LEVELS)]

    def _descend(self, levels: int) -> list[int]:
        fds = [os.open(self.top, os.O_PATH | os.O_DIRECTORY)]
        for name in self.names[:levels]:
            fds.append(os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fds[-1]))
        return fds

    def make(self) -> None:
        fd = os.open(self.top, os.O_PATH | os.O_DIRECTORY)
        try:
            for name in self.names:
                os.mkdir(name, dir_fd=fd)
                self.made += 1
                child = os.open(name, os.O_PATH | os.O_DIRECTORY, dir_fd=fd)
                os.close(fd)
                fd = child
        finally:
            os.close(fd)

    def leaf_file(self, name: str, mode: int = os.O_RDONLY) -> int:
        fds = self._descend(LEVELS)
        try:
            return os.open(name, mode, dir_fd=fds[-1])
        finally:
            for fd in fds:
                os.close(fd)

    def move(self, pid: int) -> None:
        fd = self.leaf_file("cgroup.procs", os.O_WRONLY)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)

    def usage_usec(self) -> int:
        fd = self.leaf_file("cpu.stat")
        try:
            return parse_cpu_stat(os.read(fd, 65536).decode())["usage_usec"]
        finally:
            os.close(fd)

    def remove(self) -> None:
        """Deepest first; what is still in the leaf goes to the cgroup2 root first."""
        if not self.made:
            return
        root = mounts().unified
        with contextlib.suppress(OSError):
            fd = self.leaf_file("cgroup.procs") if self.made == LEVELS else -1
            if fd >= 0:
                pids = os.read(fd, 65536).split()
                os.close(fd)
                for pid in pids:
                    with contextlib.suppress(OSError):
                        Path(root, "cgroup.procs").write_bytes(pid)
        fds = self._descend(self.made - 1)
        try:
            for level in range(self.made - 1, -1, -1):
                for _ in range(50):
                    try:
                        os.rmdir(self.names[level], dir_fd=fds[level])
                        break
                    except OSError:
                        time.sleep(0.05)  # a task still leaving
        finally:
            for fd in fds:
                os.close(fd)
        self.made = 0


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [x.value for x in samples if x.name == name and labels.items() <= x.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def test_cgroups_past_path_max_are_read_and_unlistable_ones_counted(scratch: Scratch, tmp_path: Path) -> None:
    s = scratch
    unified = mounts().unified
    assert unified is not None
    base = s.mkdir(Path(unified, s.tag))
    chain = Chain(s.mkdir(base / "chain"))
    s.defer("deep cgroup chain", chain.remove)
    chain.make()
    assert len(chain.paths[-1]) > 4096
    locked = s.mkdir(base / "locked")
    s.mkdir(locked / "inside")
    locked.chmod(0)
    s.defer("chmod", lambda: locked.chmod(0o755))
    worker = s.spawn([sys.executable, "-c", "import sys; sys.stdin.readline()\n" + BUSY])
    chain.move(worker.pid)
    assert worker.stdin is not None
    worker.stdin.write("go\n")
    worker.stdin.flush()

    port = free_port()
    config = agent_config(base, port, {"cgroup_cpu": "", "cpu_sched": ""})
    agent = AgentProcess(config, tmp_path, port, prefix=NO_DAC).start()
    s.defer(f"agent {agent.pid}", agent.stop)
    agent.wait_ready()
    leaf = chain.names[-1]
    agent.wait_until(lambda: any(x.labels.get("container") == leaf and x.name == "kpod_cpu_context_switches_total"
                                 for x in agent.metrics()), 30, "reporting the deepest cgroup")  # fmt: skip
    # Frozen, the cgroup's CPU time (nearly) stands still: the agent's figure lies between the
    # file's values read around it.
    os.kill(worker.pid, signal.SIGSTOP)
    time.sleep(0.5)
    before = chain.usage_usec()
    time.sleep(1.0)  # cycles after the freeze
    samples = agent.metrics()
    after = chain.usage_usec()
    assert before / 1e6 <= value(samples, "kpod_cpu_usage_seconds_total", container=leaf) <= after / 1e6
    assert value(samples, "kpod_cpu_context_switches_total", container=leaf) > 0  # the eBPF side: its id resolves
    # Counted and shown, by reason: the chain's levels past PATH_MAX, the cgroup it cannot list.
    long_paths = sum(1 for path in chain.paths if len(path) >= 4095)
    assert value(samples, "kpod_cgroup_long_paths") == long_paths
    assert value(samples, "kpod_cgroups_unreadable", reason="EACCES") == 1
    walk = agent.status()["cgroup_walk"]
    assert walk["unreadable"] == {"EACCES": 1} and walk["long_paths"] == long_paths
    assert walk["unreadable_examples"] == ["/locked"]
    assert "cannot list" in agent.log() and "Traceback" not in agent.log()
    assert agent.stop() == 0
