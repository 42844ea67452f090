"""When each receiver collects: its interval, retries with backoff, the cycle timeout.

Receivers only collect; scheduling is here (as the OpenTelemetry Collector keeps it in the
scraper controller, not in the scrapers).  A receiver that fails to start or to collect is
logged once per distinct reason, counted in kpod_collection_errors_total{receiver}, retried
with backoff (doubling, up to MAX_BACKOFF_CYCLES intervals), and never stops the others.

Receivers collect one after another in a collecting thread: the GIL serialises their Python
work anyway, and a thread per receiver cost more CPU than it overlapped (GIL hand-offs on every
read; docs/perf/cycle.md, threaded vs serial).  A receiver that holds its thread longer than
STALL_S (or a quarter of the timeout) is left to it, and a new thread takes the receivers
still waiting, so one that hangs delays the others by that much and no more.  One still
running at the cycle timeout is abandoned (and not started again until it returns) instead of
blocking the cycle or the agent's exit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kpod.component import ComponentUnavailable, Receiver
from kpod.model import Batch, Kind, MetricDef
from kpod.selfmetrics import SelfMetrics
from kpod.status import ReceiverStatus

if TYPE_CHECKING:
    from kpod.config import ComponentConfig

log = logging.getLogger("kpod.pipeline")

COLLECTION_ERRORS = "kpod.collection.errors"
COLLECTION_ERRORS_HELP = "Receiver start or collection failures, by receiver."
COLLECTION_DURATION = MetricDef(
    "kpod.collection.duration", Kind.GAUGE, "s", "Duration of the receiver's last collection.", ("receiver",)
)

MAX_BACKOFF_CYCLES = 32
# How long one receiver may hold the collecting thread before the receivers waiting behind it
# get a thread of their own (at most a quarter of the cycle timeout).
STALL_S = 0.1


@dataclass
class ScheduledReceiver:
    spec: ComponentConfig
    receiver: Receiver
    status: ReceiverStatus
    interval_s: float
    started: bool = False
    next_due: float = 0.0  # monotonic time of the next collection or start attempt
    busy: threading.Event = field(default_factory=threading.Event)
    last_batch: Batch | None = None
    last_error: str = ""

    @property
    def id(self) -> str:
        return self.spec.id


class Scheduler:
    def __init__(self, receivers: list[ScheduledReceiver], self_metrics: SelfMetrics) -> None:
        self.receivers = receivers
        self.self_metrics = self_metrics
        self_metrics.declare_counter(COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, ("receiver",))
        for running in receivers:
            # Present from the start at 0, so rate() works from the first error on.
            self_metrics.inc(COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, (("receiver", running.id),), 0)

    def start_all(self) -> None:
        for running in self.receivers:
            self._start(running)

    def _start(self, running: ScheduledReceiver) -> None:
        running.status.route = _safe_route(running.receiver)
        try:
            running.receiver.start()
        except ComponentUnavailable as error:
            self._failed(running, str(error), state="unavailable")
            return
        except Exception as error:  # a plugin's bug must not stop the agent
            self._failed(running, f"start failed: {type(error).__name__}: {error}", state="failing")
            return
        running.started = True
        running.status.state = "running"
        running.status.reason = ""
        running.status.route = _safe_route(running.receiver)
        running.status.consecutive_failures = 0
        running.next_due = 0.0
        log.info("receiver %s started (%s)", running.id, running.status.route or "no route info")

    def _failed(self, running: ScheduledReceiver, reason: str, state: str) -> None:
        status = running.status
        status.consecutive_failures += 1
        status.state = state
        status.reason = reason
        if reason != running.last_error:
            log.warning("receiver %s: %s", running.id, reason)
            running.last_error = reason
        self.self_metrics.inc(COLLECTION_ERRORS, COLLECTION_ERRORS_HELP, (("receiver", running.id),))
        backoff = min(2 ** (status.consecutive_failures - 1), MAX_BACKOFF_CYCLES)
        running.next_due = time.monotonic() + backoff * running.interval_s

    def collect_due(self, started: float, timeout_s: float) -> None:
        """Collect from every receiver due at `started` (monotonic), one after another in a
        collecting thread (see the module doc), until `timeout_s` after it; a receiver not
        started yet (or failed) is started first.  Never overlaps a receiver's previous
        collection."""
        waiting: deque[ScheduledReceiver] = deque()
        for running in self.receivers:
            if started < running.next_due or running.busy.is_set():
                continue
            if not running.started:
                self._start(running)
                if not running.started:
                    continue
            running.busy.set()
            waiting.append(running)
        if not waiting:
            return
        due = list(waiting)
        lock = threading.Lock()
        # Per collecting thread, the monotonic time its current receiver began.
        began: dict[threading.Thread, float] = {}

        def work() -> None:
            me = threading.current_thread()
            name = me.name
            try:
                while True:
                    with lock:
                        if not waiting:
                            began.pop(me, None)
                            return
                        running = waiting.popleft()
                        began[me] = time.monotonic()
                    me.name = f"collect-{running.id}"  # who reads what, in logs and profiles
                    self._collect_one(running)
            finally:
                me.name = name

        deadline = started + timeout_s
        stall = min(STALL_S, timeout_s / 4)
        threads: list[threading.Thread] = []

        def spawn() -> None:
            thread = threading.Thread(target=work, name="collect", daemon=True)
            with lock:
                began[thread] = time.monotonic()  # counted from now, before it runs
            threads.append(thread)
            thread.start()

        spawn()
        while True:
            now = time.monotonic()
            if now >= deadline:
                break
            with lock:
                stalled = bool(waiting) and all(now - since >= stall for since in began.values())
                earliest = min(began.values(), default=now)
            if stalled:
                spawn()  # every thread is held by one receiver: the waiting ones get another
                continue
            live = [t for t in threads if t.is_alive()]
            if not live:
                break
            wake = deadline if not waiting else min(deadline, earliest + stall)
            live[0].join(max(0.0, min(wake - now, stall)))
        with lock:
            never = list(waiting)
            waiting.clear()  # no thread starts another one after the deadline
        for running in due:
            if running.busy.is_set():
                # Abandoned, or never reached: a running one keeps `busy` set until it returns,
                # so it never runs twice at once.
                self._failed(running, f"collection timed out after {timeout_s:g}s", "failing")
                running.last_batch = None
                if running in never:
                    running.busy.clear()

    def _collect_one(self, running: ScheduledReceiver) -> None:
        began = time.monotonic()
        try:
            batch = running.receiver.collect()
        except Exception as error:
            reason = f"collect failed: {type(error).__name__}: {error}"
            self._failed(running, reason, "failing")
            running.last_batch = None
        else:
            now = time.monotonic()
            running.last_batch = batch
            running.status.last_duration_s = now - began
            running.status.last_collect_unix = time.time()
            running.status.state = "running"
            running.status.reason = ""
            running.status.consecutive_failures = 0
            running.last_error = ""
            running.next_due = began + running.interval_s - 0.05 * running.interval_s
        finally:
            running.busy.clear()

    def report_durations(self) -> None:
        """kpod_collection_duration_seconds{receiver} of every started receiver's last collection."""
        for running in self.receivers:
            if running.started:
                self.self_metrics.set(
                    COLLECTION_DURATION.name,
                    COLLECTION_DURATION.description,
                    running.status.last_duration_s,
                    (("receiver", running.id),),
                    unit="s",
                )


def _safe_route(receiver: Receiver) -> str:
    try:
        return receiver.route()
    except Exception as error:
        return f"unknown ({type(error).__name__}: {error})"
