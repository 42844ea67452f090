"""One tree's agent, in this process, profiled cycle by cycle (run by bench/cycle.py).

    <tree>/.venv/bin/python <this file> CONFIG PODS CYCLES OUT.json     (cwd: the tree under test)

It imports only `kpod` (and the standard library), so the same file profiles any commit's
code: run with a tree's own interpreter and that tree as the working directory, `kpod`
resolves to that tree.  bench/cycle.py runs it for the current tree and, side by side, for a
baseline worktree of an older commit.

What it measures, all in CPU time (the machine is shared: wall clock is noise):
- per cycle: the process's CPU (time.process_time) around `Pipeline.run_cycle`;
- per step: the CPU of the thread that ran it (time.thread_time) for the cgroup refresh, each
  receiver's collect (in its own thread), each processor and each exporter; "other" is the
  cycle's CPU less these (thread start/join, self-metrics, the merge of batches);
- serial: the same cycles with the receivers' collects run one after another in the cycle's
  own thread (no thread per receiver), interleaved with threaded cycles;
- files: every path the cycle opens (a `sys.addaudithook` on "open", only in one extra cycle
  after the timed ones), by receiver, and every file it reads through a descriptor kept open
  (kpod.cgroup.kept: read again, not opened);
- floor: os.open / os.read (until EOF) / os.close of exactly those paths, in the order and
  number the cycle opened them, in a tight loop; its user and system CPU per pass; and the
  same paths each opened once beforehand and read with one pread at offset 0 per pass.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

CHUNK = 65536


def _timed(name: str, sink: dict[str, float], function: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        began = time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            sink[name] = sink.get(name, 0.0) + time.thread_time() - began

    return wrapper


class _InlineThread:
    """threading.Thread's part the pipeline uses, running the target at start()."""

    def __init__(self, target: Callable[..., Any], args: tuple[Any, ...] = (), **_: Any) -> None:
        self._target, self._args = target, args

    def start(self) -> None:
        self._target(*self._args)

    def join(self, timeout: float | None = None) -> None:
        pass

    def is_alive(self) -> bool:
        return False


def floor_pass(paths: list[str]) -> int:
    """Open, read to EOF and close every path once; bytes read (files that vanished: skipped)."""
    total = 0
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            while chunk := os.read(fd, CHUNK):
                total += len(chunk)
        except OSError:
            pass
        finally:
            os.close(fd)
    return total


def measure_floor_kept(paths: list[str], passes: int) -> dict[str, float]:
    """The floor without open and close: every path opened once beforehand, then per pass one
    pread at offset 0 of each (a seq_file prints the file afresh), as kpod.cgroup.kept reads."""
    fds = []
    for path in paths:
        try:
            fds.append(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            continue

    readable = []
    for fd in fds:  # the files a pread at 0 can read (all the cycle's are seq_files)
        try:
            os.pread(fd, CHUNK, 0)
        except OSError:
            continue
        readable.append(fd)
    try:
        before = os.times()
        for _ in range(passes):
            for fd in readable:
                os.pread(fd, CHUNK, 0)
        after = os.times()
    finally:
        for fd in fds:
            os.close(fd)
    return {
        "user_ms": (after.user - before.user) * 1000 / passes,
        "system_ms": (after.system - before.system) * 1000 / passes,
        "total_ms": (after.user - before.user + after.system - before.system) * 1000 / passes,
        "passes": passes,
    }


def _rss_kib() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure_floor(paths: list[str], passes: int) -> dict[str, float]:
    user, system = [], []
    floor_pass(paths)  # dentries warm, as they are for the agent
    for _ in range(passes):
        before = os.times()
        floor_pass(paths)
        after = os.times()
        user.append((after.user - before.user) * 1000)
        system.append((after.system - before.system) * 1000)
    # os.times has the kernel's tick resolution per pass: the mean over many passes is the figure.
    return {
        "user_ms": statistics.fmean(user),
        "system_ms": statistics.fmean(system),
        "total_ms": statistics.fmean(u + s for u, s in zip(user, system, strict=True)),
        "passes": passes,
    }


def _due_now(pipeline: Any) -> None:
    """Every receiver collects in the next cycle (the bench cycles faster than the poll)."""
    for running in pipeline.receivers:
        running.next_due = 0.0


def _pods_known(pipeline: Any) -> int:
    """Pods the k8sattributes processor knows (its status; older trees kept its store in extras)."""
    if hasattr(pipeline, "pods_known"):
        return pipeline.pods_known() or 0
    store = pipeline.extras.get("pods")
    return len(store) if store is not None else 0


def main(config_path: str, pods: int, cycles: int, out: str) -> None:
    import importlib
    import logging

    from kpod.agent import Agent
    from kpod.config import load_config

    logging.basicConfig(level=logging.WARNING)
    try:
        from kpod import allocator  # as `kpod-metrics run` does, before any thread starts
    except ImportError:
        pass  # an older tree: glibc's defaults, as its agent had them
    else:
        allocator.tune()
    agent = Agent(load_config(config_path))
    pipeline = agent.pipeline
    pipeline.start()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if _pods_known(pipeline) >= pods:
                break
            time.sleep(0.2)
        labelled = _pods_known(pipeline)
        for _ in range(3):  # BPF maps filled, caches warm
            _due_now(pipeline)
            pipeline.run_cycle()
            time.sleep(0.3)
        try:
            from kpod import gcpolicy  # as the agent's run loop does after its first cycle
        except ImportError:
            pass  # an older tree: the collector's defaults, as its agent had them
        else:
            gcpolicy.settle()

        steps: dict[str, float] = {}
        agent.cgroups.refresh = _timed("refresh", steps, agent.cgroups.refresh)  # type: ignore[method-assign]
        for running in pipeline.receivers:
            running.receiver.collect = _timed(f"receiver {running.id}", steps, running.receiver.collect)  # type: ignore[method-assign]
        for processor in pipeline.processors:
            processor.process = _timed(f"processor {processor.id}", steps, processor.process)  # type: ignore[method-assign]
        for exporter in pipeline.exporters:
            exporter.export = _timed(f"exporter {exporter.id}", steps, exporter.export)  # type: ignore[method-assign]

        per_step: dict[str, list[float]] = defaultdict(list)
        threaded: list[float] = []
        serial: list[float] = []
        points = 0
        # The module whose threads collect: kpod.scheduler here, kpod.pipeline in older trees.
        try:
            collecting = importlib.import_module("kpod.scheduler")
        except ImportError:
            collecting = importlib.import_module("kpod.pipeline")
        real_thread = collecting.threading.Thread
        for number in range(2 * cycles):
            inline = number % 2 == 1  # interleaved: threaded, serial, threaded, ...
            collecting.threading.Thread = _InlineThread if inline else real_thread
            steps.clear()
            _due_now(pipeline)
            began = time.process_time()
            batch = pipeline.run_cycle()
            spent = (time.process_time() - began) * 1000
            collecting.threading.Thread = real_thread
            points = len(batch)
            (serial if inline else threaded).append(spent)
            if not inline:
                for name, seconds in steps.items():
                    per_step[name].append(seconds * 1000)
                per_step["other"].append(spent - sum(steps.values()) * 1000)
            time.sleep(0.2)

        # One more cycle with an audit hook recording every file opened, and by whom.
        opened: list[tuple[str, str]] = []
        recording = threading.Event()
        inside_kept = threading.local()

        def reader() -> str:
            return threading.current_thread().name.removeprefix("collect-")

        def hook(event: str, args: tuple[Any, ...]) -> None:
            if event == "open" and recording.is_set() and isinstance(args[0], (str, bytes)):
                if getattr(inside_kept, "active", False):
                    return
                path = os.fsdecode(args[0])
                flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
                # Kept directories (O_PATH) are not files read; a relative path is a file opened
                # through one (openat), recorded with its full path below.
                if not flags & os.O_PATH and path.startswith("/"):
                    opened.append((reader(), path))

        dirs_class = getattr(importlib.import_module("kpod.cgroup.files"), "CgroupDirs", None)
        if dirs_class is not None:  # trees that open cgroup files through kept directories
            dirs_open = dirs_class.open

            def recorded_open(self: Any, path: str, flags: int) -> int | None:
                fd = dirs_open(self, path, flags)
                if fd is not None and recording.is_set() and not getattr(inside_kept, "active", False):
                    opened.append((reader(), path))
                return fd

            dirs_class.open = recorded_open

        try:  # trees that read cgroup stat files through descriptors kept open (kpod.cgroup.kept)
            kept_class = importlib.import_module("kpod.cgroup.kept").KeptFiles
        except ImportError:
            kept_class = None
        if kept_class is not None:
            kept_read = kept_class.read

            def recorded_read(self: Any, path: str) -> bytes:
                if not recording.is_set():
                    return kept_read(self, path)
                opened.append((reader(), path))
                inside_kept.active = True  # a kept file opened now is recorded here, not again
                try:
                    return kept_read(self, path)
                finally:
                    inside_kept.active = False

            kept_class.read = recorded_read

        sys.addaudithook(hook)
        _due_now(pipeline)
        recording.set()
        pipeline.run_cycle()
        recording.clear()
        paths = [path for _, path in opened]
        readers: dict[str, set[str]] = defaultdict(set)
        for who, path in opened:
            readers[path].add(who)
        shared = Counter(" + ".join(sorted(who)) for who in readers.values() if len(who) > 1)
        by_reader = Counter(who for who, _ in opened)
        floor = measure_floor(paths, passes=max(40, cycles * 2))
        distinct_floor = measure_floor(sorted(set(paths)), passes=max(40, cycles * 2))
        kept_floor = measure_floor_kept(paths, passes=max(40, cycles * 2))
        result = {
            "labelled_pods": labelled,
            "points": points,
            "cycles": cycles,
            "cycle_cpu_ms": threaded,
            "serial_cycle_cpu_ms": serial,
            "steps_ms": {name: statistics.median(values) for name, values in sorted(per_step.items())},
            "files_opened": len(paths),
            "files_distinct": len(set(paths)),
            "files_by_reader": dict(by_reader.most_common()),
            "files_shared_by": dict(shared.most_common()),
            "floor": floor,
            "floor_distinct": distinct_floor,
            "floor_kept": kept_floor,
            "rss_mib": _rss_kib() / 1024,
            # Descriptors: the process's, and the cgroup directories kept for openat (trees
            # that keep them: kpod.cgroup.dirs).
            "fds_open": len(os.listdir("/proc/self/fd")),
            "dirs_kept": getattr(getattr(agent.cgroups.reads, "dirs", None), "kept", None),
        }
    finally:
        pipeline.shutdown()
    with open(out, "w") as handle:
        json.dump(result, handle)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
