"""Write the chart's Localhost seccomp profile (`make manifests`).

deploy/helm/kpod-metrics/files/seccomp/kpod-metrics.json is the default profile of
containers/common (what CRI-O and podman apply as RuntimeDefault, installed here by Debian's
golang-github-containers-common as /usr/share/containers/seccomp.json) with exactly one change:
`bpf` and `perf_event_open` are allowed.  That profile allows them only with CAP_SYS_ADMIN, so
the agent, which holds CAP_BPF and CAP_PERFMON instead, gets EPERM from both.  The kernel still
checks the capabilities: allowing the syscalls through the filter grants nothing by itself.

containerd >= 1.7 (and 1.6 since late 2022) and Docker >= 23 already allow both with CAP_BPF /
CAP_PERFMON; there RuntimeDefault is enough (docs/CAPABILITIES.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BASE = Path("/usr/share/containers/seccomp.json")
OUTPUT = REPO / "deploy" / "helm" / "kpod-metrics" / "files" / "seccomp" / "kpod-metrics.json"
ADDED = ("bpf", "perf_event_open")
COMMENT = (
    "kpod-metrics: load and attach its tracing programs. The kernel still requires CAP_BPF and "
    "CAP_PERFMON (or CAP_SYS_ADMIN); the runtime default allows these two syscalls only with CAP_SYS_ADMIN."
)


def with_bpf_allowed(base: dict[str, Any]) -> dict[str, Any]:
    """`base` with bpf and perf_event_open taken out of every rule and allowed by one rule of
    their own (a pure function: the test checks the shipped file against the installed base)."""
    profile = json.loads(json.dumps(base))
    rules = []
    for rule in profile["syscalls"]:
        names = [n for n in rule["names"] if n not in ADDED]
        if names:
            rules.append({**rule, "names": names})
    rules.append({"names": list(ADDED), "action": "SCMP_ACT_ALLOW", "args": [], "comment": COMMENT,
                  "includes": {}, "excludes": {}})  # fmt: skip
    profile["syscalls"] = rules
    return profile


def render(base_path: Path = BASE) -> str:
    try:
        base = json.loads(base_path.read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{base_path}: {error} (apt install golang-github-containers-common)") from None
    return json.dumps(with_bpf_allowed(base), indent=2) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, default=BASE, help=f"the runtime's default profile ({BASE})")
    args = parser.parse_args()
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    OUTPUT.write_text(render(args.base))
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
