"""The statfs worker process: `python -m kpod.fsprobe.worker DEADLINE SPAWN_AFTER MAX_STUCK_PER_POD`.

Reads requests (protocol.py) on stdin, writes answers on stdout (first an answer to id 0: ready),
exits when stdin closes.  It is the only place where a pod's path is looked up or measured (see
the package doc for why).

Requests are served by "lanes", threads that take one request at a time from per-pod queues
(pods in turn): one lane does all the work while calls return promptly.  The main thread
watches them: a request still running `spawn_after` seconds after it started gets the queue a
new lane (a slow mount delays the rest by that much, not more); one still running at
`deadline` is answered STUCK, and its pod counted stuck until the call returns (then a LATE
answer carries what it returned).  A pod has at most `max_stuck_per_pod` calls in flight; once
that many are stuck, its queued requests get STUCK_LIMIT without a call.  At MAX_LANES threads,
all stuck, every new request does.  Idle lanes beyond one end.

A CANCEL (request id 0) drops whatever is still queued: the agent sends it when a new cycle
begins with requests of the last one unanswered, so that a worker that fell behind serves the
current cycle, not stale ones.

Prints nothing, ever: stdout is the answer pipe and stderr is not read.  SIGINT is ignored (a
terminal's ^C goes to the agent, which ends this process by closing its stdin).
"""

from __future__ import annotations

import collections
import errno
import os
import select
import signal
import stat
import sys
import threading
import time

from kpod.fsprobe.protocol import (
    CANCEL_ID,
    CANCELLED,
    FAILED,
    LATE,
    MEASURED,
    NOT_A_DIRECTORY,
    NOT_THE_MOUNT,
    STUCK,
    STUCK_LIMIT,
    Answer,
    Request,
    decode_requests,
    encode_answer,
)
from kpod.kernel.inroot import mount_of, open_in_root

# Threads of this process at most: the bound on what hung mounts can cost the node (each stuck
# probe holds one thread: a kernel stack and a few pages of Python).
MAX_LANES = 256
_TICK_S = 0.005
# Lookup errors that mean "the path does not lead to that mount any more" (a symlink or '..' on
# the way, a directory missing or replaced in a filesystem mounted over it), not a failure.
_ELSEWHERE = frozenset({errno.ELOOP, errno.EXDEV, errno.ENOENT, errno.ENOTDIR})
_FLUSH_EVERY = 256  # answers (48 bytes each): well below a pipe's 64 KiB
_STACK_BYTES = 256 * 1024  # a lane needs little: a few frames and the syscalls


def measure(request: Request) -> Answer:
    """Look `request.mount_point` up inside the root, check it is the mount mountinfo names,
    statvfs it.  Never raises."""
    try:
        root = os.open(request.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = open_in_root(root, request.mount_point)
        except OSError as error:
            if error.errno in _ELSEWHERE:
                return Answer(request.id, NOT_THE_MOUNT, error.errno)
            raise
        finally:
            os.close(root)
        try:
            reached = mount_of(fd)
            if reached.mount_id is not None and request.mount_id:
                same = reached.mount_id == request.mount_id
            else:
                same = reached.dev == request.dev
            if not same:
                return Answer(request.id, NOT_THE_MOUNT)
            if not stat.S_ISDIR(reached.mode):
                return Answer(request.id, NOT_A_DIRECTORY)
            vfs = os.fstatvfs(fd)
            return Answer(request.id, MEASURED, 0, vfs.f_blocks, vfs.f_bfree, vfs.f_bavail, vfs.f_frsize)
        finally:
            os.close(fd)
    except OSError as error:
        return Answer(request.id, FAILED, error.errno or 0)


class _Lane:
    __slots__ = ("reported", "request", "started")

    def __init__(self) -> None:
        self.request: Request | None = None
        self.started = 0.0
        self.reported = False  # answered STUCK already


class Worker:
    def __init__(self, deadline_s: float, spawn_after_s: float, max_stuck_per_pod: int, out_fd: int = 1) -> None:
        self.deadline_s = deadline_s
        self.spawn_after_s = spawn_after_s
        self.max_stuck = max_stuck_per_pod
        self.out_fd = out_fd
        self.cond = threading.Condition()
        # Queued requests per pod, pods in turn: one pod's many mounts do not hold up the others.
        self.queues: collections.OrderedDict[int, collections.deque[Request]] = collections.OrderedDict()
        self.lanes: set[_Lane] = set()
        self.idle = 0
        self.running: collections.Counter[int] = collections.Counter()  # lanes busy per pod, stuck ones too
        self.stuck: collections.Counter[int] = collections.Counter()  # of those, answered STUCK
        self.out_lock = threading.Lock()
        self._out: list[bytes] = []

    def reply(self, answers: list[Answer], flush: bool = True) -> None:
        """Queue answers for the agent; write them out when `flush` or when many are waiting.
        Lanes do not flush (the main thread does, every tick): one write, one wake-up of the
        agent, per batch of prompt answers instead of one per answer."""
        with self.out_lock:
            self._out.extend(encode_answer(a) for a in answers)
            if self._out and (flush or len(self._out) >= _FLUSH_EVERY):
                view = memoryview(b"".join(self._out))
                self._out.clear()
                while view:
                    view = view[os.write(self.out_fd, view) :]

    def flush(self) -> None:
        self.reply([])

    # ------------------------------------------------------------------ lanes

    def _take(self, refused: list[Answer]) -> Request | None:
        """The next request a lane may run (under `cond`), or None.  A pod with `max_stuck`
        stuck requests has its queue answered STUCK_LIMIT; a pod with `max_stuck` requests
        running (slow, or stuck) waits: at most that many of its calls are ever in flight."""
        for group in list(self.queues):
            queue = self.queues[group]
            if self.stuck[group] >= self.max_stuck:
                refused.extend(Answer(r.id, STUCK_LIMIT) for r in queue)
                del self.queues[group]
                continue
            if self.running[group] >= self.max_stuck:
                continue
            request = queue.popleft()
            if queue:
                self.queues.move_to_end(group)
            else:
                del self.queues[group]
            self.running[group] += 1
            return request
        return None

    def _eligible(self) -> bool:
        return any(self.running[g] < self.max_stuck or self.stuck[g] >= self.max_stuck for g in self.queues)

    def _lane(self, lane: _Lane) -> None:
        while True:
            refused: list[Answer] = []
            with self.cond:
                request = self._take(refused)
                while request is None and not refused:
                    if self.idle >= 1:  # one idle lane is enough
                        self.lanes.discard(lane)
                        return
                    self.idle += 1
                    self.cond.wait()
                    self.idle -= 1
                    request = self._take(refused)
                if request is not None:
                    lane.request, lane.started, lane.reported = request, time.monotonic(), False
            if refused:  # at once: the main thread may have no tick left to write them
                self.reply(refused)
            if request is None:
                continue
            answer = measure(request)
            with self.cond:
                late = lane.reported
                # Queued while the lane still counts as busy: the main thread's next tick
                # (which it keeps ticking while a lane is busy) writes it out.  Written at once
                # when nothing else is queued (the agent is waiting for the last answers).
                answered = Answer(answer.id, answer.outcome | (LATE if late else 0), *_figures(answer))
                self.reply([answered], flush=late or not self.queues)
                lane.request = None
                self.running[request.group] -= 1
                if late:
                    self.stuck[request.group] -= 1
                if self.queues:
                    self.cond.notify_all()  # a pod that waited for this lane may go on

    def _spawn(self) -> None:
        lane = _Lane()
        self.lanes.add(lane)
        threading.Thread(target=self._lane, args=(lane,), daemon=True).start()

    # ------------------------------------------------------------------ main thread

    def submit(self, requests: list[Request]) -> None:
        refused: list[Answer] = []
        with self.cond:
            full = len(self.lanes) >= MAX_LANES and all(lane.reported for lane in self.lanes)
            for request in requests:
                if request.id == CANCEL_ID:  # the agent moved on: what waits is stale, drop it
                    refused.extend(Answer(r.id, CANCELLED) for queue in self.queues.values() for r in queue)
                    self.queues.clear()
                elif full:
                    refused.append(Answer(request.id, STUCK_LIMIT))
                else:
                    self.queues.setdefault(request.group, collections.deque()).append(request)
            if self.queues:
                if self.idle:
                    self.cond.notify_all()
                elif not self.lanes:
                    self._spawn()
        self.reply(refused, flush=False)

    def watch(self) -> bool:
        """Answer overdue requests STUCK, add a lane when queued work waits on slow calls.
        Returns whether anything is running or queued (the main loop then ticks)."""
        now = time.monotonic()
        stuck: list[Answer] = []
        with self.cond:
            busy = [lane for lane in self.lanes if lane.request is not None]
            for lane in busy:
                assert lane.request is not None
                if not lane.reported and now - lane.started >= self.deadline_s:
                    lane.reported = True
                    self.stuck[lane.request.group] += 1
                    stuck.append(Answer(lane.request.id, STUCK))
            if stuck:
                self.cond.notify_all()  # queues of pods now at their limit are answered
            slow = all(now - lane.started >= self.spawn_after_s for lane in busy)
            if self.queues and not self.idle and slow and len(self.lanes) < MAX_LANES and self._eligible():
                self._spawn()
            active = bool(busy or self.queues)
        self.reply(stuck)  # and what the lanes answered since the last tick
        return active

    def run(self, in_fd: int = 0) -> None:
        self.reply([Answer(0, MEASURED)])  # ready: the agent waits for this answer to id 0
        buffer = bytearray()
        active = False
        while True:
            ready, _, _ = select.select([in_fd], [], [], _TICK_S if active else None)
            if ready:
                data = os.read(in_fd, 65536)
                if not data:
                    return  # the agent closed the pipe (or is gone)
                buffer += data
                self.submit(decode_requests(buffer))
            active = self.watch()


def _figures(answer: Answer) -> tuple[int, int, int, int, int]:
    return answer.errno, answer.blocks, answer.bfree, answer.bavail, answer.frsize


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.stack_size(_STACK_BYTES)
    deadline, spawn_after, max_stuck = float(argv[0]), float(argv[1]), int(argv[2])
    Worker(deadline, spawn_after, max_stuck).run()


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except BaseException:  # nothing to print to: the agent sees the pipe close and says so
        os._exit(1)
    # os._exit: threads stuck in a hung mount must not hold up the exit of the others (and
    # interpreter shutdown must not wait for them).
    os._exit(0)
