"""Helpers for tests against the real kernel: cgroup trees, workloads of known effect, receivers.

Everything created here is removed again, also when a test fails: processes we started are
killed by PID, processes still in our cgroups are moved to the root cgroup first, and the
directories we made are removed deepest first.  Directories that existed before (a
kubepods.slice someone else made) are never removed, and nothing outside what we created is
touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import require_tools

from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.mounts import parse_mountinfo_cgroups
from kpod.component import Context
from kpod.selfmetrics import SelfMetrics
from kpod.settings import KpodSettings

REPO = Path(__file__).resolve().parents[1]


def kernel_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loads BPF programs, creates cgroups)"
    if not os.path.exists("/sys/kernel/btf/vmlinux"):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux missing)"
    return None


_REASON = kernel_skip_reason()
# Apply to kernel test modules: `pytestmark = kernel_test`.
kernel_test = [pytest.mark.kernel, pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def mounts():
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo_cgroups(f.read())


def cgroup2_root() -> str:
    unified = mounts().unified
    if not unified:
        pytest.skip("no cgroup2 mount in /proc/self/mountinfo")
    return unified


def write(path: str | Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


KUBELET_CONTROLLERS = ("cpu", "io", "memory", "pids")


def enable_controllers(cgroup: Path, wanted: tuple[str, ...] = KUBELET_CONTROLLERS) -> None:
    """Enable for `cgroup`'s children the controllers a kubelet enables, where available.

    Only for directories we made (never the root or someone else's cgroup).  A no-op on the
    controller-less cgroup2 of a hybrid host and on v1 trees (no cgroup.controllers there).
    """
    try:
        available = set((cgroup / "cgroup.controllers").read_text().split())
        enabled = set((cgroup / "cgroup.subtree_control").read_text().split())
    except OSError:
        return
    missing = [c for c in wanted if c in available and c not in enabled]
    if missing:
        write(cgroup / "cgroup.subtree_control", " ".join(f"+{c}" for c in missing))


def pure_cgroup2_memory() -> bool:
    """The memory controller is on cgroup2 (pure v2): OOM limits go in memory.max."""
    unified = mounts().unified
    return bool(unified) and "memory" in Path(unified, "cgroup.subtree_control").read_text().split()


@dataclass
class Pod:
    """A kubepods-shaped pod cgroup with one container scope (systemd driver names)."""

    uid: str
    pod_dir: Path
    container_dir: Path

    @property
    def container_id(self) -> int:
        return os.stat(self.container_dir).st_ino

    @property
    def pod_id(self) -> int:
        return os.stat(self.pod_dir).st_ino


@dataclass
class CgroupTree:
    """Builds cgroups under a cgroup2 (or v1 controller) root and removes exactly those."""

    root: Path
    created: list[Path] = field(default_factory=list)
    # Controllers to enable in each directory we make that gets children, as a kubelet does on
    # pure cgroup2 (where a new directory has no memory.max, io.stat... until its parent
    # enables them).  Opt-in: a cgroup with controllers enabled can hold no processes, and
    # some tests put processes in pod-level cgroups.
    controllers: tuple[str, ...] = ()

    def mkdir(self, relative: str) -> Path:
        path = self.root
        with _tree_lock():
            for part in Path(relative).parts:
                if self.controllers and path in self.created:
                    enable_controllers(path, self.controllers)
                path = path / part
                if not path.exists():
                    path.mkdir()
                    _mark(path)
                    self.created.append(path)
        return path

    def pod(self, qos: str = "burstable") -> Pod:
        """A pod with one container; qos "guaranteed" puts the pod right below kubepods.slice."""
        uid = str(uuid.uuid4())
        scope = f"cri-containerd-{uuid.uuid4().hex}{uuid.uuid4().hex}.scope"
        if qos == "guaranteed":
            container = self.mkdir(f"kubepods.slice/kubepods-pod{uid.replace('-', '_')}.slice/{scope}")
        else:
            qos_slice = f"kubepods-{qos}.slice"
            pod_slice = f"kubepods-{qos}-pod{uid.replace('-', '_')}.slice"
            container = self.mkdir(f"kubepods.slice/{qos_slice}/{pod_slice}/{scope}")
        return Pod(uid, container.parent, container)

    def move(self, pid: int, cgroup: Path) -> None:
        write(cgroup / "cgroup.procs", str(pid))

    def cleanup(self) -> None:
        """Move stragglers to the root, then rmdir deepest first (retrying while tasks exit).

        Several test runs may share kubepods.slice and the QoS slices (CI and a developer, or
        two sessions, on one host).  All trees take one lock to create and remove directories,
        and mark what they create (xattr trusted.kpod_test): a shared directory is left to
        whichever tree empties it last, which removes it only if it bears the mark, so cgroups
        not made by these helpers are never removed.
        """
        with _tree_lock():
            created, self.created = list(self.created), []
            for path in reversed(created):
                self._remove(path)
            ancestors = {p for c in created for p in c.parents if self.root in p.parents}
            for path in sorted(ancestors, key=lambda p: len(p.parts), reverse=True):
                if path.exists() and _marked(path) and not _child_dirs(path):
                    self._remove(path)

    def _remove(self, path: Path) -> None:
        for _ in range(50):
            if _child_dirs(path):
                return  # another tree's cgroups live below: the last one out removes it
            try:
                procs = (path / "cgroup.procs").read_text().split()
            except OSError:
                procs = []
            for pid in procs:
                with contextlib.suppress(OSError):
                    write(self.root / "cgroup.procs", pid)
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.05)  # tasks still exiting
        print(f"kernel_util: could not remove {path}", file=sys.stderr)


TREE_LOCK = "/tmp/kpod-test-cgroups.lock"
TREE_MARK = "trusted.kpod_test"


@contextlib.contextmanager
def _tree_lock() -> Iterator[None]:
    with open(TREE_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _mark(path: Path) -> None:
    with contextlib.suppress(OSError):  # no xattrs: shared parents are then simply left
        os.setxattr(path, TREE_MARK, b"1")


def _marked(path: Path) -> bool:
    try:
        return os.getxattr(path, TREE_MARK) == b"1"
    except OSError:
        return False


def _child_dirs(path: Path) -> bool:
    try:
        return any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(path))
    except OSError:
        return False


@contextlib.contextmanager
def cgroup_tree(root: str | Path | None = None, controllers: tuple[str, ...] = ()) -> Iterator[CgroupTree]:
    tree = CgroupTree(Path(root or cgroup2_root()), controllers=controllers)
    try:
        yield tree
    finally:
        tree.cleanup()


class Workload:
    """A Python child that waits for "go" on stdin, so it can be moved into cgroups first.

    `code` runs after go; it may print a result line (JSON) that `result()` returns.  The child
    is killed by PID on `stop()` (and by the context manager, also on failure).
    """

    PRELUDE = (
        "import os, sys, json, time, mmap\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # wait for go
    )

    def __init__(self, code: str, cpu: int | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", self.PRELUDE + code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid
        if cpu is not None:
            os.sched_setaffinity(self.pid, {cpu})
        # Started, imported, and asleep in read(): moving it into a cgroup now does not
        # charge its start-up to that cgroup, and does not wake it.
        try:
            if self.readline() != "ready":
                raise RuntimeError(f"workload {self.pid} did not start")
            deadline = time.monotonic() + 10
            while self.state() != "S" and time.monotonic() < deadline:
                time.sleep(0.001)
        except BaseException:
            self.stop()
            raise

    def state(self) -> str:
        return process_state(self.pid)

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()

    def readline(self, timeout: float = 30.0) -> str:
        assert self.proc.stdout is not None
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"workload {self.pid} printed nothing in {timeout}s")
        return self.proc.stdout.readline().strip()

    def wait(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.wait(10)
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream:
                with contextlib.suppress(OSError):
                    stream.close()


@contextlib.contextmanager
def workloads() -> Iterator[list[Workload]]:
    started: list[Workload] = []
    try:
        yield started
    finally:
        for w in started:
            w.stop()


def forced_routes() -> list[str]:
    """KPOD_BPF_FORCE_ROUTES, as the agent reads it: the fallback routes a test run is forced onto
    (`make test` runs the eBPF ground-truth tests once more this way, on the host and in the VMs)."""
    return [r.strip() for r in os.environ.get("KPOD_BPF_FORCE_ROUTES", "").split(",") if r.strip()]


def context(component_id: str, cgroup_root: str | None = None, scope: str = "all", **bpf: object) -> Context:
    """A component's context over the real cgroup2 tree: scope "all" is local mode (every
    cgroup counts as itself), "kubepods" a Kubernetes mode (only pods and containers count)."""
    settings = KpodSettings()
    settings.bpf.force_routes = forced_routes()
    for key, value in bpf.items():
        setattr(settings.bpf, key, value)
    root = cgroup_root or cgroup2_root()
    index = CgroupIndex(root, scope=scope)
    index.refresh()
    return Context(component_id, settings, index, SelfMetrics())


@contextlib.contextmanager
def sysctl(path: str, value: str) -> Iterator[None]:
    """Set a sysctl for the duration of a block and restore the previous value.

    Holds a host-wide lock meanwhile: two test runs toggling the same sysctl would otherwise
    restore it under each other (and leave it changed when they interleave).
    """
    with open(SYSCTL_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                previous = f.read().strip()
            write(path, value)
            try:
                yield
            finally:
                write(path, previous)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


SYSCTL_LOCK = "/tmp/kpod-test-sysctl.lock"


def proc_status_switches(text: str) -> int:
    total = 0
    for line in text.splitlines():
        if line.startswith(("voluntary_ctxt_switches:", "nonvoluntary_ctxt_switches:")):
            total += int(line.split()[1])
    return total


def stat_majflt(text: str) -> int:
    """majflt (field 12) of /proc/<pid>/stat; fields counted after the ")" of comm."""
    rest = text.rsplit(")", 1)[1].split()
    return int(rest[9])


# An OOM victim with many threads that all allocate: after the kill, every thread that
# faults again before it dies enters the OOM killer "already exiting" and is marked a victim
# without a kill.  Prints "ready", waits for a line on stdin, then allocates until killed.
THREADED_HOG_C = r"""
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static char *volatile sink;  /* the pointer escapes: the compiler may not drop malloc + memset */

static void *hog(void *arg)
{
	(void)arg;
	for (;;) {
		char *p = malloc(1 << 20);

		if (p) {
			memset(p, 1, 1 << 20);
			sink = p;
		}
	}
	return NULL;
}

int main(int argc, char **argv)
{
	int threads = atoi(argv[1]), i;
	pthread_t t[256];
	char c;

	if (write(1, "ready\n", 6) != 6 || read(0, &c, 1) != 1)
		return 2;
	for (i = 0; i < threads && i < 256; i++)
		pthread_create(&t[i], NULL, hog, NULL);
	hog(NULL);
	return 0;
}
"""


def points_for(batch, metric_name: str, cgroup_id: int) -> list:
    return [p for p in batch if p.metric.name == metric_name and p.cgroup is not None and p.cgroup.id == cgroup_id]


# ------------------------------------------------------------------ writable cgroup2 (no BPF)


def cgroup2_skip_reason() -> str | None:
    """Why this host cannot run the tests that create cgroups (without loading BPF), or None."""
    if os.geteuid() != 0:
        return "needs root to create cgroups"
    unified = mounts().unified
    if not unified or not os.access(unified, os.W_OK):
        return "no writable cgroup2 mount"
    return None


# ------------------------------------------------------------------ workloads of known effect
# What the receiver tests and the end-to-end test run in their pods: each does a known amount
# of work, so the agent's figures are compared with what the workload itself did.


def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("" once the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def wait_blocked(pid: int, timeout_s: float = 10.0) -> None:
    """Wait until the task sleeps (in its read of stdin): its /proc counters are final then."""
    deadline = time.monotonic() + timeout_s
    while process_state(pid) != "S" and time.monotonic() < deadline:
        time.sleep(0.001)
    assert process_state(pid) == "S", f"{pid} did not block"


def compile_c(source: str, directory: Path, name: str, *flags: str) -> Path:
    """A small C program built with clang (`make setup` installs it); e.g. flags "-static"."""
    require_tools("clang")
    src, binary = directory / f"{name}.c", directory / name
    src.write_text(source)
    subprocess.run(["clang", "-O1", *flags, "-o", str(binary), str(src)], check=True)
    return binary


# The syscall workload: after "go", N_OK getppid(), M_FAIL failing read(), Z_EOF read() at EOF
# and K_UNTRACKED getuid(); the only successful read is the one that waits for "go".
N_OK, M_FAIL, K_UNTRACKED, Z_EOF = 1000, 777, 500, 3
GO_DELAY = 0.3  # seconds the first read(0) blocks in the pod before "go"

SYSCALL_WORKLOAD_C = r"""
#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	long n = atol(argv[1]), m = atol(argv[2]), k = atol(argv[3]), z = atol(argv[4]), i;
	int devnull;
	char c;

	if (write(1, "ready\n", 6) != 6)
		return 2;
	if (read(0, &c, 1) != 1)        /* wait for go: the only successful read in the pod */
		return 3;
	for (i = 0; i < n; i++)
		getppid();
	for (i = 0; i < m; i++)
		if (read(-1, &c, 1) != -1)  /* EBADF */
			return 4;
	devnull = open("/dev/null", O_RDONLY);
	for (i = 0; i < z; i++)
		if (read(devnull, &c, 1) != 0)  /* EOF: returns 0, which is not an error */
			return 6;
	for (i = 0; i < k; i++)
		getuid();
	if (write(1, "done\n", 5) != 5)
		return 5;
	(void)read(0, &c, 1);           /* blocks until the test kills us */
	return 0;
}
"""


@contextlib.contextmanager
def started_syscall_workload(binary: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The syscall workload, started and blocked in its read of "go" (move it, then finish it)."""
    with waiting_process([str(binary), str(N_OK), str(M_FAIL), str(K_UNTRACKED), str(Z_EOF)]) as proc:
        yield proc


@contextlib.contextmanager
def waiting_process(command: list[str]) -> Iterator[subprocess.Popen[bytes]]:
    """A workload that prints "ready" and blocks in read(0) until "go"; killed at the end."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        wait_blocked(proc.pid)
        yield proc
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        for stream in (proc.stdin, proc.stdout):
            if stream:
                stream.close()


def finish_syscall_workload(proc: subprocess.Popen[bytes]) -> None:
    """Send "go" and wait until the workload has made all its calls."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(b"g")
    proc.stdin.flush()
    assert proc.stdout.readline() == b"done\n"


# Direct I/O of known size on the file or device "$1", after a line on stdin: 4 MiB written,
# 2 MiB read, then "done" and it waits for another line.
DIRECT_IO_SCRIPT = r"""
read line
dd if=/dev/zero of="$1" bs=1M count=4 oflag=direct conv=notrunc status=none
dd if="$1" of=/dev/null bs=1M count=2 iflag=direct status=none
echo done
read line
"""


# A loopback TCP transfer between two pods: ground truth is what send() and recv() returned.
ODD_BYTES = 1_000_003  # odd, several segments, not a multiple of any buffer size

# Python snippets run by the workloads (after "go", i.e. after being moved into their pod).
SETNS = textwrap.dedent(
    """
    import ctypes, socket
    netns = sys.stdin.readline().strip()
    if netns:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open('/run/netns/' + netns, os.O_RDONLY)
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), 'setns')
        os.close(fd)
    INFO = lambda s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512).hex()
    """
)

# The receiver listens on loopback; in a pod network namespace of its own (a runc pod) it is
# given KPOD_TEST_BIND=0.0.0.0, and the sender's port line is "<address> <port>".
RECEIVER = SETNS + textwrap.dedent(
    """
    ls = socket.socket()
    ls.bind((os.environ.get('KPOD_TEST_BIND', '127.0.0.1'), 0))
    ls.listen(1)
    print(ls.getsockname()[1], flush=True)
    mode = sys.stdin.readline().strip()  # the test may move us to another cgroup before this
    conn, _ = ls.accept()
    peeked = len(conn.recv(4096, socket.MSG_PEEK)) if mode == 'peek' else 0  # data stays queued
    total = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        total += len(chunk)
    info = INFO(conn)
    conn.close()
    print(json.dumps({'received': total, 'peeked': peeked, 'info': info}), flush=True)
    sys.stdin.readline()
    """
)

SENDER = SETNS + textwrap.dedent(
    """
    address, _, port = sys.stdin.readline().strip().rpartition(' ')
    nbytes = int(sys.stdin.readline())
    method = sys.stdin.readline().strip()  # send | sendfile | splice
    c = socket.create_connection((address or '127.0.0.1', int(port)))
    print('connected', flush=True)
    sys.stdin.readline()  # "send"
    data = b'k' * nbytes
    sent = 0
    if method == 'sendfile':  # file -> socket in the kernel (tcp_sendpage before 6.5)
        import tempfile
        with tempfile.TemporaryFile() as f:
            f.write(data)
            f.flush()
            while sent < nbytes:
                sent += os.sendfile(c.fileno(), f.fileno(), sent, nbytes - sent)
    elif method == 'splice':  # pipe -> socket (tcp_sendpage before 6.5)
        r, w = os.pipe()
        while sent < nbytes:
            queued = os.write(w, data[sent:sent + 65536])
            while queued:
                n = os.splice(r, c.fileno(), queued)
                queued -= n
                sent += n
    else:
        while sent < nbytes:
            sent += c.send(data[sent:])  # what each send() RETURNED
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
    print(json.dumps({'sent': sent, 'info': INFO(c)}), flush=True)
    sys.stdin.readline()
    """
)


def transfer(tree: CgroupTree, procs: list[Workload], pod_a: Pod, pod_b: Pod, netns: str = "",
             nbytes: int = ODD_BYTES, move_b_to: Pod | None = None,
             peek: bool = False, method: str = "send") -> tuple[Workload, Workload]:  # fmt: skip
    """Start B (listener) then A (sender) in their pods; returns (a, b) workloads, connected.
    `method`: how A hands the bytes to its socket (send, sendfile or splice)."""
    b = Workload(RECEIVER)
    procs.append(b)
    tree.move(b.pid, pod_b.container_dir)
    b.go()
    b.send(netns)
    port = int(b.readline())
    if move_b_to is not None:
        tree.move(b.pid, move_b_to.container_dir)
    b.send("peek" if peek else "accept")
    a = Workload(SENDER)
    procs.append(a)
    tree.move(a.pid, pod_a.container_dir)
    a.go()
    a.send(netns)
    a.send(str(port))
    a.send(str(nbytes))
    a.send(method)
    assert a.readline() == "connected"
    return a, b


@contextlib.contextmanager
def uncached_file(size: int) -> Iterator[Path]:
    """A file on a disk-backed filesystem (tmpfs pages cannot be dropped), not in the page cache."""
    directory = Path("/var/tmp") / f"kpod-e2e-{uuid.uuid4().hex}"
    directory.mkdir()
    data = directory / "data"
    try:
        with open(data, "wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(data, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        yield data
    finally:
        data.unlink(missing_ok=True)
        directory.rmdir()


# The end-to-end tests' workloads of known effect (Python code run by Workload or a container).
FAULT_FILE_SIZE = 16 << 20


def faults_code(path: Path) -> str:
    # Major faults first, then ~3000 short sleeps: each one a voluntary context switch.
    # MADV_RANDOM: no read-ahead, so every page is a major fault of its own (with the default
    # read-ahead, 8 MiB on this host's disk, the whole file comes in one or two faults: too
    # weak a ground truth).
    return (
        f"f = open({str(path)!r}, 'rb')\n"
        "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)\n"
        "m.madvise(mmap.MADV_RANDOM)\n"
        "total = 0\n"
        "for off in range(0, len(m), 4096):\n"
        "    total += m[off]\n"
        "for _ in range(3000):\n"
        "    time.sleep(0.0002)\n"
        "print('done', flush=True)\n"
        "sys.stdin.readline()\n"
    )


def settled(read: Callable[[], Any], interval_s: float = 0.3, timeout_s: float = 10.0) -> Any:
    """read() once it returns the same twice `interval_s` apart: kernel counters that trail the
    event (a CFS period timer still counts periods after its last runnable task blocked)."""
    deadline = time.monotonic() + timeout_s
    value = read()
    while True:
        time.sleep(interval_s)
        again = read()
        if again == value or time.monotonic() > deadline:
            return again
        value = again
