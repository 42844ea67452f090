"""The agent as its own process, for fault, soak and privilege tests.

`AgentProcess` runs `python -m kpod.cli run --config ...` with its log in a file (a pipe would
fill up and block a long run), scrapes its endpoints, and is always stopped again by PID (a
test that fails still kills it).  `bpf_ids_of(pid)` reads which BPF programs, maps and links a
process holds from /proc/<pid>/fdinfo, so the objects of *this* agent are known exactly even
when other processes on the machine load BPF programs at the same time.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import bpftool_ids, free_port
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[1]


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPOD_") and k != "KUBERNETES_SERVICE_HOST"}
    env.update(extra or {})
    return env


FULL_PROFILE = "comprehensive"


def full_profile() -> str:
    """The profile with every receiver, checked to load here first: a receiver that is missing
    or broken fails the caller with the config error instead of shrinking what it tests."""
    from kpod.config import ConfigError, load_config

    try:
        load_config(None, environ={"KPOD_PROFILE": FULL_PROFILE, "KPOD_DISCOVERY_MODE": "local"})
    except ConfigError as exc:
        raise AssertionError(f"the {FULL_PROFILE} profile does not load here: {exc}") from exc
    return FULL_PROFILE


@dataclass
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_exposition(text: str) -> list[Sample]:
    return [
        Sample(s.name, dict(s.labels), float(s.value))
        for family in text_string_to_metric_families(text)
        for s in family.samples
    ]


CYCLES_TOTAL = "kpod_collection_cycles_total"
LAST_CYCLE_END = "kpod_collection_last_cycle_timestamp_seconds"


@dataclass(frozen=True)
class CycleMark:
    """Where the agent's cycles stood at a scrape of /metrics.  Exact: the exposition is made at
    the end of each cycle, whereas /debug/status is made at most once a second
    (exporters/prometheus/server.py STATUS_CACHE_S), so what it says of cycles is up to a second old."""

    cycles: int
    ended_unix: float  # when the last cycle completed (the agent's time.time()); 0 before the first


def cycle_mark(exposition: str) -> CycleMark:
    """The cycle counter and the last cycle's end in a text exposition (0 before the first cycle)."""
    cycles, ended = 0, 0.0
    for line in exposition.splitlines():
        name, _, rest = line.partition(" ")
        if name == CYCLES_TOTAL:
            cycles = int(float(rest.split()[0]))
        elif name == LAST_CYCLE_END:
            ended = float(rest.split()[0])
    return CycleMark(cycles, ended)


def wait_cycles(scrape: Callable[[], str], count: int = 1, timeout_s: float = 30.0,
                explain: Callable[[], str] = lambda: "") -> CycleMark:  # fmt: skip
    """Until `count` more cycles have completed than at the first scrape; returns the mark that
    shows it.  The first of them may have begun before the call (the mark counts cycles that
    ended; one may be running): with `count` >= 2 the last one began after it.  `scrape` returns
    /metrics; asked every 20 ms, so the return follows that cycle's end by about one scrape."""
    target = cycle_mark(scrape()).cycles + count
    deadline = time.monotonic() + timeout_s
    while True:
        mark = cycle_mark(scrape())
        if mark.cycles >= target:
            return mark
        assert time.monotonic() < deadline, f"not {count} more cycles in {timeout_s} s (at {mark}): {explain()}"
        time.sleep(0.02)


@dataclass
class AgentProcess:
    config_text: str
    workdir: Path
    port: int
    env: dict[str, str] = field(default_factory=clean_env)
    prefix: Sequence[str] = ()  # e.g. ("capsh", "--drop=...", "--") or ("setpriv", ...)
    args: Sequence[str] = ()  # more `run` arguments, e.g. ("--log-format", "json")
    process: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"agent-{self.port}-{time.monotonic_ns()}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> AgentProcess:
        config = self.workdir / f"config-{self.port}.yaml"
        config.write_text(self.config_text)
        command = [*self.prefix, sys.executable, "-m", "kpod.cli", "run", "--config", str(config), *self.args]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def get(self, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0) -> bytes:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        self.wait_until(lambda: self._ready(), timeout_s, "ready")

    def _ready(self) -> bool:
        try:
            self.get("/readyz", timeout=2)
            return True
        except Exception:
            return False

    def wait_until(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise AssertionError(f"agent exited ({self.process and self.process.returncode}) before {what}:\n"
                                     + self.log()[-3000:])  # fmt: skip
            if predicate():
                return
            time.sleep(0.1)
        raise AssertionError(f"agent not {what} after {timeout_s}s; log:\n{self.log()[-3000:]}")

    def metrics(self) -> list[Sample]:
        return parse_exposition(self.get("/metrics").decode())

    def status(self) -> dict[str, Any]:
        return json.loads(self.get("/debug/status"))

    def cycle_mark(self) -> CycleMark:
        return cycle_mark(self._scrape_alive())

    def wait_cycles(self, count: int = 1, timeout_s: float = 30.0) -> CycleMark:
        """Until `count` more cycles have completed (module `wait_cycles`); fails at once if the agent exits."""
        return wait_cycles(self._scrape_alive, count, timeout_s, lambda: "log:\n" + self.log()[-3000:])

    def _scrape_alive(self) -> str:
        if not self.alive():
            raise AssertionError(f"agent exited ({self.process and self.process.returncode}):\n{self.log()[-3000:]}")
        return self.get("/metrics").decode()

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> int:
        """Signal the agent and wait; SIGKILL if it does not exit.  Returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


def agent_exposition(workdir: Path) -> str:
    """/metrics of a real agent after its first cycles (cgroup receivers only: runs anywhere)."""
    port = free_port()
    config = {
        "kpod": {"profile": "custom", "poll_interval": "200ms", "discovery": {"mode": "local"}},
        "receivers": {"cgroup_cpu": {}, "pressure": {}},
        "exporters": {"prometheus": {"endpoint": f"127.0.0.1:{port}"}},
        "service": {"pipelines": {"metrics": {"receivers": ["cgroup_cpu", "pressure"], "exporters": ["prometheus"]}}},
    }
    body = ""

    def cycled() -> bool:
        nonlocal body
        try:
            body = agent.get("/metrics", timeout=2).decode()
        except OSError:
            return False
        return "\nkpod_series " in "\n" + body and "kpod_collection_duration_seconds" in body

    with running_agent(json.dumps(config), workdir, port) as agent:  # JSON is YAML
        agent.wait_until(cycled, 60, "exposing a first cycle")  # generous: CI machines may be busy
    return body


@contextlib.contextmanager
def running_agent(config_text: str, workdir: Path, port: int, **kwargs: Any) -> Iterator[AgentProcess]:
    agent = AgentProcess(config_text, workdir, port, **kwargs).start()
    try:
        yield agent
    finally:
        agent.stop()  # SIGTERM, then SIGKILL if it does not exit; a no-op if it already did


# ------------------------------------------------------------------------------ BPF objects


@dataclass(frozen=True)
class BpfIds:
    progs: frozenset[int]
    maps: frozenset[int]
    links: frozenset[int]

    def __bool__(self) -> bool:
        return bool(self.progs or self.maps or self.links)


def bpf_ids_of(pid: int) -> BpfIds:
    """The ids of the BPF programs, maps and links whose fds process `pid` holds."""
    progs: set[int] = set()
    maps: set[int] = set()
    links: set[int] = set()
    fd_dir = f"/proc/{pid}/fdinfo"
    for fd in os.listdir(fd_dir):
        try:
            with open(f"{fd_dir}/{fd}") as handle:
                info = handle.read()
        except OSError:
            continue  # closed meanwhile
        for line in info.splitlines():
            key, _, value = line.partition(":")
            if key == "prog_id":
                progs.add(int(value))
            elif key == "map_id":
                maps.add(int(value))
            elif key == "link_id":
                links.add(int(value))
    return BpfIds(frozenset(progs), frozenset(maps), frozenset(links))


def all_bpf_ids() -> BpfIds:
    """Every BPF program, map and link id that exists on the machine now."""
    return BpfIds(bpftool_ids("prog"), bpftool_ids("map"), bpftool_ids("link"))


def still_present(ours: BpfIds, timeout_s: float = 5.0) -> BpfIds:
    """Which of `ours` bpftool still lists, once the kernel had `timeout_s` to free them
    (objects are released asynchronously after the last fd closes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = all_bpf_ids()
        left = BpfIds(ours.progs & now.progs, ours.maps & now.maps, ours.links & now.links)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def pinned_files(root: str = "/sys/fs/bpf") -> set[str]:
    found: set[str] = set()
    for directory, _, files in os.walk(root):
        found.update(os.path.join(directory, f) for f in files)
    return found


# ------------------------------------------------------------------------------ process resources


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
