"""What the hostile-pod and hostile-client tests share: a cleanup stack, pod-shaped cgroups, a
network namespace, an agent config, an agent in a memory-limited cgroup.

Everything is undone in reverse order, also when a test fails: processes we started are killed
by PID, namespaces, links, mounts and cgroups we made are removed (cgroups deepest first, after
moving any process still in them to the cgroup2 root).  Nothing we did not create is touched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_proc import AgentProcess, free_port
from kernel_util import enable_controllers, mounts

REPO = Path(__file__).resolve().parents[1]


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (creates cgroups, namespaces, mounts)"
    if mounts().unified is None:
        return "no cgroup2 mount"
    return None


def run(*argv: str, check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check and done.returncode != 0:
        raise AssertionError(f"{argv}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


class Scratch:
    """What a test made, undone in reverse by `close()` (a pytest fixture calls it)."""

    def __init__(self) -> None:
        self.tag = f"kpodh{os.getpid()}{uuid.uuid4().hex[:6]}"
        self._undo: list[tuple[str, Callable[[], object]]] = []

    def defer(self, what: str, action: Callable[[], object]) -> None:
        self._undo.append((what, action))

    def spawn(self, argv: list[str], cgroup: str | Path | None = None, **kwargs: object) -> subprocess.Popen[str]:
        """A process we kill by PID at close; moved into `cgroup` right after it started."""
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, **kwargs)  # type: ignore[call-overload]
        self.defer(f"kill {proc.pid}", lambda: _kill(proc))
        if cgroup is not None:
            Path(cgroup, "cgroup.procs").write_text(str(proc.pid))
        return proc

    def mkdir(self, path: str | Path) -> Path:
        """mkdir -p; each directory made here (never one that existed) is removed at close."""
        made = []
        p = Path(path)
        while not p.exists():
            made.append(p)
            p = p.parent
        for directory in reversed(made):
            directory.mkdir()
            self.defer(f"rmdir {directory}", lambda d=directory: _remove_cgroup_or_dir(d))
        return Path(path)

    def netns(self) -> str:
        name = self.tag
        run("ip", "netns", "add", name)
        self.defer(f"netns {name}", lambda: run("ip", "netns", "del", name))
        # No IPv6: no router or neighbour solicitations, so the only traffic is the test's.
        for key in ("all", "default"):
            run("ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{key}.disable_ipv6=1")
        return name

    def close(self) -> None:
        errors = []
        for what, action in reversed(self._undo):
            try:
                action()
            except Exception as error:  # keep undoing the rest
                errors.append(f"{what}: {error}")
        self._undo.clear()
        assert not errors, f"cleanup failed: {errors}"


def _kill(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for stream in (proc.stdin, proc.stdout):
        if stream:
            with contextlib.suppress(OSError):
                stream.close()


def _remove_cgroup_or_dir(path: Path) -> None:
    """rmdir; for a cgroup, first move what is still in it to the hierarchy's root."""
    procs = path / "cgroup.procs"
    if procs.exists():
        root = _hierarchy_root(path)
        for _ in range(100):
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                for pid in procs.read_text().split():
                    with contextlib.suppress(OSError):
                        (root / "cgroup.procs").write_text(pid)
                time.sleep(0.05)
    path.rmdir()


def _hierarchy_root(path: Path) -> Path:
    for parent in path.parents:
        if not (parent.parent / "cgroup.procs").exists():
            return parent
    return path


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    s = Scratch()
    try:
        yield s
    finally:
        s.close()


def pod_cgroups(s: Scratch, pods: int = 1, containers: int = 1) -> tuple[Path, list[list[Path]]]:
    """<cgroup2>/<tag>/kubepods/burstable/pod<uid>/<container id>: the base and container dirs.
    Point the agent's `kpod.cgroup.root` at the base: it sees only what the test made."""
    unified = mounts().unified
    assert unified is not None
    base = Path(unified, s.tag)
    out = []
    for _ in range(pods):
        pod = base / "kubepods" / "burstable" / f"pod{uuid.uuid4()}"
        out.append([s.mkdir(pod / f"{uuid.uuid4().hex}{uuid.uuid4().hex}") for _ in range(containers)])
    # As a kubelet does on pure cgroup2: controllers enabled top down in the directories made
    # here (processes go into containers only).  A no-op on hybrid hosts.
    inner = {p for group in out for c in group for p in c.parents if p == base or base in p.parents}
    for directory in sorted(inner, key=lambda p: len(p.parts)):
        enable_controllers(directory)
    return base, out


def agent_config(base: Path, port: int, receivers: dict[str, str], *, kpod: str = "", exporter: str = "",
                 poll: str = "300ms") -> str:  # fmt: skip
    """Local mode, the cgroups under `base` only, the given receivers (id -> YAML flow map)."""
    names = ", ".join(receivers)
    listed = "\n".join(f"  {rid}: {cfg or '{}'}" for rid, cfg in receivers.items())
    return (
        f"kpod: {{profile: custom, poll_interval: {poll}, discovery: {{mode: local}}, cgroup: {{root: '{base}'}}"
        f"{', ' + kpod if kpod else ''}}}\n"
        f"receivers:\n{listed}\n"
        f"exporters:\n  prometheus: {{endpoint: '127.0.0.1:{port}'{', ' + exporter if exporter else ''}}}\n"
        f"service:\n  pipelines:\n    metrics:\n      receivers: [{names}]\n      exporters: [prometheus]\n"
    )


def in_cgroup_prefix(cgroup: Path) -> tuple[str, ...]:
    """A command prefix that moves itself into `cgroup` and then execs the rest: the agent is
    charged there from its first allocation."""
    code = (
        "import os, sys; open(sys.argv[1] + '/cgroup.procs', 'w').write(str(os.getpid())); "
        "os.execvp(sys.argv[2], sys.argv[2:])"
    )
    return (sys.executable, "-c", code, str(cgroup))


def memory_cgroup(s: Scratch, limit_bytes: int) -> Path:
    """A memory cgroup of ours with a hard limit: memory.max on cgroup2 where the controller
    is there, else the v1 hierarchy's memory.limit_in_bytes (hybrid hosts)."""
    m = mounts()
    unified = Path(m.unified) if m.unified else None
    if unified is not None and "memory" in (unified / "cgroup.subtree_control").read_text().split():
        cgroup = s.mkdir(unified / f"{s.tag}-mem")
        (cgroup / "memory.max").write_text(str(limit_bytes))
        if (cgroup / "memory.swap.max").exists():
            (cgroup / "memory.swap.max").write_text("0")
        return cgroup
    v1 = m.v1.get("memory")
    if v1 is None:
        pytest.fail("no memory controller (neither on cgroup2 nor a v1 hierarchy) to limit the agent in")
    cgroup = s.mkdir(Path(v1) / f"{s.tag}-mem")
    (cgroup / "memory.limit_in_bytes").write_text(str(limit_bytes))
    return cgroup


def memory_usage(cgroup: Path) -> int:
    for name in ("memory.current", "memory.usage_in_bytes"):
        with contextlib.suppress(FileNotFoundError):
            return int((cgroup / name).read_text())
    raise AssertionError(f"{cgroup}: no memory usage file")


def oom_kills(cgroup: Path) -> int:
    for name in ("memory.events", "memory.oom_control"):
        with contextlib.suppress(FileNotFoundError):
            for line in (cgroup / name).read_text().split("\n"):
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
    return 0


# ------------------------------------------------------------------------------ the metrics port

TOKEN = "hostile-port-token-5f4dcc3b5aa765d6"
# What the standard library's server read in full before the token check: up to 100 lines of 64 KiB.
BIG_HEAD = (
    b"GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer wrong\r\n"
    + b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 65000) for i in range(97))
    + b"\r\n"
)
# The chart's limit is 512 MiB; half of it leaves the old server no chance and the agent
# (about 35 MiB here) lots of room.
MEMORY_LIMIT = 256 << 20


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().split("\n"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def port_agent(s: Scratch, tmp_path: Path, *, memory: bool = True, args: tuple[str, ...] = ()) -> AgentProcess:
    """An agent with a bearer token, reading one empty pod cgroup, in a memory cgroup of ours
    (the metrics-port attacks: tests/test_hostile_port.py, bench/hostile.py)."""
    base, _ = pod_cgroups(s)
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    port = free_port()
    config = agent_config(base, port, {"cgroup_cpu": ""}, exporter=f"bearer_token_file: '{token}'")
    prefix = in_cgroup_prefix(memory_cgroup(s, MEMORY_LIMIT)) if memory else ()
    agent = AgentProcess(config, tmp_path, port, prefix=prefix, args=args).start()
    s.defer(f"agent {agent.pid}", agent.stop)
    agent.wait_ready()
    return agent


def scrape(agent: AgentProcess, timeout: float = 5.0) -> int:
    return len(agent.get("/metrics", {"Authorization": f"Bearer {TOKEN}"}, timeout=timeout))


def flood(port: int, clients: int, hold_s: float = 0.0) -> list[str]:
    """`clients` concurrent connections from 4 loopback addresses, each sending BIG_HEAD, or
    with `hold_s` all of it but the blank line that ends it, then holding the connection that
    long; what each of them saw."""
    outcomes: list[str] = []

    def one(i: int) -> None:
        try:
            source = (f"127.0.2.{i % 4}", 0)
            with socket.create_connection(("127.0.0.1", port), timeout=20, source_address=source) as sock:
                sock.sendall(BIG_HEAD[:-2] if hold_s else BIG_HEAD)
                time.sleep(hold_s)
                outcomes.append(sock.recv(64).split(b"\r\n")[0].decode() or "closed")
        except OSError as error:
            outcomes.append(type(error).__name__)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return outcomes


# A request that never ends: what a trickling client sends, a byte at a time.
PARTIAL = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: "


def slow_clients(port: int, count: int = 3000, addresses: int = 200) -> list[socket.socket]:
    """`count` connections from `addresses` loopback addresses (15 each for the defaults: under
    the per-client cap, so it is the total cap and the eviction of unproven connections that
    hold), none of which sends anything yet."""
    clients = []
    for i in range(count):
        sock = socket.socket()
        sock.bind((f"127.0.1.{1 + i % addresses}", 0))
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("127.0.0.1", port))
        clients.append(sock)
    return clients


def trickle(clients: list[socket.socket], step: int) -> None:
    """One more byte of PARTIAL from each client, as a trickling client does."""
    byte = PARTIAL[step % len(PARTIAL) : step % len(PARTIAL) + 1]
    for sock in clients:
        with contextlib.suppress(OSError):
            sock.send(byte)


def truncated_answered(clients: list[socket.socket]) -> int:
    """The clients end their requests' sending side; how many of them then get an answer."""
    for sock in clients:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
    time.sleep(1.5)
    answered = 0
    for sock in clients:
        with contextlib.suppress(OSError):
            answered += sock.recv(16).startswith(b"HTTP/")
    return answered


# ------------------------------------------------------------------------------ a pod's many mounts

# A private mount namespace with `count` tmpfs mounts (each its own filesystem) under `base`.
MANY_MOUNTS = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
base, count = sys.argv[1], int(sys.argv[2])
if libc.unshare(0x00020000):
    raise OSError(ctypes.get_errno(), "unshare")
if libc.mount(b"none", b"/", b"", ctypes.c_ulong(0x4000 | (1 << 18)), b""):
    raise OSError(ctypes.get_errno(), "make-rprivate")
for i in range(count):
    path = f"{base}/m{i:05d}".encode()
    os.mkdir(path)
    if libc.mount(b"kpodh", path, b"tmpfs", ctypes.c_ulong(0), b"size=64k"):
        raise OSError(ctypes.get_errno(), path)
print("ready", flush=True)
sys.stdin.readline()
"""
