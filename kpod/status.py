"""What the agent knows about its own state: readiness, last cycles, receiver health.

Written by the pipeline, read by the HTTP endpoints (/readyz, /debug/status) and `check`.
"""

from __future__ import annotations

import threading
import time
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
        # Set by discovery: True while it works, with the time it last succeeded.
        self.discovery_ok = True
        self.discovery_failing_since = 0.0
        self.extra: dict[str, Any] = {}
        self.lock = threading.Lock()

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
        age = time.monotonic() - self.last_cycle_end_monotonic
        if age > 3 * self.poll_interval_s:
            return False, f"no collection cycle completed for {age:.0f}s (3 poll intervals)"
        return True, "ok"

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {
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
                        **({"details": r.details} if r.details else {}),
                    }
                    for rid, r in self.receivers.items()
                },
                **self.extra,
            }
