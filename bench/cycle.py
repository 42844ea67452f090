"""Cycle profile: where one collection cycle's CPU goes, by receiver and by step, against the
floor of reading the same files.

    .venv/bin/python -m bench.cycle [--pods 110] [--cycles 20] [--rounds 2] [--baseline DIR] [--write]

The node is bench/scale.py's (real kubepods-shaped cgroups with a live process per container,
pods served by tests/fake_apiserver.py, informer mode, comprehensive profile).  The agent runs
in a child process per round (bench/cycle_worker.py, which says what it measures); with
`--baseline DIR` (a worktree of an older commit, set up with `make setup`) the rounds alternate
between that tree and this one on the same node, so before and after come from one run.

The floor is what reading the cycle's files costs without any parsing: open, read to EOF and
close of exactly the paths the cycle opened (as many times as it opened them), in a tight
loop of os calls.  Every cycle figure is also given as its ratio to that floor.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench import sections
from bench.scale import NODE, _Node
from bench.sections import Measured, NotMeasured

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from agent_proc import full_profile  # noqa: E402
from fake_apiserver import FakeApiServer  # noqa: E402

PODS = 110
CYCLES = 20
ROUNDS = 2
WORKER = Path(__file__).resolve().with_name("cycle_worker.py")


def _config(workdir: Path, kubeconfig: str, root: str, mode: str) -> Path:
    path = workdir / f"config-{mode}.yaml"
    discovery = "{mode: informer}" if mode == "informer" else "{mode: kubelet}"
    path.write_text(
        f"kpod: {{profile: {full_profile()}, poll_interval: 1s, node_name: {NODE}, discovery: {discovery},"
        f" cgroup: {{root: {root}}}, filter: {{exclude_namespaces: []}}}}\n"
        f"processors:\n  k8sattributes: {{kubeconfig: '{kubeconfig}'}}\n"
        "exporters:\n  prometheus: {endpoint: '127.0.0.1:0'}\n"
    )
    return path


def _profile(tree: Path, config: Path, pods: int, cycles: int, workdir: Path) -> dict[str, Any]:
    out = workdir / f"profile-{os.getpid()}-{len(list(workdir.glob('profile-*')))}.json"
    python = tree / ".venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KPOD_") and k != "KUBERNETES_SERVICE_HOST"}
    result = subprocess.run(
        [str(python), str(WORKER), str(config), str(pods), str(cycles), str(out)],
        cwd=tree, env=env, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    if result.returncode != 0 or not out.exists():
        raise RuntimeError(f"profile of {tree} exited {result.returncode}:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def _commit_of(tree: Path) -> str:
    return subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()


def run(pods: int, cycles: int, rounds: int, baseline: Path | None, log=print) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    trees = [("this", REPO)] + ([("baseline", baseline)] if baseline else [])
    workdir = Path(tempfile.mkdtemp(prefix="kpod-cycle-"))
    api = FakeApiServer().start()
    node: _Node | None = None
    profiles: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in trees}
    loads: list[float] = [os.getloadavg()[0]]
    try:
        node = _Node(api)
        node.grow(pods)
        kubeconfig = api.write_kubeconfig(str(workdir / "kubeconfig"))
        config = _config(workdir, kubeconfig, str(node.root), "informer")
        for number in range(rounds):
            for name, tree in trees if number % 2 == 0 else list(reversed(trees)):
                log(f"round {number + 1}: {name} ({tree}) ...")
                profiles[name].append(_profile(tree, config, pods, cycles, workdir))
                loads.append(os.getloadavg()[0])
    finally:
        if node is not None:
            node.close()
        api.stop()
        for path in sorted(workdir.glob("*"), reverse=True):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            workdir.rmdir()
    return {
        "pods": pods,
        "containers": node.containers if node else 0,
        "cycles": cycles,
        "rounds": rounds,
        "trees": {name: {"commit": _commit_of(tree), "rounds": profiles[name]} for name, tree in trees},
        "loads": loads,
        "profile": full_profile(),
        "python": platform.python_version(),
    }


def _merged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One tree's rounds as one: medians over every cycle of every round."""
    steps = sorted({step for r in rounds for step in r["steps_ms"]})
    return {
        "cycle": statistics.median(v for r in rounds for v in r["cycle_cpu_ms"]),
        "serial": statistics.median(v for r in rounds for v in r["serial_cycle_cpu_ms"]),
        "steps": {s: statistics.median(r["steps_ms"].get(s, 0.0) for r in rounds) for s in steps},
        "floor": statistics.median(r["floor"]["total_ms"] for r in rounds),
        "floor_system": statistics.median(r["floor"]["system_ms"] for r in rounds),
        "floor_distinct": statistics.median(r["floor_distinct"]["total_ms"] for r in rounds),
        "floor_kept": statistics.median(r["floor_kept"]["total_ms"] for r in rounds if "floor_kept" in r)
        if any("floor_kept" in r for r in rounds)
        else None,
        "points": rounds[-1]["points"],
        "files": rounds[-1]["files_opened"],
        "distinct": rounds[-1]["files_distinct"],
        "by_reader": rounds[-1]["files_by_reader"],
        "shared": rounds[-1]["files_shared_by"],
        "rss": statistics.median(r["rss_mib"] for r in rounds),
        "fds": rounds[-1].get("fds_open"),
        "dirs": rounds[-1].get("dirs_kept"),
        "labelled": min(r["labelled_pods"] for r in rounds),
    }


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def render(data: dict[str, Any]) -> str:
    trees = {name: _merged(tree["rounds"]) for name, tree in data["trees"].items()}
    names = list(trees)
    head = " | ".join(f"{n} ({data['trees'][n]['commit']})" for n in names)
    this = trees["this"]
    floor = this["floor"]

    def row(label: str, values: list[float], ratio: bool = True) -> str:
        cells = " | ".join(f"{v:.2f}" + (f" ({v / floor:.1f}x)" if ratio and floor else "") for v in values)
        return f"| {label} | {cells} |"

    rows = [
        row("cycle, receivers as the tree's scheduler runs them", [t["cycle"] for t in trees.values()]),
        row("cycle, receivers one after another in the cycle's thread", [t["serial"] for t in trees.values()]),
    ]
    steps = sorted({s for t in trees.values() for s in t["steps"]}, key=lambda s: -this["steps"].get(s, 0.0))
    rows += [row(step, [t["steps"].get(step, 0.0) for t in trees.values()]) for step in steps]
    rows += [
        row("floor: open/read/close of the cycle's files", [t["floor"] for t in trees.values()]),
        row("floor, of which system CPU", [t["floor_system"] for t in trees.values()]),
        row("floor, each distinct file once", [t["floor_distinct"] for t in trees.values()]),
    ]
    if all(t["floor_kept"] is not None for t in trees.values()):
        rows.append(
            row("floor, pread at offset 0 on descriptors opened beforehand", [t["floor_kept"] for t in trees.values()])
        )
    counts = [
        f"| points per cycle | {' | '.join(str(t['points']) for t in trees.values())} |",
        f"| files opened per cycle | {' | '.join(str(t['files']) for t in trees.values())} |",
        f"| distinct files | {' | '.join(str(t['distinct']) for t in trees.values())} |",
        f"| pods labelled when timing began | {' | '.join(str(t['labelled']) for t in trees.values())} |",
        "| RSS of the profiled process at the end, MiB | "
        + " | ".join(f"{t['rss']:.1f}" for t in trees.values())
        + " |",
    ]
    if any(t["fds"] is not None for t in trees.values()):  # runs before these were kept lack them
        counts += [
            "| open descriptors of the profiled process at the end | "
            + " | ".join(_count(t["fds"]) for t in trees.values())
            + " |",
            "| of which cgroup directories kept for openat | "
            + " | ".join(_count(t["dirs"]) for t in trees.values())
            + " |",
        ]
    readers = ", ".join(f"{who} {n}" for who, n in this["by_reader"].items())
    shared = ", ".join(f"{who}: {n}" for who, n in this["shared"].items()) or "none"
    loads = ", ".join(f"{x:.1f}" for x in data["loads"])
    alternating = ", trees alternating" if len(names) > 1 else ""
    return f"""## Cycle profile: CPU per cycle by receiver and by step, against the floor of reading its files

- Node: {data["pods"]} pods, {data["containers"]} containers (bench/scale.py's node: real cgroups, a live
  process per container, the fake API server); informer mode, {data["profile"]} profile; the agent's
  pipeline in a child process per round (bench/cycle_worker.py), {data["cycles"]} threaded and
  {data["cycles"]} serial cycles interleaved per round, {data["rounds"]} rounds{alternating};
  Python {data["python"]}.  Load average at start and after each round: {loads}.
- Figures: CPU ms per cycle (process CPU around run_cycle; per step the CPU of the thread that ran
  it), medians; in brackets the ratio to this tree's floor.  The floor: os.open, os.read to EOF,
  os.close of exactly the paths the cycle opened, as often as it opened them (mean of passes).

| ms of CPU per cycle | {head} |
|---|{"---:|" * len(names)}
{chr(10).join(rows)}

| counts | {head} |
|---|{"---:|" * len(names)}
{chr(10).join(counts)}

Files opened per cycle by reader (this tree): {readers}.

Paths opened by more than one reader in a cycle (this tree), by readers: {shared}.
"""


def measure(pods: int = PODS, cycles: int = CYCLES, rounds: int = ROUNDS, baseline: Path | None = None) -> Measured:
    if os.geteuid() != 0:
        raise NotMeasured("needs root (creates cgroups, loads BPF programs)")
    baseline = baseline or sections.baseline_from_env()
    data = run(pods, cycles, rounds, baseline, log=lambda m: print(m, file=sys.stderr))
    command = ".venv/bin/python -m bench.cycle"
    if (pods, cycles, rounds) != (PODS, CYCLES, ROUNDS):
        command += f" --pods {pods} --cycles {cycles} --rounds {rounds}"
    if baseline:
        command += f" --baseline <worktree of {data['trees']['baseline']['commit']}>"
    return Measured(command, data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pods", type=int, default=PODS)
    parser.add_argument("--cycles", type=int, default=CYCLES)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--baseline", type=Path, help=f"a worktree of an older commit with its .venv (or ${sections.BASELINE_ENV})"
    )
    parser.add_argument("--write", action="store_true", help="keep the figures and write docs/perf/cycle.md")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        measured = measure(args.pods, args.cycles, args.rounds, args.baseline)
    except NotMeasured as reason:
        raise SystemExit(f"bench.cycle: {reason}") from None
    if args.write:
        print(sections.write("cycle", measured).read_text())
    else:
        print(render(measured.data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
