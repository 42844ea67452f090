"""The statfs worker and its client on ordinary directories (the hostile cases, a hung FUSE
mount and symlinked mount points, are in test_hostile_mounts.py)."""

from __future__ import annotations

import logging
import os
import resource
from pathlib import Path

from kpod.fsprobe import protocol
from kpod.fsprobe.client import Probe, StatfsProbes
from kpod.kernel.inroot import mount_of


def probe_of(path: Path, key: str) -> Probe:
    """A probe of `path` as a mount point inside "/" (the test's own root)."""
    fd = os.open(path, os.O_PATH)
    try:
        reached = mount_of(fd)
    finally:
        os.close(fd)
    assert reached.mount_id is not None
    return Probe(key, "pod", "/", str(path), reached.mount_id, reached.dev)


def test_protocol_round_trip_keeps_odd_paths() -> None:
    request = protocol.Request(7, "/proc/1/root", "/a b/\udce9\x1c\n", 42, (0, 61), 3)
    buffer = bytearray(protocol.encode_request(request) + protocol.encode_cancel())
    buffer += protocol.encode_request(request)[:5]  # half a frame stays for later
    assert protocol.decode_requests(buffer) == [request, protocol.Request(0, "", "", 0, (0, 0), 0)]
    assert len(buffer) == 5
    answer = protocol.Answer(7, protocol.MEASURED | protocol.LATE, 0, 10, 4, 3, 4096)
    answers = bytearray(protocol.encode_answer(answer) * 2)
    assert protocol.decode_answers(answers) == [answer, answer] and answers == b""


def test_a_cycle_that_ran_out_of_time_does_not_hold_up_the_next(tmp_path: Path) -> None:
    """Requests the agent gave up on are cancelled in the worker when the next cycle begins
    (CANCEL), and what was deferred goes first then: every probe measures, nothing leaks."""
    directories = [tmp_path / f"d{i}" for i in range(200)]
    for directory in directories:
        directory.mkdir()
    probes = [probe_of(d, d.name) for d in directories]
    client = StatfsProbes(logging.getLogger("test"), deadline_s=1.0, max_stuck_per_pod=4)
    client.start()
    try:
        first = client.measure(probes, budget_s=0.0, interval_s=1.0)
        assert {r.outcome for r in first.values()} == {"deferred"}
        second = client.measure(probes, budget_s=10.0, interval_s=1.0)
        assert {r.outcome for r in second.values()} == {"measured"}, {r.outcome for r in second.values()}
        vfs = os.statvfs(directories[0])
        blocks, _, _, frsize = second["d0"].vfs  # type: ignore[misc]
        assert (blocks, frsize) == (vfs.f_blocks, vfs.f_frsize)
        client.measure([], budget_s=0.5, interval_s=1.0)  # the last answers of the first cycle
        assert client._orphans == {} and client.pending == 0 and not client.stuck()
    finally:
        client.shutdown()


def test_a_lookup_that_leads_elsewhere_is_not_measured(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    good = probe_of(tmp_path / "real", "real")
    trap = Probe("link", "pod", "/", str(tmp_path / "link"), good.mount_id, good.dev)
    wrong_mount = Probe("other", "pod", "/", str(tmp_path / "real"), good.mount_id + 100000, good.dev)
    client = StatfsProbes(logging.getLogger("test"), deadline_s=1.0, max_stuck_per_pod=4)
    try:
        results = client.measure([good, trap, wrong_mount], budget_s=10.0, interval_s=1.0)
    finally:
        client.shutdown()
    assert {key: r.outcome for key, r in results.items()} == {
        "real": "measured", "link": "not_the_mount", "other": "not_the_mount"}  # fmt: skip


def test_a_worker_whose_pipes_are_numbered_past_fd_setsize_still_measures(tmp_path: Path) -> None:
    """The agent keeps a descriptor per cgroup directory and mount table: at a few hundred pods
    it holds more than 1024, and a worker started then gets pipes that select() refuses
    ("filedescriptor out of range").  Hold 1100 descriptors, then start and use a worker."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 2048
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), max(hard, wanted)))
    held: list[int] = []
    client = StatfsProbes(logging.getLogger("test"), deadline_s=1.0, max_stuck_per_pod=4)
    try:
        while not held or held[-1] < 1100:
            held.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        client.start()
        assert client._worker is not None and client._worker.from_worker > 1024, "the pipes must lie past 1024"
        results = client.measure([probe_of(tmp_path, "tmp")], budget_s=10.0, interval_s=1.0)
        assert results["tmp"].outcome == "measured", results
        assert results["tmp"].vfs is not None and results["tmp"].vfs[0] == os.statvfs(tmp_path).f_blocks
    finally:
        client.shutdown()
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
