"""The syscall receiver against the real kernel, with a workload whose syscalls are all known.

The workload is a small C program compiled here (no interpreter in the measured window).  It
is started, prints "ready", and blocks in read(0) before it is moved into its pod, so its
dynamic loader's syscalls happen elsewhere.  In the pod it makes exactly:

    read(0)           x 1   (the blocked read waiting for "go"; it RETURNS in the pod)
    getppid()         x N   (tracked, succeed)
    read(-1)          x M   (tracked, fail with EBADF)
    openat(/dev/null) x 1   (untracked)
    read(devnull)     x Z   (tracked, return 0: not an error)
    getuid()          x K   (untracked)
    write(1, "done")  x 1   (untracked here)
    read(0)           x 1   (blocks again until the test is done: entered, not returned)

With read and getppid tracked: count(getppid) == N, errors 0; count(read) == 1 + M + Z,
errors(read) == M; nothing for getuid or write.  The filter map is read back with bpftool.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from kernel_util import (
    GO_DELAY,
    M_FAIL,
    N_OK,
    SYSCALL_WORKLOAD_C,
    Z_EOF,
    cgroup_tree,
    compile_c,
    context,
    finish_syscall_workload,
    kernel_test,
    points_for,
    started_syscall_workload,
    wait_blocked,
    waiting_process,
)
from kpod.receivers.syscall import FILTER_MAP, TRACKED, SyscallConfig, SyscallReceiver

from kpod.component import ComponentUnavailable
from kpod.kernel.bpfinfo import map_id
from kpod.kernel.syscalls import default_tracked, resolve_syscalls, syscall_table

pytestmark = kernel_test

@pytest.fixture(scope="module")
def workload_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_c(SYSCALL_WORKLOAD_C, tmp_path_factory.mktemp("syscall-workload"), "workload")


def collect(receiver: SyscallReceiver):
    receiver.context.cgroups.refresh()
    return receiver.collect()


def by_syscall(batch, metric: str, cgroup_id: int) -> dict[str, object]:
    return {dict(p.attributes)["syscall"]: p.value for p in points_for(batch, metric, cgroup_id)}


def filter_contents(receiver: SyscallReceiver) -> set[int]:
    """The tracked syscall numbers the kernel's filter map holds, read back through our binding."""
    assert receiver.loaded is not None
    filter_map = receiver.loaded.obj.maps[FILTER_MAP]
    on: set[int] = set()
    for nr in range(filter_map.max_entries):
        raw = filter_map.lookup(nr.to_bytes(4, "little"))
        if raw == TRACKED:
            on.add(nr)
    return on


def bpftool_filter(map_id: int, wanted: int = 1) -> set[int]:
    """The filter map's entries with value `wanted` (1: tracked, 2: restart_syscall), as
    bpftool (not our binding) reads them from the kernel."""
    out = subprocess.run(
        ["bpftool", "-j", "map", "dump", "id", str(map_id)], check=True, capture_output=True, text=True
    ).stdout
    on = set()
    for entry in json.loads(out):
        key = entry.get("key")
        value = entry.get("value")
        # Without BTF pretty-printing bpftool gives hex byte strings; with it, integers.
        k = key if isinstance(key, int) else int.from_bytes(bytes(int(b, 16) for b in key), "little")
        v = value if isinstance(value, int) else int.from_bytes(bytes(int(b, 16) for b in value), "little")
        if v == wanted:
            on.add(k)
    return on


def test_counts_errors_and_latency_exact_for_a_known_workload(workload_binary: Path) -> None:
    tracked = ["read", "getppid"]
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=tracked))
    with cgroup_tree() as tree:
        pod = tree.pod()
        receiver.start()
        try:
            numbers = resolve_syscalls(tracked)
            # The tracked set is really in the kernel's filter map, and nothing else is.
            filter_id = map_id(receiver.loaded.obj.maps["sys_filter"])
            assert bpftool_filter(filter_id) == set(numbers.values())
            assert filter_contents(receiver) == set(numbers.values())
            # restart_syscall is there too, only to resume calls the kernel restarts.
            assert bpftool_filter(filter_id, 2) == set(resolve_syscalls(["restart_syscall"]).values())
            with started_syscall_workload(workload_binary) as proc:
                tree.move(proc.pid, pod.container_dir)
                time.sleep(GO_DELAY)
                finish_syscall_workload(proc)
                batch = collect(receiver)
            count = by_syscall(batch, "kpod.syscall.count", pod.container_id)
            errors = by_syscall(batch, "kpod.syscall.errors", pod.container_id)
            latency = by_syscall(batch, "kpod.syscall.latency", pod.container_id)
            assert count == {"getppid": N_OK, "read": 1 + M_FAIL + Z_EOF}, count
            assert errors == {"getppid": 0, "read": M_FAIL}, errors
            assert set(latency) == {"getppid", "read"}  # untracked getuid / write: nothing
            assert latency["getppid"].count == N_OK
            assert latency["read"].count == 1 + M_FAIL + Z_EOF
            # The read waiting for "go" blocked >= GO_DELAY: one sample in a bucket that high.
            read_hist = latency["read"]
            assert read_hist.sum >= GO_DELAY
            slow = sum(
                c
                for c, bound in zip(read_hist.counts, (*read_hist.bounds, float("inf")), strict=True)
                if bound >= GO_DELAY
            )
            assert slow == 1, read_hist
            assert points_for(batch, "kpod.syscall.latency", pod.container_id)[0].metric.unit == "s"
            # Only tracked numbers are keys of the stats map for this cgroup.
            stats = receiver.loaded.obj.maps["sys_stats"]
            layout = receiver.loaded.layouts["sys_stats"]
            ours = {layout.key(k).nr for k, _ in stats.lookup_batch() if layout.key(k).cgroup_id == pod.container_id}
            assert ours == set(numbers.values())
        finally:
            receiver.shutdown()


def test_untracked_syscalls_give_nothing(workload_binary: Path) -> None:
    """Track only getuid's neighbour getgid: the workload (which never calls it) gets no series."""
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=["getgid"]))
    with cgroup_tree() as tree:
        pod = tree.pod()
        receiver.start()
        try:
            with started_syscall_workload(workload_binary) as proc:
                tree.move(proc.pid, pod.container_dir)
                finish_syscall_workload(proc)
                batch = collect(receiver)
            assert not points_for(batch, "kpod.syscall.count", pod.container_id)
            assert not points_for(batch, "kpod.syscall.latency", pod.container_id)
        finally:
            receiver.shutdown()


def test_default_tracked_set_comes_from_settings() -> None:
    ctx = context("syscall")
    ctx.settings.syscall.tracked_syscalls = ["openat", "close"]
    receiver = SyscallReceiver(ctx, SyscallConfig())
    receiver.start()
    try:
        assert filter_contents(receiver) == set(resolve_syscalls(["openat", "close"]).values())
        assert "tracked: openat,close" in receiver.route()
    finally:
        receiver.shutdown()


def test_empty_settings_track_this_architectures_default_set() -> None:
    """Nothing configured: the default set of this machine's architecture (on arm64 with
    epoll_pwait, which is what `make test-vm-arm64` proves), never a name it lacks."""
    ctx = context("syscall")
    assert ctx.settings.syscall.tracked_syscalls == []
    receiver = SyscallReceiver(ctx, SyscallConfig())
    receiver.start()
    try:
        expected = resolve_syscalls(default_tracked())
        assert list(expected) == default_tracked()
        assert filter_contents(receiver) == set(expected.values())
        assert f"tracked: {','.join(default_tracked())}" in receiver.route()
    finally:
        receiver.shutdown()


def test_another_architectures_names_are_skipped_not_fatal(caplog: pytest.LogCaptureFixture) -> None:
    """A list shared by amd64 and arm64 nodes: x86_64's epoll_wait is skipped on arm64 with a
    warning, and the rest is tracked.  On x86_64 the same list tracks everything."""
    names = ["epoll_wait", "getppid"]
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=names))
    receiver.start()
    try:
        assert filter_contents(receiver) == set(resolve_syscalls(names).values())
        if "epoll_wait" in syscall_table():
            assert set(receiver.tracked) == set(names) and "not tracked here" not in receiver.route()
        else:
            assert set(receiver.tracked) == {"getppid"}
            assert "not tracked here: epoll_wait (x86_64 only)" in receiver.route()
            assert "epoll_wait (x86_64 only)" in caplog.text
    finally:
        receiver.shutdown()


def test_unknown_syscall_name_is_one_line_unavailable() -> None:
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=["read", "no_such_call"]))
    with pytest.raises(ComponentUnavailable, match="no_such_call"):
        receiver.start()
    assert receiver.loaded is None
    receiver.shutdown()


def test_shutdown_removes_programs_and_maps() -> None:
    receiver = SyscallReceiver(context("syscall"), SyscallConfig())
    receiver.start()
    prog_ids = {s.id for s in receiver.loaded.program_stats().values()}
    map_ids = {map_id(m) for m in receiver.loaded.obj.maps.values()}
    receiver.shutdown()

    def ids(kind: str) -> set[int]:
        out = subprocess.run(["bpftool", "-j", kind, "show"], check=True, capture_output=True, text=True).stdout
        return {item["id"] for item in json.loads(out or "[]")}

    deadline = time.monotonic() + 10
    while (prog_ids & ids("prog") or map_ids & ids("map")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not prog_ids & ids("prog")
    assert not map_ids & ids("map")


def test_latency_struct_carries_the_histogram_layout() -> None:
    """sys_stats' latency is not a struct kpod_hist (no count member: the count is the sum of
    the slots), so check here what the shared layout test checks for kpod_hist: the slot
    mapping is in the object's BTF and the slots array has that many entries."""
    from kpod.kernel import btflayout, libbpf
    from kpod.kernel.ebpf import object_path

    with libbpf.BpfObject.open(object_path("syscall")) as obj:
        consts = btflayout.Btf(obj.btf_ptr).enum("kpod_hist_layout")
        value = btflayout.map_layouts(obj)["sys_stats"].value_type
        assert consts["KPOD_HIST_SLOTS"] == value().latency.slots._length_
        assert consts["KPOD_HIST_ZERO_SHIFT"] == 20
        assert not hasattr(value().latency, "count")


def test_full_stats_map_counts_update_errors(workload_binary: Path) -> None:
    """Room for one (cgroup, syscall): the other inserts fail in the kernel and are counted."""
    from kpod.receivers.bpf_maps import BpfMapsReceiver

    from kpod.component import EmptyConfig

    receiver = SyscallReceiver(
        context("syscall", map_max_entries=1), SyscallConfig(tracked_syscalls=["read", "getppid"])
    )
    maps = BpfMapsReceiver(context("bpf_maps"), EmptyConfig())
    with cgroup_tree() as tree:
        pod = tree.pod()
        receiver.start()
        try:
            with started_syscall_workload(workload_binary) as proc:
                tree.move(proc.pid, pod.container_dir)
                finish_syscall_workload(proc)
            # read and getppid of the pod cannot both fit in one entry.
            assert receiver.loaded.error_counts()["sys_stats"] > 0
            values = {
                (p.metric.name, dict(p.attributes)["map"]): p.value
                for p in maps.collect()
                if dict(p.attributes).get("map") == "sys_stats"
            }
            assert values[("kpod.bpf.map.capacity", "sys_stats")] == 1
            assert values[("kpod.bpf.map.entries", "sys_stats")] == 1
            assert values[("kpod.bpf.map.update.errors.total", "sys_stats")] > 0
        finally:
            receiver.shutdown()


def test_entries_of_gone_cgroups_are_deleted(workload_binary: Path) -> None:
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=["read", "getppid"]))
    with cgroup_tree() as tree:
        pod = tree.pod()
        gone = pod.container_id
        receiver.start()
        try:
            stats = receiver.loaded.obj.maps["sys_stats"]
            layout = receiver.loaded.layouts["sys_stats"]

            def keys_of_gone() -> int:
                return sum(1 for k, _ in stats.lookup_batch() if layout.key(k).cgroup_id == gone)

            with started_syscall_workload(workload_binary) as proc:
                tree.move(proc.pid, pod.container_dir)
                finish_syscall_workload(proc)
                final = by_syscall(collect(receiver), "kpod.syscall.count", gone)
                assert final
            index = receiver.context.cgroups
            index.gone_retention_s = 1.0
            tree.cleanup()  # the pod goes away
            assert keys_of_gone() == 2  # (gone, read) and (gone, getppid)
            # Retained: the final counts are still reported (the workload was killed while
            # blocked in its last read, which never returned: the counts did not move).
            assert by_syscall(collect(receiver), "kpod.syscall.count", gone) == final
            time.sleep(1.1)  # past the retention: let go
            index._walked_at = 0.0  # (a miss walks again at most once a second)
            assert not by_syscall(collect(receiver), "kpod.syscall.count", gone)
            assert keys_of_gone() == 2  # first miss: kept one cycle (the index may just be behind)
            collect(receiver)  # second miss: deleted
            assert keys_of_gone() == 0
        finally:
            receiver.shutdown()


COMPAT_WORKLOAD_C = r"""
#include <stdlib.h>
#include <unistd.h>

/* A 64-bit process making 32-bit syscalls through int $0x80: the kernel runs them with the
 * ia32 table, where 64 is getppid (x86_64's 64 is semget).  Then 64-bit close(-1) calls. */
int main(int argc, char **argv)
{
	long n = atol(argv[1]), m = atol(argv[2]), i, r;
	char c;

	if (write(1, "ready\n", 6) != 6 || read(0, &c, 1) != 1)
		return 2;
	for (i = 0; i < n; i++)
		__asm__ volatile("int $0x80" : "=a"(r) : "a"(64L) : "memory");
	for (i = 0; i < m; i++)
		close(-1);
	if (write(1, "done\n", 5) != 5)
		return 3;
	(void)read(0, &c, 1);
	return 0;
}
"""


def test_compat_syscalls_are_not_counted_as_64_bit_ones(tmp_path: Path) -> None:
    """32-bit syscall numbers mean other calls: ia32 getppid (64) is not x86_64's semget (64)."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("int $0x80 compat syscalls are an x86_64 matter")
    binary = compile_c(COMPAT_WORKLOAD_C, tmp_path, "compat")
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=["semget", "close"]))
    with cgroup_tree() as tree:
        pod = tree.pod()
        receiver.start()
        try:
            proc = subprocess.Popen([str(binary), "1000", "7"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                assert proc.stdout.readline() == b"ready\n"
                wait_blocked(proc.pid)
                tree.move(proc.pid, pod.container_dir)
                finish_syscall_workload(proc)
                batch = collect(receiver)
            finally:
                proc.kill()
                proc.wait(10)
                proc.stdin.close()
                proc.stdout.close()
            count = by_syscall(batch, "kpod.syscall.count", pod.container_id)
            assert count == {"close": 7}, count  # the 64-bit calls counted, no semget at all
            assert by_syscall(batch, "kpod.syscall.errors", pod.container_id) == {"close": 7}
        finally:
            receiver.shutdown()


ARMHF_BUSYBOX = "/usr/local/bin/busybox-armhf"  # tests/vm/vm.py puts it in the arm64 guest's root


def test_aarch32_syscalls_are_not_counted_as_arm64_ones(tmp_path: Path) -> None:
    """arm64's compat side: an AArch32 process's syscalls use the arm (EABI) table, where 3 is
    read and 4 is write; arm64's 3 and 4 are io_cancel and io_getevents.  A static armhf
    busybox reads a file in the pod: nothing may be counted under arm64's names, while the
    native read that waited for "go" in the same cgroup is counted."""
    import platform

    if platform.machine() != "aarch64":
        pytest.skip("AArch32 compat syscalls are an arm64 matter")
    if not os.access(ARMHF_BUSYBOX, os.X_OK):
        pytest.skip(f"no {ARMHF_BUSYBOX} (make test-vm-arm64 provides it)")
    data = tmp_path / "data"
    data.write_bytes(os.urandom(64 * 1024))
    tracked = ["io_cancel", "io_getevents", "read"]
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=tracked))
    with cgroup_tree() as tree:
        pod = tree.pod()
        receiver.start()
        try:
            # The arm64 shell blocks in read(2) until moved, then becomes the armhf cat.
            script = f'read go; exec {ARMHF_BUSYBOX} cat "$1"'
            proc = subprocess.Popen(["/bin/sh", "-c", script, "sh", str(data)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE)  # fmt: skip
            try:
                wait_blocked(proc.pid, timeout_s=30)
                tree.move(proc.pid, pod.container_dir)
                out, _ = proc.communicate(b"go\n", timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            assert proc.returncode == 0 and out == data.read_bytes()  # the 32-bit cat did run
            batch = collect(receiver)
            count = by_syscall(batch, "kpod.syscall.count", pod.container_id)
            assert count.get("read", 0) >= 1, count  # the native read of "go"
            assert "io_cancel" not in count and "io_getevents" not in count, count
        finally:
            receiver.shutdown()


# --- calls interrupted by signals: restarted, or ended with EINTR ------------------------------

RESTART_WORKLOAD_C = r"""
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static volatile long alarms;

static void on_alarm(int sig)
{
	(void)sig;
	alarms++;
}

/* argv: sa_restart (1/0), reads, gap_ms.  A child writes one byte every gap_ms; we read them
 * one by one while SIGALRM arrives every 20 ms.  Prints "<EINTR returns> <alarms>". */
int main(int argc, char **argv)
{
	int restart = atoi(argv[1]);
	long reads = atol(argv[2]), gap_ms = atol(argv[3]), got = 0, eintr = 0, i;
	struct sigaction sa;
	struct itimerval it;
	int p[2];
	pid_t child;
	char c;

	if (pipe(p) || write(1, "ready\n", 6) != 6 || read(0, &c, 1) != 1)
		return 2;
	child = fork();
	if (child == 0) {
		struct timespec gap = { gap_ms / 1000, (gap_ms % 1000) * 1000000L };

		close(p[0]);
		for (i = 0; i < reads; i++) {
			nanosleep(&gap, NULL);
			if (write(p[1], "x", 1) != 1)
				_exit(1);
		}
		_exit(0);
	}
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_alarm;
	sa.sa_flags = restart ? SA_RESTART : 0;
	sigaction(SIGALRM, &sa, NULL);
	memset(&it, 0, sizeof(it));
	it.it_interval.tv_usec = 20000;
	it.it_value.tv_usec = 20000;
	setitimer(ITIMER_REAL, &it, NULL);
	while (got < reads) {
		ssize_t n = read(p[0], &c, 1);

		if (n == 1)
			got++;
		else if (n < 0 && errno == EINTR)
			eintr++;
		else
			return 3;
	}
	memset(&it, 0, sizeof(it));
	setitimer(ITIMER_REAL, &it, NULL);
	waitpid(child, NULL, 0);
	printf("%ld %ld\n", eintr, alarms);
	fflush(stdout);
	(void)read(0, &c, 1);           /* blocks until the test kills us */
	return 0;
}
"""

SLEEP_WORKLOAD_C = r"""
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* One clock_nanosleep of argv[1] ms, called directly (libc may pick another call). */
int main(int argc, char **argv)
{
	long ms = atol(argv[1]);
	struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
	char c;

	if (write(1, "ready\n", 6) != 6 || read(0, &c, 1) != 1)
		return 2;
	if (syscall(SYS_clock_nanosleep, CLOCK_MONOTONIC, 0, &t, NULL) != 0)
		return 3;
	if (write(1, "done\n", 5) != 5)
		return 4;
	(void)read(0, &c, 1);
	return 0;
}
"""

READS, GAP_MS = 3, 500


def _slow_samples(hist, at_least: float) -> int:
    return sum(c for c, bound in zip(hist.counts, (*hist.bounds, float("inf")), strict=True) if bound >= at_least)


@pytest.mark.parametrize("sa_restart", [True, False], ids=["SA_RESTART", "no-SA_RESTART"])
def test_reads_interrupted_by_signals_count_as_their_caller_sees_them(tmp_path: Path, sa_restart: bool) -> None:
    """Three reads, each blocked 0.5 s, with SIGALRM every 20 ms.  With SA_RESTART the kernel
    restarts each read (-ERESTARTSYS at sys_exit, then the same call again): 3 calls, no
    error, 0.5 s each.  Without it every interruption returns EINTR to the program, which
    calls read again: one call and one error per EINTR the program counted."""
    binary = compile_c(RESTART_WORKLOAD_C, tmp_path, "restart")
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=["read"]))
    with cgroup_tree() as tree:
        pod = tree.pod()
        cgroup_id = pod.container_id
        receiver.start()
        try:
            with waiting_process([str(binary), "1" if sa_restart else "0", str(READS), str(GAP_MS)]) as proc:
                tree.move(proc.pid, pod.container_dir)
                proc.stdin.write(b"g")
                proc.stdin.flush()
                eintr, alarms = (int(x) for x in proc.stdout.readline().split())
                batch = collect(receiver)
        finally:
            receiver.shutdown()
    assert alarms >= 10, f"only {alarms} signals arrived: nothing was interrupted"
    count = by_syscall(batch, "kpod.syscall.count", cgroup_id)
    errors = by_syscall(batch, "kpod.syscall.errors", cgroup_id)
    latency = by_syscall(batch, "kpod.syscall.latency", cgroup_id)["read"]
    if sa_restart:
        assert eintr == 0
        # The read(0) waiting for "go", then the three restarted reads.
        assert count == {"read": 1 + READS}, (count, alarms)
        assert errors == {"read": 0}, errors
        # Each of the three spans its whole wait (>= 0.4 s: the child's first gap is 0.5 s).
        assert _slow_samples(latency, 0.4) == READS, latency
    else:
        assert eintr >= 10
        assert count == {"read": 1 + READS + eintr}, (count, eintr)
        assert errors == {"read": eintr}, (errors, eintr)
        assert _slow_samples(latency, 0.4) == 0, latency  # none waited longer than one tick


def test_sleep_stopped_and_continued_is_one_call(tmp_path: Path) -> None:
    """SIGSTOP wakes a clock_nanosleep with -ERESTART_RESTARTBLOCK; after SIGCONT (no
    handler) the kernel resumes it through restart_syscall(2).  One call, no error, the
    whole sleep."""
    binary = compile_c(SLEEP_WORKLOAD_C, tmp_path, "sleep")
    receiver = SyscallReceiver(context("syscall"), SyscallConfig(tracked_syscalls=["clock_nanosleep"]))
    with cgroup_tree() as tree:
        pod = tree.pod()
        cgroup_id = pod.container_id
        receiver.start()
        try:
            with waiting_process([str(binary), "800"]) as proc:
                tree.move(proc.pid, pod.container_dir)
                proc.stdin.write(b"g")
                proc.stdin.flush()
                stops = 0
                for _ in range(4):
                    time.sleep(0.08)
                    os.kill(proc.pid, signal.SIGSTOP)
                    time.sleep(0.02)
                    os.kill(proc.pid, signal.SIGCONT)
                    stops += 1
                assert proc.stdout.readline() == b"done\n"
                batch = collect(receiver)
        finally:
            receiver.shutdown()
    count = by_syscall(batch, "kpod.syscall.count", cgroup_id)
    errors = by_syscall(batch, "kpod.syscall.errors", cgroup_id)
    latency = by_syscall(batch, "kpod.syscall.latency", cgroup_id)["clock_nanosleep"]
    assert stops == 4
    assert count == {"clock_nanosleep": 1}, count
    assert errors == {"clock_nanosleep": 0}, errors
    assert _slow_samples(latency, 0.8) == 1, latency
