"""The agent's side of the statfs worker: send a cycle's probes, collect the answers within a
budget, and remember which mounts are stuck (see the package doc).

`measure()` is called once per collection with every mount to measure; it never blocks longer
than its budget, whatever the worker or the mounts do.  A mount's state across cycles:

    measured ----(STUCK answer)----> pending ----(LATE answer)----> backing off ---(retry)--> measured
                                       (not probed again)              (strikes x interval)

What is stuck is per container mount (`Probe.key`), not per device: a pod that makes its own
path to a shared volume hang costs its own series only, and the others keep probing theirs.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import subprocess
import sys
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

from kpod.fsprobe import protocol

MAX_BACKOFF_STRIKES = 6  # 2^5 = 32 intervals at most between retries of a mount that hung
READY_TIMEOUT_S = 10.0
FRAME_GRACE_S = 1.0  # past the budget, time left to finish a request frame already begun


@dataclass(frozen=True, slots=True)
class Probe:
    key: Hashable  # what a stuck state belongs to: one mount of one container
    pod: str  # what stuck probes are counted per
    root: str  # <proc_root>/<pid>/root
    mount_point: str
    mount_id: int
    dev: tuple[int, int]


@dataclass(frozen=True, slots=True)
class Result:
    outcome: str  # measured | not_a_directory | not_the_mount | failed | stuck | stuck_limit | deferred
    vfs: tuple[int, int, int, int] | None = None  # f_blocks, f_bfree, f_bavail, f_frsize
    errno: int = 0


_OUTCOMES = {
    protocol.MEASURED: "measured", protocol.NOT_A_DIRECTORY: "not_a_directory",
    protocol.NOT_THE_MOUNT: "not_the_mount", protocol.FAILED: "failed", protocol.STUCK: "stuck",
    protocol.STUCK_LIMIT: "stuck_limit", protocol.CANCELLED: "deferred",
}  # fmt: skip


@dataclass
class _Stuck:
    pod: str
    mount_point: str
    since_unix: float
    strikes: int = 0
    pending: int | None = None  # the id of the probe still hanging, or None once it returned
    retry_at: float = 0.0  # monotonic; while backing off after the late answer


@dataclass
class _Worker:
    process: subprocess.Popen[bytes]
    to_worker: int
    from_worker: int
    inbox: bytearray = field(default_factory=bytearray)


class StatfsProbes:
    def __init__(self, log: logging.Logger, deadline_s: float, max_stuck_per_pod: int,
                 spawn_after_s: float = 0.02) -> None:  # fmt: skip
        self.log = log
        self.deadline_s = deadline_s
        self.spawn_after_s = min(spawn_after_s, deadline_s)
        self.max_stuck_per_pod = max_stuck_per_pod
        self._worker: _Worker | None = None
        self._next_id = 1
        self._pods: dict[str, int] = {}
        self._stuck: dict[Hashable, _Stuck] = {}
        self._pending: dict[int, Hashable] = {}  # probe id -> key, of probes answered STUCK
        self._orphans: dict[int, Probe] = {}  # probes of earlier cycles not answered in time
        self._deferred: set[Hashable] = set()  # keys the last cycle could not measure in time
        self.timeouts = 0  # probes that passed their deadline, since start
        self.restarts = 0
        self._interval_s = 30.0  # the backoff unit: the receiver's interval (measure() sets it)

    # ------------------------------------------------------------------ the worker process

    def start(self) -> None:
        """Start the worker.  Raises OSError (one line) when it cannot be started."""
        if self._worker is not None and self._worker.process.poll() is None:
            return
        args = [f"{self.deadline_s:g}", f"{self.spawn_after_s:g}", str(self.max_stuck_per_pod)]
        # The agent's own interpreter and its own module, by a literal argument list: no shell,
        # nothing from pod data or config in the command.  close_fds: the worker holds no fd of
        # the agent's but its two pipes (the agent's end of them closing is its signal to exit).
        process = subprocess.Popen([sys.executable, "-m", "kpod.fsprobe.worker", *args], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True)  # fmt: skip
        assert process.stdin is not None and process.stdout is not None
        to_worker, from_worker = process.stdin.fileno(), process.stdout.fileno()
        os.set_blocking(from_worker, False)
        os.set_blocking(to_worker, False)  # never block on a worker that does not read
        worker = _Worker(process, to_worker, from_worker)
        # Wait for its first answer (id 0): a cycle must not spend its budget on the start-up.
        until = time.monotonic() + READY_TIMEOUT_S
        while len(worker.inbox) < protocol.ANSWER_SIZE and time.monotonic() < until:
            _ready(from_worker, None, until - time.monotonic())
            try:
                data = os.read(from_worker, protocol.ANSWER_SIZE)
            except BlockingIOError:
                continue
            if not data:
                break
            worker.inbox += data
        ready = protocol.decode_answers(worker.inbox)
        if not ready or ready[0].id != 0:
            _stop(worker)
            raise OSError(errno.EIO, f"the statfs worker did not start within {READY_TIMEOUT_S:g}s")
        self._worker = worker

    def shutdown(self) -> None:
        """Close the worker's pipes and kill it; never wait on a thread stuck in a mount."""
        worker, self._worker = self._worker, None
        if worker is not None:
            _stop(worker)

    @property
    def worker_pid(self) -> int | None:
        return self._worker.process.pid if self._worker else None

    def _lost_worker(self, why: str) -> None:
        """The worker died (or its pipe broke): its pending probes will never answer."""
        worker, self._worker = self._worker, None
        if worker is not None:
            code = worker.process.poll()
            self.log.warning("statfs worker %d %s (exit %s); starting another", worker.process.pid, why, code)
            _stop(worker)
        now = time.monotonic()
        for key in self._pending.values():
            state = self._stuck.get(key)
            if state is not None:
                state.pending = None
                state.retry_at = now + self._backoff_s(state)
        self._pending.clear()
        self._orphans.clear()
        self.restarts += 1

    # ------------------------------------------------------------------ one cycle

    def measure(self, probes: list[Probe], budget_s: float, interval_s: float) -> dict[Hashable, Result]:
        """A result for every probe, within `budget_s`.  `interval_s`: the backoff unit."""
        began = time.monotonic()
        self._interval_s = interval_s
        if self._worker is None or self._worker.process.poll() is not None:
            if self._worker is not None:
                self._lost_worker("exited")
            try:
                self.start()
            except OSError as error:
                self.log.warning("cannot start the statfs worker: %s", error)
                return {p.key: Result("failed", errno=error.errno or 0) for p in probes}
        results: dict[Hashable, Result] = {}
        self._receive(results, {}, 0.0)  # late answers of earlier cycles first
        stuck_by_pod: dict[str, int] = {}
        for state in self._stuck.values():
            if state.pending is not None:
                stuck_by_pod[state.pod] = stuck_by_pod.get(state.pod, 0) + 1
        sending: list[Probe] = []
        for probe in probes:
            state = self._stuck.get(probe.key)
            if state is not None and (state.pending is not None or began < state.retry_at):
                results[probe.key] = Result("stuck")
            elif stuck_by_pod.get(probe.pod, 0) >= self.max_stuck_per_pod:
                results[probe.key] = Result("stuck_limit")
            else:
                sending.append(probe)
        # What the last cycle could not measure in time goes first: a worker slower than the
        # budget must not leave the same mounts unmeasured cycle after cycle.
        sending.sort(key=lambda p: p.key not in self._deferred)
        inflight: dict[int, Probe] = {}
        # Requests of earlier cycles still queued in the worker are stale: drop them first.
        frames: list[tuple[int, bytes]] = [(protocol.CANCEL_ID, protocol.encode_cancel())] if self._orphans else []
        for probe in sending:
            rid = self._next_id
            self._next_id += 1
            inflight[rid] = probe
            pod = self._pods.setdefault(probe.pod, len(self._pods) + 1)
            frame = protocol.request_frame(rid, probe.root, probe.mount_point, probe.mount_id, probe.dev, pod)
            frames.append((rid, frame))
        if frames:
            unsent = self._send(frames, inflight, results, began + budget_s)
            if unsent is None:
                return results
            for rid in unsent:  # never written: the worker does not know them (no orphan)
                results[inflight.pop(rid).key] = Result("deferred")
        self._receive(results, inflight, began + budget_s)
        for rid, probe in inflight.items():  # the worker did not answer in time (busy or gone)
            results[probe.key] = Result("deferred")
            self._orphans[rid] = probe  # its answer may still say STUCK: then it is pending
        self._deferred = {key for key, result in results.items() if result.outcome == "deferred"}
        # Forget what is over: mounts measured again, gone mounts that hang no thread.
        wanted = {p.key for p in probes}
        for key in [k for k, s in self._stuck.items() if s.pending is None and k not in wanted]:
            del self._stuck[key]
        return results

    def _send(
        self, frames: list[tuple[int, bytes]], inflight: dict[int, Probe], results: dict[Hashable, Result],
        until: float,
    ) -> list[int] | None:
        """Write the requests, reading answers meanwhile (the worker writes while we write).
        Past `until`, stop at the next frame boundary: the ids never written are returned (a
        frame begun is always finished, or the worker would read the next one askew).  None:
        the worker is gone."""
        assert self._worker is not None
        data = memoryview(b"".join(frame for _, frame in frames))
        ends: list[int] = []
        for _, frame in frames:
            ends.append((ends[-1] if ends else 0) + len(frame))
        written, next_frame = 0, 0
        while written < len(data):
            while next_frame < len(ends) and ends[next_frame] <= written:
                next_frame += 1
            at_boundary = next_frame == 0 or ends[next_frame - 1] == written
            now = time.monotonic()
            if now >= until and at_boundary:
                break
            if now >= until + FRAME_GRACE_S:  # the worker stopped reading mid-frame
                self._lost_worker("stopped reading its requests")
                for probe in inflight.values():
                    results[probe.key] = Result("failed", errno=errno.EPIPE)
                return None
            writable, readable = self._wait(max(0.0, until - now) if at_boundary else FRAME_GRACE_S, write=True)
            if readable:
                self._receive(results, inflight, 0.0)
            if writable:
                try:
                    written += os.write(self._worker.to_worker, data[written : written + 65536])
                except BlockingIOError:
                    continue
                except OSError:
                    self._lost_worker("closed its pipe")
                    for probe in inflight.values():
                        results[probe.key] = Result("failed", errno=errno.EPIPE)
                    return None
        return [rid for (rid, _), end in zip(frames, ends, strict=True) if end > written and rid in inflight]

    def _wait(self, timeout: float, write: bool = False) -> tuple[bool, bool]:
        assert self._worker is not None
        return _ready(self._worker.from_worker, self._worker.to_worker if write else None, timeout)

    def _receive(self, results: dict[Hashable, Result], inflight: dict[int, Probe], until: float) -> None:
        """Read answers until every in-flight probe has one or `until` (monotonic) passes; with
        until=0, only what is there already."""
        while self._worker is not None:
            try:
                data = os.read(self._worker.from_worker, 65536)
            except BlockingIOError:
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._lost_worker("closed its pipe")
                for probe in inflight.values():
                    results[probe.key] = Result("failed", errno=errno.EPIPE)
                inflight.clear()
                return
            if data:
                self._worker.inbox += data
                for answer in protocol.decode_answer_fields(self._worker.inbox):
                    self._answered(answer, inflight, results)
                continue
            left = until - time.monotonic()
            if not inflight or left <= 0:
                return
            self._wait(left)

    def _answered(self, answer: tuple[int, int, int, int, int, int, int], inflight: dict[int, Probe],
                  results: dict[Hashable, Result]) -> None:  # fmt: skip
        """One answer, as protocol.decode_answer_fields gives it (the fields of an Answer)."""
        rid, flagged, err, blocks, bfree, bavail, frsize = answer
        outcome = flagged & ~protocol.LATE
        if flagged & protocol.LATE:
            key = self._pending.pop(rid, None)
            state = self._stuck.get(key) if key is not None else None
            if state is not None:  # the hung call returned: retry after a backoff
                state.pending = None
                state.retry_at = time.monotonic() + self._backoff_s(state)
                self.log.info("statfs of %s returned after hanging; retrying in %.0fs", state.mount_point,
                              self._backoff_s(state))  # fmt: skip
            return
        probe = inflight.pop(rid, None)
        orphan = probe is None
        if orphan:
            probe = self._orphans.pop(rid, None)
            if probe is None:
                return
        name = _OUTCOMES.get(outcome, "failed")
        if name == "stuck":
            self.timeouts += 1
            state = self._stuck.get(probe.key)
            if state is None:
                state = self._stuck[probe.key] = _Stuck(probe.pod, probe.mount_point, time.time())
                self.log.warning("statfs of %s (pod cgroup %s) hangs: its series are dropped until it answers",
                                 probe.mount_point, probe.pod)  # fmt: skip
            state.pending = rid
            state.strikes = min(state.strikes + 1, MAX_BACKOFF_STRIKES)
            self._pending[rid] = probe.key
        elif probe.key in self._stuck and name != "stuck_limit":
            del self._stuck[probe.key]  # it answers again
        if orphan:
            return  # the answer of an earlier cycle: only its STUCK mattered (above)
        results[probe.key] = Result(name, (blocks, bfree, bavail, frsize) if name == "measured" else None, err)

    def _backoff_s(self, state: _Stuck) -> float:
        return self._interval_s * 2 ** max(0, state.strikes - 1)

    # ------------------------------------------------------------------ reporting

    def stuck(self) -> list[dict[str, object]]:
        """The stuck mounts, for /debug/status."""
        now = time.time()
        return [
            {"pod_cgroup": s.pod, "mount_point": s.mount_point, "stuck_for_seconds": round(now - s.since_unix, 1),
             "probe": "pending" if s.pending is not None else "returned, backing off", "strikes": s.strikes}
            for s in self._stuck.values()
        ]  # fmt: skip

    @property
    def pending(self) -> int:
        """Probes hanging in the worker now (one thread each)."""
        return len(self._pending)


def _stop(worker: _Worker) -> None:
    for stream in (worker.process.stdin, worker.process.stdout):
        with contextlib.suppress(OSError):
            stream.close()  # type: ignore[union-attr]
    with contextlib.suppress(OSError):
        worker.process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        worker.process.wait(0.2)  # reaped if it could die; a thread in D state keeps it (not the agent)


def _ready(read_fd: int, write_fd: int | None, timeout: float) -> tuple[bool, bool]:
    """(writable, readable) of the worker's pipes within `timeout` seconds.  poll(), not
    select(): the agent keeps a descriptor per cgroup directory and mount table, so on a busy
    node a worker started again gets pipes numbered past select()'s FD_SETSIZE (1024)."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    if write_fd is not None:
        poller.register(write_fd, select.POLLOUT)
    events = dict(poller.poll(max(0, math.ceil(timeout * 1000))))
    # A closed pipe reports POLLHUP/POLLERR: readable (the read says EOF) or writable (EPIPE).
    return bool(write_fd is not None and events.get(write_fd, 0)), bool(events.get(read_fd, 0))
