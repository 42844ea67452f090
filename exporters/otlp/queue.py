"""The OTLP exporter's queue: snapshots between the collection loop and the sender thread.

Bounded and drop-oldest: it holds at most `size` snapshots, the one being sent included.  When a
new snapshot arrives to a full queue the OLDEST goes (values are cumulative: the newest snapshot
carries everything the dropped one did except its timestamp); a snapshot the sender is retrying
is marked `abandoned` instead, and the sender counts what it had not delivered when it notices.
`put` is O(1) and never blocks on the network: the collection loop calls it.
"""

from __future__ import annotations

import collections
import threading
import time

from kpod.exporters.otlp.encoding import Payload

from kpod.model import Batch


class Snapshot:
    """One cycle's batch on its way: the batch until the sender encodes it, the requests after."""

    __slots__ = ("abandoned", "batch", "payloads", "points")

    def __init__(self, batch: Batch) -> None:
        self.batch: Batch | None = batch  # as export() got it; None once encoded
        self.points = len(batch)
        self.payloads: list[Payload] | None = None  # the encoded requests, once the sender got to it
        self.abandoned = False  # superseded while being retried: dropped at the next check


class SnapshotQueue:
    def __init__(self, size: int) -> None:
        self.size = size
        self._cond = threading.Condition()
        self._waiting: collections.deque[Snapshot] = collections.deque()
        self.inflight: Snapshot | None = None  # taken by the sender, not done yet
        self.stopping = False

    def open(self) -> None:
        with self._cond:
            self.stopping = False

    def _held(self) -> int:
        inflight = self.inflight
        return len(self._waiting) + (1 if inflight is not None and not inflight.abandoned else 0)

    def held(self) -> int:
        """Snapshots held, the one being sent included (unless it was abandoned)."""
        with self._cond:
            return self._held()

    def put(self, snapshot: Snapshot) -> int | None:
        """Queue a snapshot; returns the points of the snapshots it pushed out (None: stopping)."""
        dropped = 0
        with self._cond:
            if self.stopping:
                return None
            self._waiting.append(snapshot)
            while self._held() > self.size:
                inflight = self.inflight
                if inflight is not None and not inflight.abandoned:
                    # The snapshot being retried is the oldest: it goes first.
                    inflight.abandoned = True
                else:
                    dropped += self._waiting.popleft().points
            self._cond.notify_all()
        return dropped

    def take(self) -> Snapshot | None:
        """The oldest snapshot, once there is one (it becomes `inflight`); None when stopping."""
        with self._cond:
            while not self._waiting and not self.stopping:
                self._cond.wait()
            if self.stopping:
                self.inflight = None
                return None
            self.inflight = self._waiting.popleft()
            return self.inflight

    def done(self) -> None:
        with self._cond:
            self.inflight = None

    def gives_up(self, snapshot: Snapshot) -> bool:
        """True when the sender must stop sending `snapshot` (shutdown, or superseded)."""
        with self._cond:
            return self.stopping or snapshot.abandoned

    def wait(self, snapshot: Snapshot, deadline: float) -> Snapshot | None:
        """Wait until `deadline` (monotonic) while `snapshot` waits for its retry; return early
        with a waiting snapshot that is not encoded yet (the sender encodes it meanwhile), or
        None when the wait is over: deadline reached, shutdown, or `snapshot` superseded."""
        with self._cond:
            while True:
                remaining = deadline - time.monotonic()
                if self.stopping or snapshot.abandoned or remaining <= 0:
                    return None
                unencoded = next((s for s in self._waiting if s.payloads is None), None)
                if unencoded is not None:
                    return unencoded
                self._cond.wait(remaining)

    def stop(self) -> int:
        """Stop taking and putting; returns the points of the snapshots that were waiting."""
        with self._cond:
            self.stopping = True
            left = sum(s.points for s in self._waiting)
            self._waiting.clear()
            self._cond.notify_all()
        return left

    def snapshots(self) -> list[Snapshot]:
        """The waiting snapshots, oldest first (a copy: for measurements)."""
        with self._cond:
            return list(self._waiting)
