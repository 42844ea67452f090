"""The agent's image, built by `make image` with a real engine (podman) and checked from inside.

The session's image (conftest `agent_image`) is deploy/Dockerfile built on the local base image
made from Debian's packages (no registry).  Checked, not assumed: it runs as uid 0; the agent
writes nothing to its root filesystem (a run on a writable root leaves `podman diff` empty but
for the mount points the engine makes, and a run on a read-only root works); the runtime stage
holds no compiler, no bpftool and no pip; `kpod-metrics --version` and `kpod-metrics check`
work inside it.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from engine import (
    BASE_IMAGE,
    CONTAINERS_CONF,
    BuiltImage,
    cgroup_parent,
    container_logs,
    engine_skip_reason,
    podman,
    remove_container,
    unique_name,
)

from kpod import __version__

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(engine_skip_reason() is not None, reason=engine_skip_reason() or "")]

# The capabilities and mounts the chart gives the agent (tests/test_container_chart.py derives
# them from the rendered chart; here only what running the agent at all needs).
AGENT_FLAGS = [
    "--network=none", "--pid=host", "--user=0:0", "--cap-drop=all",
    *(f"--cap-add=CAP_{c}" for c in ("BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH")),
    "--security-opt=no-new-privileges", "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
    "--volume=/proc:/host/proc:ro",
]  # fmt: skip
COMPILERS = ("clang", "gcc", "cc", "c++", "llvm-strip", "llc", "bpftool", "make", "ld", "as", "pip", "pip3")
BUILD_PACKAGES = ("clang", "llvm", "libbpf-dev", "bpftool", "gcc", "make", "libc6-dev", "build-essential")


def run_in_image(image: str, *args: str, entrypoint: str | None = None) -> str:
    entry = [f"--entrypoint={entrypoint}"] if entrypoint else []
    with cgroup_parent() as parent:
        return podman("run", "--rm", "--pull=never", "--network=none", f"--cgroup-parent={parent}", *entry, image,
                      *args).stdout  # fmt: skip


def test_makefile_and_tests_agree_on_the_base_image() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(rf"^BASE_IMAGE\s*\?=\s*{re.escape(BASE_IMAGE)}$", makefile, re.M)
    assert f"CONTAINERS_CONF ?= $(CURDIR)/{CONTAINERS_CONF.relative_to(REPO)}" in makefile


def test_image_runs_as_root_with_the_dockerfile_entrypoint(agent_image: BuiltImage) -> None:
    config = podman("image", "inspect", "--format", "{{json .Config}}", agent_image.name).stdout
    assert '"User":"0:0"' in config and '"Entrypoint":["kpod-metrics"]' in config, config
    assert run_in_image(agent_image.name, "-c", "id -u; id -g", entrypoint="sh").split() == ["0", "0"]
    version = run_in_image(agent_image.name, "--version")
    assert version == f"kpod-metrics {__version__}\n"


def test_runtime_stage_has_no_toolchain(agent_image: BuiltImage) -> None:
    script = (
        f"for t in {' '.join(COMPILERS)}; do command -v $t; done; "
        f"dpkg-query -W -f '${{Package}} ${{Status}}\\n' {' '.join(BUILD_PACKAGES)} 2>/dev/null | grep 'ok installed'; "
        "python3 -c 'import pip' 2>/dev/null && echo pip-module; "
        "dpkg-query -W -f '${Status}' libbpf1 | grep -q 'ok installed' && echo libbpf1; true"
    )
    found = run_in_image(agent_image.name, "-c", script, entrypoint="sh").split("\n")
    assert [line for line in found if line] == ["libbpf1"], f"toolchain pieces in the runtime image: {found}"


def test_agent_writes_nothing_to_its_root(agent_image: BuiltImage, tmp_path: Path) -> None:
    """Writable root: after several cycles of every receiver `podman diff` lists only what the
    engine itself made (mount points and the files it bind-mounts).  Read-only root: the same
    run succeeds and logs no write error."""
    config = tmp_path / "config.yaml"
    config.write_text(
        "kpod: {profile: comprehensive, poll_interval: 200ms, discovery: {mode: local},"
        " cgroup: {proc_root: /host/proc}}\n"
        "exporters: {prometheus: {endpoint: '127.0.0.1:9090'}}\n"
    )
    mount = f"--volume={tmp_path}:/etc/kpod-metrics:ro"
    args = ["run", "--config=/etc/kpod-metrics/config.yaml", "--cycles=5"]
    engine_made = {"/etc/kpod-metrics", "/host", "/host/proc", "/sys/fs/cgroup",
                   "/etc", "/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/run", "/run/.containerenv",
                   "/sys", "/sys/fs", "/sys/kernel", "/proc", "/dev"}  # fmt: skip
    for read_only in (False, True):
        name = unique_name("rootfs")
        flags = [*AGENT_FLAGS, mount, *(["--read-only", "--read-only-tmpfs=false"] if read_only else [])]
        with cgroup_parent() as parent:
            flags.append(f"--cgroup-parent={parent}")
            _run_agent_once(name, flags, agent_image.name, args, read_only, engine_made)


def _run_agent_once(name: str, flags: list[str], image: str, args: list[str], read_only: bool,
                    engine_made: set[str]) -> None:  # fmt: skip
    try:
        began = time.monotonic()
        result = podman("run", f"--name={name}", "--pull=never", *flags, image, *args, check=False, timeout=300)
        logs = container_logs(name)
        took = time.monotonic() - began
        assert result.returncode == 0, f"agent exited {result.returncode} after {took:.0f} s: {logs[-3000:]}"
        assert "Read-only file system" not in logs and "Traceback" not in logs, logs[-3000:]
        if not read_only:
            changed = {line.split(maxsplit=1)[1] for line in podman("diff", name).stdout.splitlines() if line}
            assert changed <= engine_made, f"the agent wrote to its root: {sorted(changed - engine_made)}"
    finally:
        remove_container(name)


def test_check_works_inside_the_image(agent_image: BuiltImage) -> None:
    with cgroup_parent() as parent:
        out = podman("run", "--rm", "--pull=never", *AGENT_FLAGS, "--read-only", "--read-only-tmpfs=false",
                     f"--cgroup-parent={parent}", agent_image.name, "check").stdout  # fmt: skip
    lines = dict(line.split(":", 1) for line in out.splitlines() if re.match(r"^[A-Za-z][A-Za-z0-9 ]*:", line))
    assert lines["BTF"].strip() == "yes"
    assert set(lines["capabilities"].split("(")[0].replace(",", " ").split()) == {
        "CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH"}  # fmt: skip
    receivers = re.findall(r"^  (\w+)\s+(ok|cannot run)", out, re.M)
    assert receivers and dict(receivers)["cgroup_cpu"] == "ok", out
