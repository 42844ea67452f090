"""`make bench`: run every benchmark side by side in one run and rewrite docs/PERFORMANCE.md.

Each bench module exposes `report() -> str`, a markdown section with its command, figures and
targets.  A module that cannot run here (not root, no BTF, a tool missing) contributes a
section saying why instead of failing the whole report.
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

# module -> the section file under docs/perf/ that holds its latest figures.
MODULES = {
    "bench.core": "core.md",
    "bench.cgroup_receivers": "cgroup.md",
    "bench.bpf_cost": "bpf.md",
    "bench.bpf_net_syscall": "bpf_net_syscall.md",
    "bench.discovery_memory": "k8s.md",
    "bench.otlp": "otlp.md",
    "bench.soak": "soak.md",
    "bench.scale": "scale.md",
}
# Modules that are command-line programs writing their own section with --write FILE.
CLI_MODULES = {"bench.bpf_cost", "bench.cgroup_receivers"}
DOCS = Path(__file__).resolve().parents[1] / "docs"
OUTPUT = DOCS / "PERFORMANCE.md"


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


def run_module(name: str, section: Path) -> None:
    """Run one benchmark and write its section file, stamped with date and machine."""
    if name in CLI_MODULES:
        result = subprocess.run([sys.executable, "-m", name, "--write", str(section)], check=False)
        if not section.exists() or result.returncode not in (0, 1):  # 1: ran, a target was missed
            raise RuntimeError(f"{name} exited {result.returncode}")
        text = section.read_text()
    else:
        text = importlib.import_module(name).report()
    stamp = f"_Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}._"
    section.write_text(text.strip() + "\n\n" + stamp + "\n")


def main() -> int:
    """`python -m bench [name ...]`: run all benchmarks, or the named ones (core, soak, ...), or
    none with `--assemble`;
    PERFORMANCE.md is then assembled from every section file, so a partial run keeps the
    other sections' latest figures (each says when and where it was measured)."""
    only = sys.argv[1:]
    # `--assemble`: run nothing, rebuild PERFORMANCE.md from the section files as they are.
    assemble_only = only == ["--assemble"]
    (DOCS / "perf").mkdir(parents=True, exist_ok=True)
    for name, filename in MODULES.items():
        if assemble_only or (only and name.split(".")[-1] not in only):
            continue
        print(f"running {name} ...", file=sys.stderr)
        began = time.monotonic()
        section = DOCS / "perf" / filename
        try:
            run_module(name, section)
        except Exception as error:  # report it and go on: one broken bench must not hide the rest
            traceback.print_exc()
            section.write_text(f"## {name}\n\nDid not run: {type(error).__name__}: {error}\n")
        print(f"  {name}: {time.monotonic() - began:.1f}s", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = f"""# Performance

Written by `make bench` (`.venv/bin/python -m bench`, or `python -m bench core soak` for some).
Each section below is one benchmark module's latest run, with its command and figures; a line
at its end says when and on which machine it was measured. Figures are medians or ratios
measured side by side within that run; targets come from the issues, and a missed target is
marked as such.

- Assembled: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit or 'unknown'}
- Machine of this assembly: {machine()}
"""
    sections = []
    for filename in MODULES.values():
        path = DOCS / "perf" / filename
        if path.exists():
            sections.append(path.read_text().strip())
    OUTPUT.write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
