"""Check the wheel `make wheel` built: it must carry every compiled BPF object and every package.

setuptools silently builds a wheel without package data that does not exist yet (an object
`make bpf` did not produce), and the image would then start with every eBPF receiver
unavailable; it also leaves out a subpackage that pyproject.toml's `packages` does not list.
This fails the build instead.  Usage: check_wheel.py DIST_DIR
"""

from __future__ import annotations

import glob
import os
import sys
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_objects(repo: str = REPO) -> set[str]:
    """kpod/bpf/<name>.bpf.o for every bpf/<name>.bpf.c of the source tree."""
    return {f"kpod/bpf/{os.path.basename(c)[:-2]}.o" for c in glob.glob(os.path.join(repo, "bpf", "*.bpf.c"))}


# Source folder -> where its modules live in the wheel (pyproject.toml's package-dir).
SOURCE_ROOTS = {
    "kpod": "kpod",
    "receivers": "kpod/receivers",
    "processors": "kpod/processors",
    "exporters": "kpod/exporters",
}


def expected_packages(repo: str = REPO) -> set[str]:
    """kpod/.../__init__.py for every package folder of the source tree."""
    found = set()
    for folder, target in SOURCE_ROOTS.items():
        for init in glob.glob(os.path.join(repo, folder, "**", "__init__.py"), recursive=True):
            relative = os.path.relpath(init, os.path.join(repo, folder))
            found.add(os.path.normpath(os.path.join(target, relative)))
    return found


def newest_wheel(dist: str) -> str:
    wheels = sorted(glob.glob(os.path.join(dist, "kpod_metrics-*.whl")), key=os.path.getmtime)
    if not wheels:
        raise SystemExit(f"check_wheel: no kpod_metrics-*.whl in {dist}")
    return wheels[-1]


def problems(wheel: str, repo: str = REPO) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    found = []
    missing = sorted(expected_objects(repo) - names)
    if missing:
        found.append(f"missing BPF objects: {', '.join(missing)}")
    missing_packages = sorted(expected_packages(repo) - names)
    if missing_packages:
        found.append(f"packages missing (pyproject.toml's packages): {', '.join(missing_packages)}")
    if "kpod/bpf/vmlinux.h" in names:
        found.append("kpod/bpf/vmlinux.h is in the wheel (build-time only, ~3 MB)")
    if not any(n.endswith("entry_points.txt") for n in names):
        found.append("no entry_points.txt: the built-in components would not be found")
    return found


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: check_wheel.py DIST_DIR", file=sys.stderr)
        return 2
    wheel = newest_wheel(argv[1])
    found = problems(wheel)
    for problem in found:
        print(f"check_wheel: {os.path.basename(wheel)}: {problem}", file=sys.stderr)
    if not found:
        print(f"{wheel}: {len(expected_objects())} BPF objects included")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
