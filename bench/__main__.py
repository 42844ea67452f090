"""`make bench`: run every benchmark side by side in one run and rewrite docs/PERFORMANCE.md.

    .venv/bin/python -m bench                 every module, then the assembly
    .venv/bin/python -m bench core soak       those sections only (or their modules' names), then the assembly
    .venv/bin/python -m bench --assemble      no measuring: PERFORMANCE.md from the section files
    .venv/bin/python -m bench --render        no measuring: every section file from its kept figures

Each module exposes `measure() -> Measured` (its command and raw figures) and `render(data) -> str`;
bench/sections.py keeps the figures and writes the section (see there).  A module that cannot
run here (not root, no BTF, a tool missing) contributes a section saying why instead of failing
the whole report.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import sections
from bench.sections import SECTIONS, Measured, NotMeasured

# Modules that are command-line programs (their own process: a sysctl lock, real-time priority,
# an exit code for a missed target); they hand their figures back through --json.
CLI_MODULES = {"bench.bpf_cost", "bench.cgroup_receivers", "bench.filter_cost"}


def measure(module: str) -> Measured:
    if module not in CLI_MODULES:
        return importlib.import_module(module).measure()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "figures.json"
        result = subprocess.run([sys.executable, "-m", module, "--json", str(out)], check=False)
        if not out.exists():
            raise RuntimeError(f"{module} exited {result.returncode} without figures")
        kept = json.loads(out.read_text())
    if "did_not_run" in kept["data"]:
        raise NotMeasured(kept["data"]["did_not_run"])
    return Measured(kept["command"], kept["data"])


def main(argv: list[str] | None = None) -> int:
    # A section (core, cgroup, k8s, ...) or its module's name (cgroup_receivers, discovery_memory, ...).
    by_module = {module.rsplit(".", 1)[1]: section for section, module in SECTIONS.items()}
    only = [by_module.get(name, name) for name in (sys.argv[1:] if argv is None else argv)]
    unknown = [name for name in only if name not in SECTIONS and name not in ("--assemble", "--render")]
    if unknown:
        print(f"bench: no section {', '.join(unknown)} (sections: {', '.join(SECTIONS)})", file=sys.stderr)
        return 2
    if only == ["--render"]:
        for section in SECTIONS:
            text = sections.rendered(section)
            if text is not None:
                (sections.PERF / f"{section}.md").write_text(text)
    elif only != ["--assemble"]:
        sections.PERF.mkdir(parents=True, exist_ok=True)
        for section, module in SECTIONS.items():
            if only and section not in only:
                continue
            print(f"running {module} ...", file=sys.stderr)
            began = time.monotonic()
            try:
                sections.write(section, measure(module))
            except NotMeasured as reason:
                sections.write(section, None, error=str(reason))
            except Exception as error:  # report it and go on: one broken bench must not hide the rest
                traceback.print_exc()
                sections.write(section, None, error=f"{type(error).__name__}: {error}")
            print(f"  {module}: {time.monotonic() - began:.1f}s", file=sys.stderr)
    sections.OUTPUT.write_text(sections.assemble())
    print(f"wrote {sections.OUTPUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
