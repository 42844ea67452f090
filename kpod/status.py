"""What the agent knows about its own state: readiness, last cycles, receiver health.

Written by the pipeline, read by the HTTP endpoints (/readyz, /debug/status) and `check`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kpod import __version__


@dataclass
class ReceiverStatus:
    state: str = "pending"  # pending | running | unavailable | failing | disabled
    reason: str = ""
    route: str = ""
    last_collect_unix: float = 0.0
    last_duration_s: float = 0.0
    consecutive_failures: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    # The receiver's status() (routes, map fill...), called when /debug/status is read.
    details_source: Callable[[], dict[str, Any]] | None = field(default=None, repr=False, compare=False)

    def current_details(self) -> dict[str, Any]:
        if self.details_source is None:
            return self.details
        try:
            return {**self.details, **self.details_source()}
        except Exception as error:  # a debug page must not fail because one receiver does
            return {**self.details, "status_error": f"{type(error).__name__}: {error}"}


class AgentStatus:
    def __init__(self, profile: str = "", poll_interval_s: float = 30.0) -> None:
        self.version = __version__
        self.profile = profile
        self.poll_interval_s = poll_interval_s
        self.started_unix = time.time()
        self.first_cycle_done = threading.Event()
        self.last_cycle_end_monotonic = 0.0
        self.last_cycle_unix = 0.0
        self.cycles = 0
        self.receivers: dict[str, ReceiverStatus] = {}
        # Set by discovery (discovery_failed / discovery_recovered): False while it fails, with
        # the monotonic time the current run of failures began.
        self.discovery_ok = True
        self.discovery_failing_since = 0.0
        self.discovery_reason = ""
        # Not ready once discovery has failed for longer than this; 0 = discovery never
        # affects readiness (kpod.discovery.failure_window).
        self.discovery_failure_window_s = 0.0
        self.extra: dict[str, Any] = {}
        # More /debug/status sections, computed when the page is read: exporters' queues,
        # processors, BPF maps (name -> callable returning JSON-able data).
        self.sections: dict[str, Callable[[], Any]] = {}
        self.lock = threading.Lock()

    def discovery_failed(self, reason: str) -> None:
        with self.lock:
            if self.discovery_ok:
                self.discovery_ok = False
                self.discovery_failing_since = time.monotonic()
            self.discovery_reason = reason

    def discovery_recovered(self) -> None:
        with self.lock:
            self.discovery_ok = True
            self.discovery_failing_since = 0.0
            self.discovery_reason = ""

    def cycle_done(self) -> None:
        with self.lock:
            self.cycles += 1
            self.last_cycle_end_monotonic = time.monotonic()
            self.last_cycle_unix = time.time()
        self.first_cycle_done.set()

    def ready(self) -> tuple[bool, str]:
        """Ready once a cycle completed, and while cycles keep completing."""
        if not self.first_cycle_done.is_set():
            return False, "no collection cycle has completed yet"
        now = time.monotonic()
        age = now - self.last_cycle_end_monotonic
        if age > 3 * self.poll_interval_s:
            return False, f"no collection cycle completed for {age:.0f}s (3 poll intervals)"
        with self.lock:
            ok, since, reason = self.discovery_ok, self.discovery_failing_since, self.discovery_reason
        window = self.discovery_failure_window_s
        if not ok and window > 0 and now - since > window:
            return False, f"pod discovery failing for {now - since:.0f}s (more than {window:g}s): {reason}"
        return True, "ok"

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snapshot = {
                "version": self.version,
                "profile": self.profile,
                "started_unix": self.started_unix,
                "cycles": self.cycles,
                "last_cycle_unix": self.last_cycle_unix,
                "receivers": {
                    rid: {
                        "state": r.state,
                        "reason": r.reason,
                        "route": r.route,
                        "last_collect_unix": r.last_collect_unix,
                        "last_duration_seconds": r.last_duration_s,
                        "consecutive_failures": r.consecutive_failures,
                    }
                    for rid, r in self.receivers.items()
                },
                "discovery": {
                    "ok": self.discovery_ok,
                    "failing_for_seconds": (
                        time.monotonic() - self.discovery_failing_since if not self.discovery_ok else 0.0
                    ),
                    "reason": self.discovery_reason,
                    "failure_window_seconds": self.discovery_failure_window_s,
                },
                **self.extra,
            }
            receivers = list(self.receivers.items())
            sections = list(self.sections.items())
        # Outside the lock: these call into components (BPF map reads, exporter state).
        for rid, r in receivers:
            details = r.current_details()
            if details:
                snapshot["receivers"][rid]["details"] = details
        for name, source in sections:
            try:
                snapshot[name] = source()
            except Exception as error:
                logging.getLogger("kpod.status").debug("status section %s failed", name, exc_info=True)
                snapshot[name] = {"error": f"{type(error).__name__}: {error}"}
        snapshot["ready"], snapshot["ready_reason"] = self.ready()
        return snapshot
