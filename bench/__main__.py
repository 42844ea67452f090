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

MODULES = [
    "bench.core",
    "bench.cgroup_receivers",
    "bench.bpf_cost",
    "bench.bpf_net_syscall",
    "bench.discovery_memory",
    "bench.otlp",
    "bench.soak",
]
OUTPUT = Path(__file__).resolve().parents[1] / "docs" / "PERFORMANCE.md"


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


def main() -> int:
    only = sys.argv[1:]
    sections: list[str] = []
    for name in MODULES:
        if only and name.split(".")[-1] not in only:
            continue
        print(f"running {name} ...", file=sys.stderr)
        began = time.monotonic()
        try:
            module = importlib.import_module(name)
            sections.append(module.report().strip())
        except Exception as error:  # report it and go on: one broken bench must not hide the rest
            traceback.print_exc()
            sections.append(f"## {name}\n\nDid not run: {type(error).__name__}: {error}")
        print(f"  {name}: {time.monotonic() - began:.1f}s", file=sys.stderr)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    header = f"""# Performance

Written by `make bench` (`.venv/bin/python -m bench`); every figure below comes from that one run,
measured side by side on one machine. Figures are medians or ratios; targets are from the issues.
Where a figure misses its target the table says so.

- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}
- Machine: {machine()}
- Commit: {commit or 'unknown'}
"""
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(header + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
