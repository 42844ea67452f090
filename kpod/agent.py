"""The agent process: build the pipeline from a config, run cycles until a signal, shut down.

SIGTERM and SIGINT end the loop; shutdown (BPF links and objects closed, the listener closed)
must complete within 5 s, and the process exits 0.
"""

from __future__ import annotations

import logging
import resource
import signal
import threading
import time
from types import FrameType
from typing import Any

# The one place the framework touches cgroup access: it builds the index that every component
# gets in its Context (tests/test_imports.py keeps it so).
from kpod import gcpolicy
from kpod.cgroup.index import CgroupIndex
from kpod.cgroup.keptfds import NOFILE_WANTED, default_limit, raise_nofile_limit
from kpod.cgroup.mounts import choose_hierarchy, read_mountinfo
from kpod.config import AgentConfig
from kpod.model import Batch
from kpod.pipeline import Pipeline

log = logging.getLogger("kpod.agent")


def build_cgroup_index(config: AgentConfig) -> CgroupIndex:
    # On a Kubernetes node the agent reports pods only; locally, every cgroup.
    local = config.kpod.discovery.mode == "local"
    tree = choose_hierarchy(config.kpod.cgroup.root, read_mountinfo(), pods_only=not local)
    return CgroupIndex(
        tree.root,
        scope="all" if local else "kubepods",
        mounts=tree.mounts,
        ebpf_unattributable=tree.ebpf_unattributable,
        gone_retention_s=config.kpod.cgroup.gone_retention.seconds,
    )


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        # Before the index and the receivers are built: each kind of kept descriptor takes a
        # share of the soft limit as it is when its owner is made (kpod.cgroup.keptfds).
        self.nofile_raised_from, self.nofile_refused = _raise_nofile_limit()
        self.cgroups = build_cgroup_index(config)
        self.pipeline = Pipeline(config, self.cgroups)
        self.pipeline.status.sections["open_files"] = self.open_files_status
        self.stop_event = threading.Event()

    def open_files_status(self) -> dict[str, Any]:
        """/debug/status: the descriptor limits and how many cgroup directories and files are
        kept open against their share (past it they are read by path: the slow path)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        reads = self.cgroups.reads
        return {
            "soft_limit": soft,
            "hard_limit": hard,
            "raised_from": self.nofile_raised_from,
            "raise_refused": self.nofile_refused,
            "kept_cgroup_directories": {"kept": reads.dirs.kept, "limit": reads.dirs.limit},
            "kept_cgroup_files": {"kept": reads.files.kept, "limit": reads.files.limit},
        }

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        if signum is not None:
            log.info("received %s, shutting down", signal.Signals(signum).name)
        self.stop_event.set()

    def run(self, max_cycles: int | None = None) -> None:
        """Run cycles every poll interval until stopped.  A cycle that overruns makes the next
        start late instead of overlapping (missed ticks are skipped, not queued)."""
        interval = self.config.kpod.poll_interval.seconds
        self.pipeline.start()
        try:
            cycles = 0
            next_start = time.monotonic()
            while not self.stop_event.is_set():
                began = time.monotonic()
                batch = self.pipeline.run_cycle()
                cycles += 1
                if cycles == 1:
                    self._log_first_cycle(batch, time.monotonic() - began)
                    gcpolicy.settle()  # started: what it holds now stays (kpod/gcpolicy.py)
                log.debug("cycle %d: %d points in %.3fs", cycles, len(batch), time.monotonic() - began)
                if max_cycles is not None and cycles >= max_cycles:
                    break
                next_start += interval
                now = time.monotonic()
                if next_start < now:  # overran: skip the ticks we missed
                    next_start = now + interval - ((now - next_start) % interval)
                self.stop_event.wait(next_start - now)
        finally:
            self.pipeline.shutdown()


    def _log_first_cycle(self, batch: Batch, seconds: float) -> None:
        """What the first cycle collected: a glance at the log tells whether the agent sees pods."""
        pods = {
            (labels.get("namespace", ""), labels["pod"])
            for point in batch.points
            if point.resource is not None
            for labels in (dict(point.resource.labels),)
            if labels.get("pod")
        }
        series = sum(1 for point in batch.points if point.cgroup is not None)
        running = sum(1 for r in self.pipeline.receivers if r.started)
        known = self.pipeline.pods_known()
        log.info(
            "first cycle: %d pods, %d series in %.2fs (%d of %d receivers running%s)",
            len(pods), series, seconds, running, len(self.pipeline.receivers),
            "" if known is None else f"; discovery knows {known} pods on this node",
        )  # fmt: skip


def _raise_nofile_limit() -> tuple[int | None, str]:
    """Raise the soft RLIMIT_NOFILE (kpod.cgroup.keptfds.raise_nofile_limit) and say so once:
    (the soft limit before, when it was raised; why it could not be, when refused)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        old, new = raise_nofile_limit()
    except OSError as error:
        reason = error.strerror or str(error)
        log.warning(
            "open files: cannot raise the soft RLIMIT_NOFILE from %d toward %d (hard %d): %s; cgroup directories, "
            "cgroup files and mount tables kept open across cycles stay at %d of each, the rest are read by path "
            "every cycle",
            soft, min(hard, NOFILE_WANTED), hard, reason, default_limit(),
        )  # fmt: skip
        return None, reason
    if new == old:
        return None, ""
    log.info(
        "open files: soft RLIMIT_NOFILE raised %d -> %d (hard %d): cgroup directories, cgroup files and mount "
        "tables kept open across cycles may take a quarter of it each (the limits in /debug/status)",
        old, new, hard,
    )  # fmt: skip
    return old, ""


def install_signal_handlers(agent: Agent) -> None:
    signal.signal(signal.SIGTERM, agent.request_stop)
    signal.signal(signal.SIGINT, agent.request_stop)

