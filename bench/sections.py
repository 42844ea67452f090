"""The files `make bench` writes, and nothing else writes: one section per benchmark module.

A run of a module measures into a JSON-able dict (its raw figures), then:

- `docs/perf/data/<section>.json` keeps those figures with the run's stamp (run id, date, commit,
  machine, command), so the section can be rendered again without measuring;
- `docs/perf/<section>.md` is the module's `render(data)` of exactly those figures, under one
  line naming the run;
- `docs/PERFORMANCE.md` is `assemble()` of the section files (`python -m bench --assemble`).

Interpretation never goes into these files: it goes into hand-written readings,
`docs/perf/readings/<section>.md`, each naming the run id it discusses.  tests/test_perf_docs.py
checks that every section file is the rendering of its data and that PERFORMANCE.md is the
assembly of the sections.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PERF = DOCS / "perf"
OUTPUT = DOCS / "PERFORMANCE.md"

# section (the file stem under docs/perf/) -> the bench module that measures it, in report order.
SECTIONS: dict[str, str] = {
    "core": "bench.core",
    "cgroup": "bench.cgroup_receivers",
    "bpf": "bench.bpf_cost",
    "bpf_net_syscall": "bench.bpf_net_syscall",
    "bpf_routes": "bench.bpf_routes",
    "hist": "bench.hist_slot",
    "filter": "bench.filter_cost",
    "k8s": "bench.discovery_memory",
    "otlp": "bench.otlp",
    "soak": "bench.soak",
    "scale": "bench.scale",
    "cycle": "bench.cycle",
    "image": "bench.image",
    "series": "bench.series",
    "hostile": "bench.hostile",
}

# A section measured before its raw figures were kept carries this in its run line: it is the
# text that run printed, and only a new run (`make bench`) can replace it.
LEGACY_MARK = "as printed; its raw figures were not kept"

# `make bench KPOD_BENCH_BASELINE=<worktree of an older commit, set up with make setup>`: the
# benches that compare two trees (bench.scale, bench.cycle) measure that one beside this one,
# before and after in the same run.
BASELINE_ENV = "KPOD_BENCH_BASELINE"


def baseline_from_env() -> Path | None:
    value = os.environ.get(BASELINE_ENV, "")
    return Path(value) if value else None


class Measured(NamedTuple):
    """What one run of a module produced: the command that reproduces it and its raw figures."""

    command: str
    data: dict[str, Any]


class NotMeasured(Exception):
    """The module cannot run here (not root, a tool missing): the section says why."""


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{platform.node()}: Linux {platform.release()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs ({cpu}), {memory:.0f} GiB"
    )


def commit() -> str:
    """The checked-out commit; `+changes` when tracked code differs from it (docs/ excluded: a
    bench run rewrites docs/perf itself)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs")
    return head + ("+changes" if changed else "")


def new_run(section: str, command: str, when: float | None = None) -> dict[str, str]:
    """The stamp of a run that just finished: its id is the section and the minute it ended."""
    moment = time.gmtime(when)
    return {
        "id": f"{section}@{time.strftime('%Y-%m-%dT%H:%MZ', moment)}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", moment),
        "commit": commit(),
        "machine": machine(),
        "command": command,
    }


def run_line(run: dict[str, str]) -> str:
    return (
        f"_Run `{run['id']}`: measured {run['date']} at commit {run['commit']} on {run['machine']}; "
        f"command `{run['command']}`._"
    )


def render(section: str, record: dict[str, Any]) -> str:
    """The section file's text for a record {"run": stamp, "data": figures}: the module's
    rendering of the figures with the run line under its title."""
    data = record["data"]
    if "did_not_run" in data:
        body = f"## {section}\n\nDid not run: {data['did_not_run']}"
    else:
        body = importlib.import_module(SECTIONS[section]).render(data)
    title, _, rest = body.strip().partition("\n")
    return f"{title}\n\n{run_line(record['run'])}\n\n{rest.strip()}\n"


def write(section: str, measured: Measured | None, perf_dir: Path = PERF, error: str = "") -> Path:
    """Keep a run's figures and write its section; `measured` None: the run failed with `error`."""
    if measured is None:
        measured = Measured(f".venv/bin/python -m bench {section}", {"did_not_run": error})
    record = {"run": new_run(section, measured.command), "data": measured.data}
    data_dir = perf_dir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / f"{section}.json").write_text(json.dumps(record, indent=1) + "\n")
    path = perf_dir / f"{section}.md"
    try:
        text = render(section, record)
    except Exception as error:  # the figures are kept: fix render(), then `python -m bench --render`
        text = (
            f"## {section}\n\n{run_line(record['run'])}\n\nNot rendered: {type(error).__name__}: {error}; the "
            f"figures are in data/{section}.json (`python -m bench --render` after the fix).\n"
        )
    path.write_text(text)
    return path


def finish_main(
    section: str,
    run: Callable[[], Measured],
    show: Callable[[dict[str, Any]], str],
    write_section: bool,
    json_path: str | None,
) -> int:
    """The end of a module's main(): run it, keep its raw figures in `json_path` (or why it did
    not run), then write its section (`write_section`) or print what it measured."""
    try:
        measured = run()
    except NotMeasured as reason:
        if json_path:
            Path(json_path).write_text(json.dumps({"command": "", "data": {"did_not_run": str(reason)}}))
        raise SystemExit(str(reason)) from None
    if json_path:
        Path(json_path).write_text(json.dumps(measured._asdict()))
    print(write(section, measured).read_text() if write_section else show(measured.data))
    return 0


def rendered(section: str, perf_dir: Path = PERF) -> str | None:
    """The section rendered again from its kept figures; None for a section without them."""
    data = perf_dir / "data" / f"{section}.json"
    if not data.exists():
        return None
    return render(section, json.loads(data.read_text()))


def run_id(text: str) -> str:
    """The run id a section file names in its run line."""
    start = text.find("_Run `")
    if start < 0:
        return "unknown"
    return text[start + 6 : text.index("`", start + 6)]


def assemble(perf_dir: Path = PERF) -> str:
    """PERFORMANCE.md from the section files as they are: a function of them alone (no date, no
    machine of its own), so a test can tell whether anyone edited it by hand."""
    present = [(s, (perf_dir / f"{s}.md").read_text()) for s in SECTIONS if (perf_dir / f"{s}.md").exists()]
    rows = []
    for section, text in present:
        note = "-"
        reading = perf_dir / "readings" / f"{section}.md"
        if reading.exists():
            discussed = re.search(rf"`({re.escape(section)}@[^`]+)`", reading.read_text())
            note = f"[readings/{section}.md](perf/readings/{section}.md)" + (
                f" (of `{discussed[1]}`)" if discussed else ""
            )
        rows.append(f"| [{section}](perf/{section}.md) | `{run_id(text)}` | {note} |")
    header = "\n".join(
        [
            "# Performance",
            "",
            "Generated: `make bench` (`.venv/bin/python -m bench`, or `python -m bench core soak` for some",
            "sections) measures and writes each section file `docs/perf/<section>.md` with its raw figures",
            "in `docs/perf/data/`; `python -m bench --assemble` joins the section files into this one.",
            "Every section holds only what its run printed: figures, command, machine, date.  What the",
            "figures mean is written by hand in `docs/perf/readings/`, each reading naming the run it",
            "discusses.",
            "",
            "| section | run | reading |",
            "|---|---|---|",
            *rows,
        ]
    )
    return header + "\n\n" + "\n\n".join(text.strip() for _, text in present) + "\n"
