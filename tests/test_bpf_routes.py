"""The fallback routes for older kernels, taken for real on this one (kpod.bpf.force_routes).

Only kernels with the newer routes are at hand (6.18 here, 6.1 in the VMs), so the older
routes are forced and checked to be the ones loaded (map types and read-only flags as the
KERNEL reports them, not as Python set them), and that their clean-up works.  Whether they
count correctly is the ground-truth tests' job: `make test` runs test_bpf_receivers,
test_bpf_syscall and test_bpf_net again with KPOD_BPF_FORCE_ROUTES set, on the host and in
both 6.1 VMs.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from kernel_util import context, kernel_test
from kpod.receivers.cpu_sched import CpuSchedReceiver
from kpod.receivers.net_tcp import NetTcpConfig, NetTcpReceiver
from kpod.receivers.syscall import SyscallConfig, SyscallReceiver

from kpod.component import EmptyConfig
from kpod.config import ConfigError, load_config
from kpod.kernel import bpfinfo, libbpf, probes
from kpod.kernel.ebpf import BpfReceiver

pytestmark = kernel_test


def kernel_at_least(major: int, minor: int) -> bool:
    release = os.uname().release.split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def kernel_map(receiver: BpfReceiver, name: str) -> tuple[int, int]:
    """(type, max_entries) of a loaded map as the kernel reports it (bpf_map_info)."""
    assert receiver.loaded is not None
    info = bpfinfo.map_info(receiver.loaded.obj.maps[name].fd)
    return int(info.type), int(info.max_entries)


def rodata(receiver: BpfReceiver) -> bytes:
    """The object's read-only data as loaded in the kernel (the flags the verifier saw)."""
    assert receiver.loaded is not None
    (bpf_map,) = [m for n, m in receiver.loaded.obj.maps.items() if n.endswith(".rodata")]
    value = bpf_map.lookup(b"\0\0\0\0")
    assert value is not None
    return value


def test_probe_says_task_storage_works_from_tracing_programs_here() -> None:
    """Every kernel we have is 5.13+; the probe is what decides, and it agrees."""
    answer = probes.task_storage_in_tracing()
    if kernel_at_least(5, 13):
        assert answer is None, answer
    else:
        assert answer and "task-local storage" in answer


@pytest.mark.parametrize(
    ("receiver_class", "config", "stamps_map"),
    [(CpuSchedReceiver, EmptyConfig(), "sched_enqueued"), (SyscallReceiver, SyscallConfig(), "sys_start")],
    ids=["cpu_sched", "syscall"],
)
def test_stamps_route_is_what_the_kernel_loaded(receiver_class: type, config: object, stamps_map: str) -> None:
    routes = (([], libbpf.BPF_MAP_TYPE_TASK_STORAGE, 1), (["tid_hash"], libbpf.BPF_MAP_TYPE_HASH, 0))
    for force, expected_type, flag in routes:
        receiver = receiver_class(context(receiver_class.object_name, force_routes=force), config)
        receiver.start()
        try:
            map_type, max_entries = kernel_map(receiver, stamps_map)
            assert map_type == expected_type, (force, map_type)
            assert rodata(receiver)[0] == flag
            forget_program = "sched_forget" if stamps_map == "sched_enqueued" else "sys_forget"
            forget = {r.program: r for r in receiver.loaded.routes}[forget_program]
            assert forget.active == bool(force)  # the exit clean-up runs only on the hash route
            chosen = next(iter(receiver.choices().values()))
            assert chosen.startswith("tid hash (kpod.bpf.force_routes" if force else "task storage"), chosen
            if force:
                assert max_entries >= 16384
        finally:
            receiver.shutdown()


def test_tid_hash_forgets_a_thread_that_exits_inside_a_tracked_syscall() -> None:
    """exit_group never returns: its entry stamp would stay in the hash forever without the
    sched_process_exit clean-up (task storage is freed by the kernel instead)."""
    receiver = SyscallReceiver(
        context("syscall", force_routes=["tid_hash"]), SyscallConfig(tracked_syscalls=["exit_group", "read"])
    )
    receiver.start()
    try:
        stamps = receiver.loaded.obj.maps["sys_start"]
        pids = []
        for _ in range(20):
            proc = subprocess.Popen(["sleep", "0"])
            proc.wait(10)
            pids.append(proc.pid)
        time.sleep(0.2)
        left = {int.from_bytes(k, "little") for k in stamps.keys()}  # noqa: SIM118 (Map.keys() is a method, not a dict)
        assert not left & set(pids), "stamps of exited threads stay in the hash"
    finally:
        receiver.shutdown()


def test_sock_cgroup_val_route_is_what_the_kernel_loaded() -> None:
    for force, flag in (([], 0), (["sock_cgroup_val"], 1)):
        receiver = NetTcpReceiver(context("net_tcp", force_routes=force), NetTcpConfig(rtt=False))
        receiver.start()
        try:
            assert rodata(receiver)[0] == flag
            layout = receiver.choices()["socket cgroup"]
            assert ("pre-5.15" in layout) == (bool(force) or not kernel_at_least(5, 15)), layout
        finally:
            receiver.shutdown()


def test_kprobe_route_skips_fentry_and_fexit_programs() -> None:
    receiver = NetTcpReceiver(context("net_tcp", force_routes=["kprobe"]), NetTcpConfig(rtt=False))
    routes = {r.program: r for r in receiver.routes()}
    for program in ("tcp_sendmsg_exit", "tcp_sendpage_exit"):
        assert not routes[program].active and routes[program].reason == "kpod.bpf.force_routes: kprobe", routes
    assert not routes["tcp_recvmsg_exit"].active  # forced, or another signature (its reason then)


def test_unknown_forced_route_is_a_config_error(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kpod:\n  bpf: {force_routes: [tid_hash, fast]}\n")
    with pytest.raises(ConfigError, match=r"kpod.bpf.force_routes: unknown route.*fast"):
        load_config(str(path), environ={})
    path.write_text("kpod:\n  bpf: {force_routes: [tid_hash, sock_cgroup_val, kprobe]}\n")
    assert load_config(str(path), environ={}).kpod.bpf.force_routes == ["tid_hash", "sock_cgroup_val", "kprobe"]
