"""A hostile pod's mounts, against a real agent process: a FUSE server that never answers
STATFS, and a mount point that a symlink points at host paths.

Issue 19: a hung FUSE mount took every container's filesystem series from 53 to 0, /readyz
stayed ready and SIGTERM could not end the agent (its thread waited uninterruptibly in the
FUSE request); a pod that hid its tmpfs /d/m under another tmpfs at /d holding `m -> /etc`
had the agent report the host's filesystem under the pod's labels, and a missing target
showed as a missing series (an existence oracle for host paths).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from agent_proc import AgentProcess, Sample, free_port, rss_kib, thread_count
from hostile import REPO, Scratch, agent_config, pod_cgroups, scratch, skip_reason

from kpod.kernel.inroot import mount_of, open_in_root

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason())),
    pytest.mark.skipif(not os.path.exists("/dev/fuse"), reason="no /dev/fuse"),
]
__all__ = ["scratch"]

HUNG_FUSE = str(REPO / "tests" / "hung_fuse.py")
FUSE_CAPACITY = 1000 * 4096  # what hung_fuse.py answers once released


def pod_process(s: Scratch, cgroup: Path, directories: list[Path]) -> subprocess.Popen[str]:
    """hung_fuse.py in `cgroup`: a tmpfs on the first directory, a hung FUSE mount on the others."""
    proc = s.spawn([sys.executable, HUNG_FUSE, *map(str, directories)], cgroup)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def short(container: Path) -> str:
    """The `container` label of a container cgroup in local mode: its id cut to 12 characters."""
    return container.name[:12]


def filesystems(samples: list[Sample]) -> dict[tuple[str, str], float]:
    """(container label, mountpoint) -> capacity."""
    return {(x.labels["container"], x.labels["mountpoint"]): x.value for x in samples
            if x.name == "kpod_fs_capacity_bytes"}  # fmt: skip


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [x.value for x in samples if x.name == name and labels.items() <= x.labels.items()]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def waiting_in_fuse(pid: int) -> int:
    """Threads of `pid` waiting for a FUSE answer (request_wait_answer, fs/fuse/dev.c)."""
    count = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            count += Path(f"/proc/{pid}/task/{task}/wchan").read_text() == "request_wait_answer"
        except OSError:
            continue
    return count


def test_a_hung_fuse_mount_costs_only_its_own_series(scratch: Scratch, tmp_path: Path) -> None:
    """Pod A has two hung FUSE mounts (under its limit of 3), pod C six (over it), pod B none."""
    s = scratch
    base, pods = pod_cgroups(s, pods=3)
    (a,), (b,), (c,) = pods
    a_ok, b_ok, c_ok = (s.mkdir(tmp_path / f"{name}-ok") for name in "abc")
    a_hung = [s.mkdir(tmp_path / f"a-hang{i}") for i in (1, 2)]
    c_hung = [s.mkdir(tmp_path / f"c-hang{i}") for i in range(1, 7)]
    pod_a = pod_process(s, a, [a_ok, *a_hung])
    pod_process(s, b, [b_ok])
    pod_c = pod_process(s, c, [c_ok, *c_hung])
    port = free_port()
    config = agent_config(base, port, {"filesystem": "{max_stuck_mounts_per_pod: 3}"})
    agent = AgentProcess(config, tmp_path, port).start()
    s.defer(f"agent {agent.pid}", agent.stop)
    agent.wait_ready()
    healthy = {(short(a), "/"), (short(a), str(a_ok)), (short(b), "/"), (short(b), str(b_ok))}

    seen: list[object] = []

    def stuck(n: int) -> bool:
        samples = agent.metrics()
        seen[:] = [sorted(filesystems(samples)), value(samples, "kpod_filesystem_stuck_mounts")]
        return healthy <= filesystems(samples).keys() and seen[1] == n

    try:
        agent.wait_until(lambda: stuck(5), 20, "reporting five stuck mounts")
    except AssertionError as error:
        raise AssertionError(f"{error}\nlast seen: {seen}") from None
    for _ in range(8):  # cycle after cycle: the others' series are all there, no hung one
        samples = agent.metrics()
        got = filesystems(samples)
        assert healthy <= got.keys(), got
        assert not [key for key in got if key[1] in map(str, a_hung + c_hung)], got
        time.sleep(0.3)
    # Five probes hung, each once (a pending probe is not sent again): A's two, and C's first
    # three, its limit; C's other mounts wait (its own series only: A and B are untouched).
    assert value(samples, "kpod_filesystem_probe_timeouts_total") == 5
    assert value(samples, "kpod_series_dropped_total", receiver="filesystem", reason="mount_stuck") > 0
    details = agent.status()["receivers"]["filesystem"]["details"]
    assert sorted((m["mount_point"], m["probe"]) for m in details["stuck_mounts"]) == sorted(
        (str(point), "pending") for point in [*a_hung, *c_hung[:3]])  # fmt: skip
    assert agent.get("/readyz")  # 200: the agent is fine, two pods' mounts are not
    # The calls really hang, in the worker process (one thread each) and not in the agent.
    worker = details["statfs_worker_pid"]
    assert waiting_in_fuse(worker) == 5 and waiting_in_fuse(agent.pid) == 0
    worker_rss, worker_threads = rss_kib(worker), thread_count(worker)

    # The server answers a-hang1: the late answer clears it, a retry measures it.
    assert pod_a.stdin is not None and pod_a.stdout is not None
    pod_a.stdin.write(f"release {a_hung[0]}\n")
    pod_a.stdin.flush()
    assert pod_a.stdout.readline().strip() == "released"
    agent.wait_until(lambda: filesystems(agent.metrics()).get((short(a), str(a_hung[0]))) == FUSE_CAPACITY, 20,
                     "measuring the released mount")  # fmt: skip
    assert value(agent.metrics(), "kpod_filesystem_stuck_mounts") == 4

    # SIGTERM with four calls still hung: the agent exits 0, within the 5 s of its contract.
    began = time.monotonic()
    assert agent.stop(timeout_s=5.0) == 0, agent.log()[-2000:]
    print(f"\nhung FUSE: 5 calls hung, worker {worker_threads} threads, {worker_rss} KiB RSS; "
          f"agent exit 0 in {time.monotonic() - began:.2f}s")  # fmt: skip
    assert "Traceback" not in agent.log()
    # The worker outlives it only while mounts hang: the pods' end aborts their connections.
    assert os.path.exists(f"/proc/{worker}")
    for pod in (pod_a, pod_c):
        assert pod.stdin is not None
        pod.stdin.close()
        pod.wait(10)
    for _ in range(100):
        if not os.path.exists(f"/proc/{worker}"):
            break
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{worker}"), "the statfs worker outlived the hung mounts"


# A pod with its own root (a tmpfs, chroot) that hides its tmpfs /d/m under another tmpfs at
# /d, in which m is a symlink to an absolute path: a host path that exists, or one that does not.
SYMLINK_POD = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def mount(src, dst, fstype, flags, data):
    if libc.mount(src.encode(), dst.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode()):
        raise OSError(ctypes.get_errno(), dst)
root, target = sys.argv[1], sys.argv[2]
if libc.unshare(0x00020000):
    raise OSError(ctypes.get_errno(), "unshare")
mount("none", "/", "", 0x4000 | (1 << 18), "")
mount("kpodh", root, "tmpfs", 0, "size=8m")
os.makedirs(root + "/d/m")
mount("kpodh", root + "/d/m", "tmpfs", 0, "size=2m")
mount("kpodh", root + "/d", "tmpfs", 0, "size=3m")
os.symlink(target, root + "/d/m")
os.chroot(root)
os.chdir("/")
print("ready", flush=True)
sys.stdin.readline()
"""


@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "component-walk"])
def test_lookups_refuse_the_symlink_on_both_routes(scratch: Scratch, tmp_path: Path, walk: bool) -> None:
    """The lookup itself, on both of its routes, in a real pod root built that way."""
    root = scratch.mkdir(tmp_path / "root")
    proc = scratch.spawn([sys.executable, "-c", SYMLINK_POD, str(root), "/etc"])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    mounts = {line.split(" ")[4]: int(line.split(" ")[0]) for line in
              Path(f"/proc/{proc.pid}/mountinfo").read_text().split("\n") if line}  # fmt: skip
    pod_root = os.open(f"/proc/{proc.pid}/root", os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(OSError) as refused:
            open_in_root(pod_root, "/d/m", walk=walk)
        assert refused.value.errno == 40  # ELOOP: a symlink on the way, not followed
        fd = open_in_root(pod_root, "/d", walk=walk)
        try:
            assert mount_of(fd).mount_id == mounts["/d"]  # the mount mountinfo names
        finally:
            os.close(fd)
        with pytest.raises(OSError):
            open_in_root(pod_root, "/d/../../etc", walk=walk)
    finally:
        os.close(pod_root)


def test_a_symlinked_mount_point_never_reports_a_host_path(scratch: Scratch, tmp_path: Path) -> None:
    s = scratch
    base, pods = pod_cgroups(s, pods=2)
    (existing,), (missing,) = pods
    for container, target in ((existing, "/etc"), (missing, f"/nonexistent-{uuid.uuid4().hex}")):
        root = s.mkdir(tmp_path / f"root-{container.name[:8]}")
        proc = s.spawn([sys.executable, "-c", SYMLINK_POD, str(root), target], container)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    port = free_port()
    agent = AgentProcess(agent_config(base, port, {"filesystem": ""}), tmp_path, port).start()
    s.defer(f"agent {agent.pid}", agent.stop)
    agent.wait_ready()
    agent.wait_until(lambda: len(filesystems(agent.metrics())) >= 4, 20, "reporting both pods")
    time.sleep(1.0)  # a few more cycles
    samples = agent.metrics()
    got = filesystems(samples)
    # Each pod: its root (8 MiB) and /d (3 MiB); /d/m is not reported, whatever the target is:
    # not the host's /etc filesystem, and no difference between a host path that exists and
    # one that does not.
    for container in (existing, missing):
        mine = {point: size for (name, point), size in got.items() if name == short(container)}
        assert mine == {"/": 8 << 20, "/d": 3 << 20}, mine
    assert value(samples, "kpod_series_dropped_total", receiver="filesystem", reason="mount_unreachable") > 0
    assert value(samples, "kpod_collection_errors_total", receiver="filesystem") == 0
    assert agent.stop() == 0
