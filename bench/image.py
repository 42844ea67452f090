"""The image: build times and sizes of `make image` (deploy/Dockerfile with podman, on the base
image made from Debian's packages).

    .venv/bin/python -m bench.image

Everything happens in a podman storage of its own (`--root`/`--runroot` under /var/tmp), removed
at the end: the machine's image storage, its base image included, is neither read nor changed,
so the base image is made here from scratch.  One after the other:

    base     `make base-image`: mmdebstrap of Debian bookworm with python3, then podman import
    cold     `make image` with an empty layer cache (the base image present)
    warm     `make image` again, nothing changed: every layer from the cache
    change   `make image` from a copy of the tree in which one Python file changed: the toolchain
             layer stays cached (the Dockerfile copies the Makefile alone first), `make bpf`,
             `make wheel` and the runtime stage's install run again

Sizes are podman's (`image inspect .Size`, decimal MB); the largest installed Python packages
are measured inside the agent image with `du`.  The build stage downloads clang and LLVM from
Debian and the runtime stage the Python dependencies from the package index, so the network
is part of every cold figure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from runc_pods import cgroup_mounts, remove_cgroup_dir  # test helpers live in tests/

from bench.sections import Measured, NotMeasured

REPO = Path(__file__).resolve().parents[1]
CONTAINERS_CONF = REPO / "deploy" / "podman" / "containers.conf"
BASE_IMAGE = "localhost/kpod-python-base:3.11-bookworm"
IMAGE = "localhost/kpod-metrics:bench"


@contextlib.contextmanager
def private_storage() -> Iterator[str]:
    """A podman command line whose storage is a fresh directory, removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="kpod-bench-image-", dir="/var/tmp"))
    run_root = Path(tempfile.mkdtemp(prefix="kpod-bench-image-run-", dir="/run"))
    podman = f"podman --root {root / 'storage'} --runroot {run_root}"
    try:
        yield podman
    finally:
        subprocess.run([*podman.split(), "rmi", "--all", "--force"], capture_output=True, env=_env(), check=False)
        subprocess.run([*podman.split(), "system", "prune", "--all", "--force"], capture_output=True, env=_env(),
                       check=False)  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(run_root, ignore_errors=True)


def _env() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def _make(directory: Path, podman: str, *targets: str) -> float:
    """Run make in `directory`; seconds it took.  A failure stops the benchmark with make's tail."""
    began = time.monotonic()
    result = subprocess.run(
        ["make", "--no-print-directory", "-C", str(directory), *targets, f"PODMAN={podman}", f"IMAGE={IMAGE}",
         f"IMAGE_BUILD_CGROUP=/kpod-bench-image-{os.getpid()}"],
        capture_output=True, text=True, env=_env(), check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"make {' '.join(targets)} failed: {(result.stdout + result.stderr)[-2000:]}")
    return time.monotonic() - began


def _size(podman: str, image: str) -> int:
    out = subprocess.run([*podman.split(), "image", "inspect", "--format", "{{.Size}}", image],
                         capture_output=True, text=True, env=_env(), check=True)  # fmt: skip
    return int(out.stdout.strip())


def _largest_packages(podman: str, count: int = 4) -> list[tuple[str, int]]:
    """(package directory, KiB) of the largest installed Python packages in the agent image."""
    parent = f"/kpod-bench-image-du-{os.getpid()}"
    try:
        out = subprocess.run(
            [*podman.split(), "run", "--rm", "--network=none", f"--cgroup-parent={parent}", "--entrypoint=sh",
             IMAGE, "-c", "du -sk /usr/local/lib/python3*/dist-packages/* | sort -n | tail -n " + str(count)],
            capture_output=True, text=True, env=_env(), check=True,
        )  # fmt: skip
    finally:
        for hierarchy in cgroup_mounts():
            remove_cgroup_dir(hierarchy / parent.lstrip("/"))
    found = []
    for line in reversed(out.stdout.splitlines()):
        kib, path = line.split(maxsplit=1)
        found.append((Path(path).name, int(kib)))
    return found


def _tree_copy(destination: Path) -> Path:
    """The tracked files of the repository (what a clean clone has), one Python file changed."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        source = REPO / name
        if source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    with open(destination / "kpod" / "__init__.py", "a") as handle:
        handle.write(f"# bench.image: a changed source file ({uuid.uuid4().hex})\n")
    return destination


def measure() -> Measured:
    if os.geteuid() != 0:
        raise NotMeasured("needs root (podman as root)")
    missing = [tool for tool in ("podman", "mmdebstrap", "make", "git") if shutil.which(tool) is None]
    if missing:
        raise NotMeasured(f"{', '.join(missing)} missing (make setup installs them)")
    with private_storage() as podman, tempfile.TemporaryDirectory(dir="/var/tmp") as scratch:
        base_s = _make(REPO, podman, "base-image")
        cold_s = _make(REPO, podman, "image")
        warm_s = _make(REPO, podman, "image")
        change_s = _make(_tree_copy(Path(scratch)), podman, "image")
        data: dict[str, Any] = {
            "base_s": base_s, "cold_s": cold_s, "warm_s": warm_s, "change_s": change_s,
            "base_bytes": _size(podman, BASE_IMAGE), "image_bytes": _size(podman, IMAGE),
            "packages_kib": _largest_packages(podman), "cpus": os.cpu_count(),
        }  # fmt: skip
    return Measured(".venv/bin/python -m bench.image", data)


def render(data: dict[str, Any]) -> str:
    mb = lambda n: f"{n / 1e6:.0f} MB"  # noqa: E731 - podman's unit
    packages = ", ".join(f"{name} {kib * 1024 / 1e6:.0f} MB" for name, kib in data["packages_kib"])
    return f"""## Image: `make image` (deploy/Dockerfile with podman, base image from Debian's packages)

| build (in a podman storage of its own) | seconds |
|---|---|
| base image, `make base-image` (mmdebstrap of bookworm's python3, podman import) | {data["base_s"]:.0f} |
| agent image, cold (empty layer cache) | {data["cold_s"]:.0f} |
| agent image, nothing changed | {data["warm_s"]:.1f} |
| agent image, one Python file changed | {data["change_s"]:.0f} |

| image | size |
|---|---|
| base image | {mb(data["base_bytes"])} |
| agent image | {mb(data["image_bytes"])} |

Largest installed Python packages in the agent image: {packages}.
"""
