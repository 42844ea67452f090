"""The OTLP exporter: the sender thread that drains the snapshot queue.

How a snapshot travels (see the package doc): `export()` only puts the batch in the queue; the
sender thread encodes it, sends its requests oldest first, retries transient errors with capped
exponential backoff and jitter (RetryInfo / Retry-After honoured up to the cap), drops what a
permanent error rejects, logs each distinct error once and counts everything in self-metrics.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from typing import Any

from kpod.exporters.otlp.config import OtlpConfig, resolve_target
from kpod.exporters.otlp.encoding import Encoder
from kpod.exporters.otlp.queue import Snapshot, SnapshotQueue
from kpod.exporters.otlp.transport import GrpcTransport, HttpTransport, PartialSuccess, SendError

from kpod import __version__
from kpod.component import ComponentUnavailable, Context, Exporter
from kpod.model import Batch
from kpod.selfmetrics import (
    EXPORTER_DROPPED_POINTS,
    EXPORTER_DROPPED_POINTS_HELP,
    EXPORTER_FAILED_REQUESTS,
    EXPORTER_FAILED_REQUESTS_HELP,
    EXPORTER_QUEUE_BATCHES,
    EXPORTER_QUEUE_BATCHES_HELP,
    EXPORTER_SENT_POINTS,
    EXPORTER_SENT_POINTS_HELP,
    declare_exporter_metrics,
)

SERVICE_NAME = "kpod-metrics"
# How many distinct error messages are remembered for "log once" (bounded like everything else).
MAX_REMEMBERED_ERRORS = 64
# Shutdown must not hold the agent's exit (the agent has 5 s in total).
SHUTDOWN_JOIN_S = 2.0


class OtlpExporter(Exporter):
    def __init__(self, context: Context, config: OtlpConfig) -> None:
        super().__init__(context, config)
        self.config: OtlpConfig = config
        self.target = resolve_target(config)
        settings = context.settings
        self.interval_s = config.interval.seconds if config.interval else settings.poll_interval.seconds
        self._labels = (("exporter", self.id),)
        self._metrics = context.self_metrics
        declare_exporter_metrics(self._metrics, self.id)
        self._queue = SnapshotQueue(config.queue_size)
        self._thread: threading.Thread | None = None
        self._transport: GrpcTransport | HttpTransport | None = None
        self._encoder: Encoder | None = None
        self._last_enqueued = 0.0
        self._logged: set[str] = set()
        # Consecutive transient failures and when the next attempt may go (monotonic).
        self._attempt = 0
        self._retry_at = 0.0
        # Counters mirrored in status() (the self-metrics hold the same numbers).
        self.sent_points = 0
        self.failed_requests = 0
        self.dropped_points = 0
        self.consecutive_failures = 0
        self.last_success_unix = 0.0
        self.last_error = ""
        self.next_retry_unix = 0.0

    # Lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        # The heavy imports happen here, only when an OTLP exporter is configured.
        transport_class = GrpcTransport if self.target.protocol == "grpc" else HttpTransport
        try:
            self._transport = transport_class(self.target, self.config)
        except (OSError, ssl.SSLError) as error:
            raise ComponentUnavailable(f"exporters.{self.id}: TLS setup failed: {error}") from None
        settings = self.context.settings
        base = {"service.name": SERVICE_NAME, "service.version": __version__, "host.name": socket.gethostname()}
        if settings.node_name:
            base["k8s.node.name"] = settings.node_name
        status = self.context.status
        start_ns = int(status.started_unix * 1e9) if status is not None else time.time_ns()
        self._encoder = Encoder(base, start_ns, self.config.max_batch_points, self.config.histograms)
        self._queue.open()
        self._thread = threading.Thread(target=self._run, name=f"otlp-{self.id}", daemon=True)
        self._thread.start()
        self.log.info(
            "sending to %s every %gs (queue %d batches)", self.target, self.interval_s, self.config.queue_size
        )

    def shutdown(self) -> None:
        if self._queue.stopping and self._thread is None:
            return
        left = self._queue.stop()
        if left:
            self._count_dropped(left)
        transport = self._transport
        if transport is not None:
            transport.close()  # cuts a request in progress
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(SHUTDOWN_JOIN_S)
        self._set_queue_gauge()

    # The collection loop's side: O(1), never blocks on the network -----------------------------

    def export(self, batch: Batch) -> None:
        now = time.monotonic()
        # 5 % slack: cycles are not exactly poll_interval apart.
        if self._last_enqueued and now - self._last_enqueued < 0.95 * self.interval_s:
            return
        self._last_enqueued = now
        dropped = self._queue.put(Snapshot(batch))
        if dropped is None:  # shutting down
            return
        if dropped:
            self._count_dropped(dropped)
        self._set_queue_gauge()

    def queue_batches(self) -> int:
        return self._queue.held()

    # The sender thread --------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.take()
            if item is None:
                return
            try:
                self._encode(item)
                self._deliver(item)
            except Exception:  # a bug must be visible, and must not end the sender
                self.log.exception("unexpected error while exporting; batch dropped")
                self._count_dropped(item.points)
            finally:
                self._queue.done()
                self._set_queue_gauge()

    def _encode(self, item: Snapshot) -> None:
        """Batch -> compressed requests, and let go of the batch's Point objects."""
        batch = item.batch
        if item.payloads is not None or batch is None:
            return
        assert self._encoder is not None
        item.payloads = self._encoder.payloads(batch)
        item.batch = None

    def _wait_backoff(self, item: Snapshot, delay: float) -> None:
        """Sleep until the retry, early on shutdown or when this batch is superseded; encode the
        batches that arrive meanwhile so that they are held compressed."""
        deadline = time.monotonic() + delay
        while (waiting := self._queue.wait(item, deadline)) is not None:
            self._encode(waiting)  # outside the queue's lock: export() stays O(1) meanwhile

    def _deliver(self, item: Snapshot) -> None:
        assert self._transport is not None and item.payloads is not None
        payloads = item.payloads
        for index, payload in enumerate(payloads):
            points = payload.points
            while True:
                if self._queue.gives_up(item):
                    self._count_dropped(sum(p.points for p in payloads[index:]))
                    return
                # The backoff belongs to the collector, not to a batch: the next batch (after
                # this one was superseded) waits it out too, or a full queue would mean one
                # attempt per arriving snapshot.
                wait = self._retry_at - time.monotonic()
                if wait > 0:
                    self._wait_backoff(item, wait)
                    continue
                try:
                    self._transport.send(payload, self.config.timeout.seconds)
                except PartialSuccess as partial:
                    self._succeeded(points - partial.rejected)  # resets the backoff too
                    self._count_dropped(partial.rejected)
                    self._log_once(
                        logging.WARNING, f"partial:{partial.message}",
                        "%s rejected %d of %d points: %s", self.target, partial.rejected, points, partial.message,
                    )
                    break
                except SendError as error:
                    self._failed(str(error))
                    if error.permanent:
                        self._attempt, self._retry_at = 0, 0.0  # it answered: reachable
                        self._count_dropped(points)
                        self._log_once(
                            logging.ERROR, str(error),
                            "%s rejected a request (%s); its %d points are dropped, not retried",
                            self.target, error, points,
                        )
                        break
                    self._log_once(
                        logging.WARNING, str(error),
                        "%s: %s; retrying with backoff (queue: %d batches)", self.target, error, self._queue.held(),
                    )
                    delay = self._backoff(self._attempt, error.retry_after)
                    self._attempt += 1
                    self._retry_at = time.monotonic() + delay
                    self.next_retry_unix = time.time() + delay
                    continue
                self._succeeded(points)
                break

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = self.config.backoff_max.seconds
        base = min(cap, self.config.backoff_initial.seconds * 2**min(attempt, 30))
        # Jitter of +-20 %: exporters restarted together (a DaemonSet rollout) spread out.
        delay = min(cap, base * random.uniform(0.8, 1.2))
        if retry_after is not None:
            delay = max(delay, min(retry_after, cap))
        return delay

    # Accounting --------------------------------------------------------------------------------

    def _succeeded(self, points: int) -> None:
        self._attempt, self._retry_at, self.next_retry_unix = 0, 0.0, 0.0
        if self.consecutive_failures:
            self.log.info("%s reachable again after %d failed requests", self.target, self.consecutive_failures)
            # A later outage with the same message is worth a log line again.
            self._logged.clear()
        self.consecutive_failures = 0
        self.last_error = ""
        self.last_success_unix = time.time()
        self.sent_points += points
        self._metrics.inc(EXPORTER_SENT_POINTS, EXPORTER_SENT_POINTS_HELP, self._labels, points)

    def _failed(self, message: str) -> None:
        self.failed_requests += 1
        self.consecutive_failures += 1
        self.last_error = message
        self._metrics.inc(EXPORTER_FAILED_REQUESTS, EXPORTER_FAILED_REQUESTS_HELP, self._labels)

    def _count_dropped(self, points: int) -> None:
        if points <= 0:
            return
        self.dropped_points += points
        self._metrics.inc(EXPORTER_DROPPED_POINTS, EXPORTER_DROPPED_POINTS_HELP, self._labels, points)

    def _set_queue_gauge(self) -> None:
        self._metrics.set(EXPORTER_QUEUE_BATCHES, EXPORTER_QUEUE_BATCHES_HELP, self.queue_batches(), self._labels)

    def _log_once(self, level: int, key: str, message: str, *args: Any) -> None:
        """Each distinct error once (an outage would otherwise log every retry)."""
        if key in self._logged:
            self.log.debug(message, *args)
            return
        if len(self._logged) >= MAX_REMEMBERED_ERRORS:
            self._logged.clear()
        self._logged.add(key)
        self.log.log(level, message, *args)

    def status(self) -> dict[str, Any]:
        return {
            "endpoint": str(self.target),
            "interval_seconds": self.interval_s,
            "queue_batches": self.queue_batches(),
            "queue_size": self.config.queue_size,
            "sending": self._queue.inflight is not None,
            "sent_points": self.sent_points,
            "failed_requests": self.failed_requests,
            "dropped_points": self.dropped_points,
            "consecutive_failures": self.consecutive_failures,
            "last_success_unix": self.last_success_unix,
            "last_error": self.last_error,
            "next_retry_unix": self.next_retry_unix,
        }
