"""Cgroups that come and go, against the real kernel: bpf/cgroups.bpf.c's events and its
in-kernel map of the cgroups that count (kpod_watched), through the receivers.

- The kernel classifies new cgroups at mkdir (kubepods root, QoS, pod, container) before any
  task runs in them; nested cgroups get no entry.
- Kubernetes modes (index scope "kubepods"): tasks outside pods are not counted at all, and a
  pod's nested cgroups (cgroup delegation) are charged to their container: 1200 of them take
  one map entry, and a workload started afterwards still gets its series.
- A cgroup created, used and removed between two walks is known from its events: its counts
  are reported under its path, flagged gone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kernel_util import (
    M_FAIL,
    N_OK,
    SYSCALL_WORKLOAD_C,
    Z_EOF,
    cgroup2_root,
    cgroup_tree,
    compile_c,
    context,
    finish_syscall_workload,
    kernel_test,
    mounts,
    points_for,
    started_syscall_workload,
    wait_blocked,
)
from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

from kpod.component import Context, EmptyConfig
from kpod.kernel import cgroupwatch
from kpod.kernel.syscalls import default_tracked
from kpod.selfmetrics import SelfMetrics

pytestmark = kernel_test


def _watched(watch: cgroupwatch.CgroupWatch) -> dict[int, tuple[int, int]]:
    """kpod_watched as the kernel holds it: id -> (charge, kind)."""
    assert watch.loaded is not None and watch.layouts is not None
    layouts = watch.layouts
    out = {}
    for raw_key, raw_value in watch.loaded.obj.maps[cgroupwatch.WATCHED_MAP].lookup_batch():
        value = layouts.watched.value(raw_value)
        out[layouts.key_id(raw_key)] = (int(value.charge), int(value.kind))
    return out


def _by_syscall(batch, metric: str, cgroup_id: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    return {dict(p.attributes)["syscall"]: p.value for p in points_for(batch, metric, cgroup_id)}


def _collect(receiver):  # type: ignore[no-untyped-def]
    receiver.context.cgroups.refresh()
    return receiver.collect()


def test_the_kernel_classifies_new_cgroups_before_their_first_task() -> None:
    ctx = context("syscall", scope="kubepods")
    watch = cgroupwatch.acquire(ctx.cgroups, ctx.settings.bpf)
    assert watch is not None and watch.filtering
    try:
        added_before = watch.stats.added
        with cgroup_tree() as tree:
            pod = tree.pod()
            nested = tree.mkdir(str((pod.container_dir / "init" / "deeper").relative_to(cgroup2_root())))
            guaranteed = tree.pod(qos="guaranteed")  # no QoS level: kubepods.slice/kubepods-pod<uid>.slice
            kinds = watch.layouts.kind_values  # type: ignore[union-attr]
            # No walk since: every entry below was made by the mkdir handler in the kernel.
            watched = _watched(watch)
            assert watched[pod.pod_id] == (pod.pod_id, kinds["pod"])
            assert watched[pod.container_id] == (pod.container_id, kinds["container"])
            assert watched[pod.pod_dir.parent.stat().st_ino][1] == kinds["qos"]
            assert watched[guaranteed.pod_id] == (guaranteed.pod_id, kinds["pod"])
            assert watched[guaranteed.container_id] == (guaranteed.container_id, kinds["container"])
            assert nested.stat().st_ino not in watched
            assert nested.parent.stat().st_ino not in watched
            assert watch.stats.added == added_before
            v1_memory = mounts().v1.get("memory")
            free = [n for n in ("kubepods.slice", "kubepods") if v1_memory and not (Path(v1_memory) / n).exists()]
            if free:  # a v1 hierarchy's kubepods is none of ours (its root has hierarchy id > 0)
                with cgroup_tree(v1_memory) as v1:
                    v1_id = v1.mkdir(free[0]).stat().st_ino
                    assert v1_id not in _watched(watch)
            # Events: mkdirs of what is watched, nothing for nested cgroups.
            ctx.cgroups.refresh()
            ids = {pod.pod_id, pod.container_id, guaranteed.pod_id, guaranteed.container_id}
            assert ids <= ctx.cgroups.live_ids()
            container_id = pod.container_id
        ctx.cgroups.refresh()
        gone = {ref.id: ref for ref in ctx.cgroups.gone()}
        assert gone[container_id].path.endswith(pod.container_dir.name)
    finally:
        cgroupwatch.release(watch)


def test_kubernetes_modes_count_pods_only(tmp_path: Path) -> None:
    """The syscall workload once in a pod and once in a cgroup of no pod: only the pod's is
    counted.  It enters its first read (waiting for "go") before it is moved, outside any
    pod: in Kubernetes modes that call is not counted (no stamp at entry)."""
    binary = compile_c(SYSCALL_WORKLOAD_C, tmp_path, "workload")
    ctx = context("syscall", scope="kubepods")
    receiver = SyscallReceiver(ctx, SyscallConfig(tracked_syscalls=["read", "getppid"]))
    with cgroup_tree() as tree:
        receiver.start()
        try:
            assert receiver.watch is not None and receiver.watch.filtering
            pod = tree.pod()  # made after the start: classified by the kernel
            service = tree.mkdir(f"kpod-test-service-{os.getpid()}.service")
            for cgroup in (pod.container_dir, service):
                with started_syscall_workload(binary) as proc:
                    tree.move(proc.pid, cgroup)
                    finish_syscall_workload(proc)
            batch = _collect(receiver)
            assert _by_syscall(batch, "kpod.syscall.count", pod.container_id) == {
                "getppid": N_OK,
                "read": M_FAIL + Z_EOF,
            }
            assert _by_syscall(batch, "kpod.syscall.errors", pod.container_id)["read"] == M_FAIL
            # Nothing for the service, the root cgroup, or anything else outside pods.
            layout = receiver.loaded.layouts["sys_stats"]
            keys = {int(layout.key(k).cgroup_id) for k, _ in receiver.loaded.obj.maps["sys_stats"].lookup_batch()}
            assert service.stat().st_ino not in keys and 1 not in keys
            kinds = ctx.cgroups.kinds()
            assert all(kinds.get(k) in ("pod", "container") for k in keys), keys
        finally:
            receiver.shutdown()


NESTED = 1200
# Moves itself through the cgroups listed in argv[1] (one per line, read before "ready", while
# it is outside any pod) and makes each of the default tracked syscalls once in each: the
# move is openat + write + close of cgroup.procs, then read, connect, sendto, recvfrom,
# accept4, epoll_wait (epoll_pwait on arm64: glibc's epoll_wait) and futex.  Counted per
# cgroup, 1200 cgroups x 10 syscalls would be 12000 sys_stats keys: more than the default
# map (10240).  Then "done" (one more write), and it waits.
WANDER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
	static char paths[2000][1024];
	int n = 0, i, fd, ep, s, word = 0;
	struct sockaddr_in addr = { .sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK) };
	socklen_t len = sizeof(addr);
	struct epoll_event ev;
	char pid[32], c, buf[4];
	FILE *list = fopen(argv[1], "r");

	while (n < 2000 && list && fgets(paths[n], sizeof(paths[n]) - 16, list)) {
		paths[n][strcspn(paths[n], "\n")] = 0;
		strcat(paths[n++], "/cgroup.procs");
	}
	snprintf(pid, sizeof(pid), "%d", getpid());
	ep = epoll_create1(0);
	s = socket(AF_INET, SOCK_DGRAM, 0);
	if (!list || ep < 0 || s < 0 || bind(s, (struct sockaddr *)&addr, sizeof(addr)) ||
		getsockname(s, (struct sockaddr *)&addr, &len))
		return 2;
	if (write(1, "ready\n", 6) != 6 || read(0, &c, 1) != 1)  /* moved into the container meanwhile */
		return 3;
	for (i = 0; i < n; i++) {
		fd = open(paths[i], O_WRONLY);
		if (fd < 0 || write(fd, pid, strlen(pid)) < 0 || close(fd))
			return 4;
		if (read(-1, &c, 1) != -1 ||
			connect(s, (struct sockaddr *)&addr, sizeof(addr)) ||
			sendto(s, "x", 1, 0, NULL, 0) != 1 ||
			recvfrom(s, buf, sizeof(buf), 0, NULL, NULL) != 1 ||
			accept4(s, NULL, NULL, 0) != -1 ||
			epoll_wait(ep, &ev, 1, 0) != 0 ||
			syscall(SYS_futex, &word, FUTEX_WAKE, 1, NULL, NULL, 0) != 0)
			return 5;
	}
	if (write(1, "done\n", 5) != 5)
		return 6;
	(void)read(0, &c, 1);
	return 0;
}
"""


def test_nested_cgroups_take_no_entries_and_leave_room_for_others(tmp_path: Path) -> None:
    """1200 cgroups below one container (cgroup delegation), a process moving through them and
    making each default tracked syscall once in each, maps of the default size: the container
    takes one sys_stats entry per syscall and its switches one sched_cgroups entry, everything
    counted to the container; a pod started afterwards gets its series, and nothing failed to
    insert.  Counted per cgroup instead, the 12000 (cgroup, syscall) keys would not fit."""
    binary = compile_c(WANDER_C, tmp_path, "wander")
    ctx = context("syscall", scope="kubepods")
    assert ctx.settings.bpf.map_max_entries == 10240
    default = default_tracked()
    assert len(default) == 10
    syscalls = SyscallReceiver(ctx, SyscallConfig())
    sched = CpuSchedReceiver(Context("cpu_sched", ctx.settings, ctx.cgroups, SelfMetrics()), EmptyConfig())
    with cgroup_tree() as tree:
        syscalls.start()
        sched.start()
        wanderer: subprocess.Popen[bytes] | None = None
        try:
            assert syscalls.watch is not None and syscalls.watch.filtering
            pod = tree.pod()
            root = cgroup2_root()
            base = pod.container_dir.relative_to(root)
            wide = [tree.mkdir(f"{base}/delegated/n{i}") for i in range(NESTED - 25)]
            deep = [tree.mkdir(f"{base}/delegated/" + "/".join(f"d{j}" for j in range(i + 1))) for i in range(25)]
            listing = tmp_path / "cgroups"
            listing.write_text("".join(f"{p}\n" for p in [*wide, *deep]))
            wanderer = subprocess.Popen([str(binary), str(listing)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert wanderer.stdin is not None and wanderer.stdout is not None
            assert wanderer.stdout.readline() == b"ready\n"
            wait_blocked(wanderer.pid)
            tree.move(wanderer.pid, pod.container_dir)
            wanderer.stdin.write(b"g")
            wanderer.stdin.flush()
            if wanderer.stdout.readline() != b"done\n":
                pytest.fail(f"the wanderer failed: exit {wanderer.wait(10)}")
            later = tree.pod()
            with started_syscall_workload(compile_c(SYSCALL_WORKLOAD_C, tmp_path, "workload")) as proc:
                tree.move(proc.pid, later.container_dir)
                finish_syscall_workload(proc)
            batch = _collect(syscalls)
            # The read of "go" was entered outside any pod: not counted (no stamp at entry).
            expected = dict.fromkeys(default, NESTED)
            expected["write"] = NESTED + 1
            counts = _by_syscall(batch, "kpod.syscall.count", pod.container_id)
            assert {name: counts.get(name) for name in expected} == expected
            errors = _by_syscall(batch, "kpod.syscall.errors", pod.container_id)
            assert {name: v for name, v in errors.items() if v} == {"read": NESTED, "accept4": NESTED}
            assert _by_syscall(batch, "kpod.syscall.count", later.container_id)["read"] == M_FAIL + Z_EOF
            stats = syscalls.loaded.obj.maps["sys_stats"]
            layout = syscalls.loaded.layouts["sys_stats"]
            owners = [int(layout.key(k).cgroup_id) for k, _ in stats.lookup_batch()]
            # Only this test's cgroups: pods of another run on the host have entries of their own.
            ours = {p.stat().st_ino for p in tree.created}
            assert {o for o in owners if o in ours} == {pod.container_id, later.container_id}, owners
            assert owners.count(pod.container_id) == len(default)
            assert syscalls.loaded.error_counts()["sys_stats"] == 0
            switches = _collect(sched)
            assert points_for(switches, "kpod.cpu.context.switches", pod.container_id)
            nested_ids = {p.stat().st_ino for p in [*wide, *deep]}
            sched_keys = {int.from_bytes(k[:8], "little") for k in sched.loaded.obj.maps["sched_cgroups"].keys()}  # noqa: SIM118
            assert not sched_keys & nested_ids
            assert sched.loaded.error_counts()["sched_cgroups"] == 0
            assert not set(_watched(syscalls.watch)) & nested_ids, "nested cgroups took kpod_watched entries"
        finally:
            if wanderer is not None:
                wanderer.kill()
                wanderer.wait(10)
                for stream in (wanderer.stdin, wanderer.stdout):
                    if stream:
                        stream.close()
            sched.shutdown()
            syscalls.shutdown()


SHORT_LIVED = """
import os
for _ in range(7):
    os.getppid()
"""


def test_a_cgroup_created_used_and_removed_between_walks_is_reported() -> None:
    """Both modes: the container lives and dies between two walks; its counts are reported
    at the next one, under its path, flagged gone."""
    for scope in ("all", "kubepods"):
        ctx = context("syscall", scope=scope)
        receiver = SyscallReceiver(ctx, SyscallConfig(tracked_syscalls=["getppid"]))
        with cgroup_tree() as tree:
            receiver.start()
            try:
                pod = tree.pod()
                cid, path = pod.container_id, "/" + str(pod.container_dir.relative_to(cgroup2_root()))
                proc = subprocess.Popen(
                    [
                        "/bin/sh",
                        "-c",
                        f"echo $$ > {pod.container_dir}/cgroup.procs && exec {sys.executable} -c '{SHORT_LIVED}'",
                    ]
                )
                assert proc.wait(30) == 0
                deadline = time.monotonic() + 10
                while True:  # the exited task leaves the cgroup asynchronously
                    try:
                        pod.container_dir.rmdir()
                        break
                    except OSError:
                        assert time.monotonic() < deadline
                        time.sleep(0.01)
                tree.created.remove(pod.container_dir)
                assert cid not in ctx.cgroups.known_ids()  # never walked while it lived
                batch = _collect(receiver)
                (point,) = points_for(batch, "kpod.syscall.count", cid)
                assert point.value == 7, scope
                assert point.cgroup.gone and point.cgroup.path == path
            finally:
                receiver.shutdown()
