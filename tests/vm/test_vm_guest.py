"""Tests that only mean something inside the Debian 6.1 VM of `make test-vm` (KPOD_IN_VM=1).

They pin down the node shape the other ground-truth tests then run on (kernel 6.1, pure
cgroup v2 with a kubelet's controllers, no sock_*_length tracepoints), what `kpod-metrics
check` chooses there, and the disk receiver on a real virtio disk.  Elsewhere they skip.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.mounts import CgroupMounts, parse_mountinfo_cgroups

IN_VM = os.environ.get("KPOD_IN_VM") == "1"
pytestmark = [pytest.mark.kernel, pytest.mark.skipif(not IN_VM, reason="runs inside the VM of `make test-vm`")]

REPO = Path(__file__).resolve().parents[2]
DATA = Path("/mnt/data")  # guest.sh mounts the ext4 disk image (vda) here


def _mounts() -> CgroupMounts:
    return parse_mountinfo_cgroups(Path("/proc/self/mountinfo").read_text())


def test_guest_is_debian_61_on_pure_cgroup2() -> None:
    assert os.uname().release.startswith("6.1.")
    mounts = _mounts()
    assert mounts.unified == "/sys/fs/cgroup" and not mounts.v1
    assert mounts.layout == "v2"
    enabled = Path("/sys/fs/cgroup/cgroup.subtree_control").read_text().split()
    assert {"cpu", "io", "memory", "pids"} <= set(enabled)
    # The premise of the TCP-bytes fallback: 6.1 has neither tracepoint.
    events = Path("/sys/kernel/tracing/events/sock")
    assert events.is_dir()
    assert not (events / "sock_send_length").exists() and not (events / "sock_recv_length").exists()
    assert os.path.ismount("/sys/fs/bpf") and os.path.ismount("/sys/kernel/tracing")


def test_a_stalled_cpu_panics_the_guest() -> None:
    """vm.py's STALL_WATCHDOG took effect: a soft lockup or an RCU stall ends the run at once."""
    sysctl = Path("/proc/sys/kernel")
    assert (sysctl / "softlockup_panic").read_text().strip() == "1"
    assert (sysctl / "panic_on_rcu_stall").read_text().strip() == "1"
    assert (sysctl / "watchdog_thresh").read_text().strip() == "30"
    assert (sysctl / "panic_print").read_text().strip() == str(0x20)


def test_kprobes_work_here() -> None:
    """The fallback routes need kprobes (6.18 hosts have none): a probe on tcp_sendmsg can be made."""
    tracing = Path("/sys/kernel/tracing")
    assert "tcp_sendmsg" in (tracing / "available_filter_functions").read_text().split()
    name = f"kpodvm_{os.getpid()}"

    def add(line: str) -> None:
        # O_APPEND without Python's "a" mode, which seeks to the end: tracefs refuses that.
        fd = os.open(tracing / "kprobe_events", os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    add(f"p:{name} tcp_sendmsg\n")
    try:
        assert (tracing / "events" / "kprobes" / name).is_dir()
    finally:
        add(f"-:{name}\n")


def test_check_names_kernel_layout_and_routes(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("kpod: {profile: comprehensive, discovery: {mode: local}}\n")
    result = subprocess.run(
        [sys.executable, "-m", "kpod.cli", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=600,  # ~19x slower than the host under TCG
        cwd=REPO,
    )
    out = result.stdout
    print(out)  # in the VM run log, with -s or on failure
    assert result.returncode == 0, out + result.stderr
    assert f"kernel:       {os.uname().release}" in out and "6.1." in out
    assert "cgroups:      v2 (cgroup2 at /sys/fs/cgroup)" in out
    assert "BTF:          yes" in out
    # The receiver lines are the indented ones under "receivers:" (processors follow, unindented).
    after = out.split("receivers:", 1)[1].split("\n")[1:]
    receivers = [line.strip() for line in itertools.takewhile(lambda line: line.startswith("  "), after)]
    assert receivers, out
    # Every receiver either runs, naming its route, or says in one line why not.
    for line in receivers:
        assert " ok: " in line or " cannot run: " in line, line
    by_name = {line.split()[0]: line for line in receivers}
    assert "io.stat (cgroup2)" in by_name["disk"]
    assert " ok: " in by_name["cgroup_memory"] and " ok: " in by_name["pressure"]
    if "net_tcp" in by_name:  # no sock_*_length here: the route must be a fallback
        route = by_name["net_tcp"]
        assert " ok: " in route, route
        # Route entries: "<metrics> <- <hook>" or "... <- <hook>: off (<why>)".
        entries = route.split(" ok: ", 1)[1].split("; ")
        for metric, tracepoint in (("sent", "sock_send_length"), ("received", "sock_recv_length")):
            chosen = [e for e in entries if e.startswith(f"kpod.net.tcp.bytes.{metric} <- ") and ": off" not in e]
            assert len(chosen) == 1, route
            assert "fexit/" in chosen[0] or "kretprobe/" in chosen[0] or "kprobe/" in chosen[0], chosen
            assert f"{tracepoint}: off (kernel has no" in route


def test_disk_io_stat_on_the_virtio_disk() -> None:
    """Direct I/O of a known size on vda (ext4), read back through the disk receiver: exact bytes."""
    from cgroup_tree import make_context
    from kernel_util import DIRECT_IO_SCRIPT
    from kpod.receivers.disk import DiskConfig, DiskReceiver

    from kpod.cgroup.parsers import parse_io_stat

    st = os.stat("/dev/vda")
    major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
    blob = DATA / f"kpod-test-{uuid.uuid4().hex}"
    # Allocated beforehand from the root cgroup, so the container's I/O is a pure overwrite
    # and read of data blocks: no metadata I/O lands in its io.stat.
    with open(blob, "wb") as f:
        f.write(b"\1" * (4 << 20))
        f.flush()
        os.fsync(f.fileno())
    base = Path("/sys/fs/cgroup") / f"kpodvm{os.getpid()}{uuid.uuid4().hex[:6]}"
    pod = base / "kubepods" / "burstable" / f"pod{uuid.uuid4()}"
    container = pod / (uuid.uuid4().hex * 2)
    made: list[Path] = []
    proc: subprocess.Popen[str] | None = None
    try:
        for directory in (base, base / "kubepods", base / "kubepods" / "burstable", pod, container):
            directory.mkdir()
            made.append(directory)
            if directory != container:
                (directory / "cgroup.subtree_control").write_text("+io +memory +cpu +pids")
        proc = subprocess.Popen(["sh", "-c", DIRECT_IO_SCRIPT, "sh", str(blob)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        (container / "cgroup.procs").write_text(str(proc.pid))
        assert proc.stdin and proc.stdout
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "done"

        index = CgroupIndex(str(base), scope="kubepods", mounts=CgroupMounts(str(base)))
        index.refresh()
        receiver = DiskReceiver(make_context("disk", index), DiskConfig())
        receiver.start()
        assert receiver.route() == "io.stat (cgroup2)"
        got = {(p.metric.name, p.cgroup.path, p.attributes): p.value for p in receiver.collect() if p.cgroup}
        rel = str(container)[len(str(base)) :]
        device = (("device", "vda"),)
        assert got[("kpod.disk.written.bytes", rel, device)] == 4 << 20
        assert got[("kpod.disk.read.bytes", rel, device)] == 2 << 20
        stats = parse_io_stat((container / "io.stat").read_text())[(major, minor)]
        assert got[("kpod.disk.reads", rel, device)] == stats["rios"] > 0
        assert got[("kpod.disk.writes", rel, device)] == stats["wios"] > 0
        # The pod holds the sum of its containers (hierarchical), and so does the receiver.
        pod_rel = str(pod)[len(str(base)) :]
        if ("kpod.disk.written.bytes", pod_rel, device) in got:
            assert got[("kpod.disk.written.bytes", pod_rel, device)] == 4 << 20
        receiver.shutdown()
    finally:
        if proc is not None:
            proc.kill()
            proc.wait(10)
        for directory in reversed(made):
            directory.rmdir()
        blob.unlink(missing_ok=True)
