"""The image build, exercised without a Docker engine.

deploy/Dockerfile's build stage is a shell script around `make bpf` and `make wheel`; these
tests parse the Dockerfile, check what each stage does (and does not) contain, and run the
build stage's own RUN script on a copy of the build context, the way BuildKit would, then
install the wheel it produced into a fresh venv and run `kpod-metrics --version` from it.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import require_tools

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "deploy" / "Dockerfile"
DOCKERIGNORE = REPO / "deploy" / "Dockerfile.dockerignore"
RUNTIME_PACKAGES = {"libbpf1"}
COMPILERS = ("clang", "gcc", "llvm", "bpftool", "libbpf-dev", "build-essential", "make ")


@dataclass
class Stage:
    base: str
    name: str
    platform: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def runs(self) -> list[str]:
        return [arg for op, arg in self.instructions if op == "RUN"]

    def args(self, op: str) -> list[str]:
        return [arg for o, arg in self.instructions if o == op]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) of a Dockerfile: continuation lines joined, comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        op, _, arg = line.partition(" ")
        op = op.upper()
        if op == "FROM":
            words = arg.split()
            platform = next((w.split("=", 1)[1] for w in words if w.startswith("--platform=")), "")
            words = [w for w in words if not w.startswith("--")]
            base = re.sub(r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0])
            name = words[2] if len(words) > 2 and words[1].upper() == "AS" else ""
            stages.append(Stage(base, name, platform))
        elif not stages:
            if op == "ARG" and "=" in arg:
                key, value = arg.split("=", 1)
                global_args[key] = value
        else:
            stages[-1].instructions.append((op, arg))
    return global_args, stages


def _stages() -> dict[str, Stage]:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    return {stage.name: stage for stage in stages}


def makefile_targets() -> set[str]:
    targets = set()
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_./%-]+(?:\s+[A-Za-z0-9_./%-]+)*)\s*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def make_invocations(script: str) -> list[list[str]]:
    """The argument lists of every `make ...` command in a shell script."""
    found = []
    for command in re.split(r";|&&|\|\|", script):
        words = shlex.split(command)
        if words and words[0] == "make":
            found.append(words[1:])
    return found


# ----------------------------------------------------------------------------- structure


def test_parser_reads_stages_and_continuations() -> None:
    global_args, stages = parse_dockerfile(
        "ARG BASE=debian:12\nFROM --platform=$BUILDPLATFORM ${BASE} AS b\nRUN a \\\n  # note\n  && b\nFROM b\n"
    )
    assert global_args == {"BASE": "debian:12"}
    assert [(s.base, s.name, s.platform) for s in stages] == [("debian:12", "b", "$BUILDPLATFORM"), ("b", "", "")]
    assert stages[0].runs() == ["a  && b"]


def test_stages_are_build_then_runtime() -> None:
    stages = _stages()
    assert list(stages) == ["build", "runtime"]
    assert stages["build"].platform == "$BUILDPLATFORM", "the BPF objects are cross-compiled, never emulated"
    assert stages["runtime"].base == "python:3.11-slim-bookworm"
    assert stages["build"].base == stages["runtime"].base, "the wheel is built by the interpreter that runs it"


def test_build_stage_calls_the_ci_make_targets() -> None:
    build = _stages()["build"]
    calls = [words for script in build.runs() for words in make_invocations(script)]
    targets = {word for words in calls for word in words if "=" not in word}
    assert {"system-packages", "bpf", "wheel"} <= targets
    assert targets <= makefile_targets(), f"Dockerfile calls make targets the Makefile lacks: {targets}"
    # The wheel target also runs scripts/check_wheel.py: a wheel without objects fails the build.
    assert "check_wheel.py" in (REPO / "Makefile").read_text().split("\nwheel:", 1)[1].split("\n\n", 1)[0]


def test_runtime_stage_has_only_libbpf_and_the_wheel() -> None:
    runtime = _stages()["runtime"]
    scripts = " ".join(runtime.runs())
    installed = set()
    for match in re.finditer(r"apt-get install ([^&;]+)", scripts):
        installed.update(w for w in match.group(1).split() if not w.startswith("-"))
    assert installed == RUNTIME_PACKAGES
    for tool in COMPILERS:
        assert tool not in scripts, f"runtime stage mentions {tool.strip()}"
    copies = runtime.args("COPY")
    assert copies and all(c.startswith("--from=build /dist/") and ".whl" in c for c in copies)
    env = " ".join(runtime.args("ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env
    assert "--compile" in scripts, "bytecode compiled at install time: nothing written at run time"
    assert runtime.args("USER") == ["0:0"]
    entry = runtime.args("ENTRYPOINT")
    assert entry == ['["kpod-metrics"]']


def test_dockerignore_keeps_objects_and_venvs_out() -> None:
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p and not p.startswith("#")]
    for path in (".venv", "bpf/cpu_sched.bpf.o", "bpf/vmlinux.h", ".git"):
        assert any(fnmatch.fnmatch(path, p) for p in patterns), path
    assert not any(fnmatch.fnmatch("bpf/cpu_sched.bpf.c", p) for p in patterns)


# ----------------------------------------------------------------------------- running it


def _context_copy(dest: Path) -> Path:
    """The build context as BuildKit would send it: the work tree minus the dockerignore."""
    patterns = [p for p in DOCKERIGNORE.read_text().splitlines() if p and not p.startswith("#")]

    def ignore(directory: str, names: list[str]) -> set[str]:
        rel_dir = os.path.relpath(directory, REPO)
        out = set()
        for name in names:
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            if any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p.removeprefix("**/")) for p in patterns):
                out.add(name)
        return out

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)
    return dest


def _build_script() -> str:
    scripts = [s for s in _stages()["build"].runs() if "make bpf" in s]
    assert len(scripts) == 1
    # The image's interpreter is the venv's here; everything else runs exactly as written.
    return scripts[0].replace("PY=python3", f"PY={sys.executable}")


def _toolchain_skip() -> str | None:
    """None when the image's build stage can run here; a missing tool fails instead."""
    require_tools("clang", "llvm-strip", "bpftool", "make")
    if not os.access("/sys/kernel/btf/vmlinux", os.R_OK):
        return "kernel has no BTF (/sys/kernel/btf/vmlinux): nothing to generate vmlinux.h from"
    return None


def _host_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    reason = _toolchain_skip()
    if reason:
        pytest.skip(reason)
    context = _context_copy(tmp_path_factory.mktemp("ctx") / "src")
    dist = tmp_path_factory.mktemp("dist")
    script = _build_script().replace("DIST=/dist", f"DIST={dist}")
    env = {**os.environ, "TARGETARCH": _host_arch(), "BUILDARCH": _host_arch()}
    result = subprocess.run(["sh", "-c", script], cwd=context, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    wheels = list(dist.glob("kpod_metrics-*.whl"))
    assert len(wheels) == 1
    return wheels[0]


def _check_wheel() -> object:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_wheel

        return check_wheel
    finally:
        sys.path.remove(str(REPO / "scripts"))


def test_check_wheel_names_a_package_the_wheel_lacks(tmp_path: Path) -> None:
    """A subpackage missing from pyproject.toml's `packages` is a build failure, not an image
    that breaks at the first import."""
    check_wheel = _check_wheel()
    packages = check_wheel.expected_packages()  # type: ignore[attr-defined]
    assert {"kpod/kernel/__init__.py", "kpod/exporters/otlp/__init__.py"} <= packages
    wheel = tmp_path / "kpod_metrics-0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name in sorted(packages - {"kpod/cgroup/__init__.py"}):
            archive.writestr(name, "")
    found = check_wheel.problems(str(wheel))  # type: ignore[attr-defined]
    assert any("packages missing" in f and "kpod/cgroup/__init__.py" in f for f in found), found


@pytest.mark.slow
def test_build_stage_wheel_carries_every_package(built_wheel: Path) -> None:
    names = set(zipfile.ZipFile(built_wheel).namelist())
    assert _check_wheel().expected_packages() <= names  # type: ignore[attr-defined]


@pytest.mark.slow
def test_build_stage_wheel_carries_every_bpf_object(built_wheel: Path) -> None:
    names = set(zipfile.ZipFile(built_wheel).namelist())
    sources = sorted(p.name for p in (REPO / "bpf").glob("*.bpf.c"))
    assert sources
    for source in sources:
        assert f"kpod/bpf/{source[:-2]}.o" in names
    assert "kpod/bpf/vmlinux.h" not in names
    with zipfile.ZipFile(built_wheel) as archive:
        for source in sources:
            data = archive.read(f"kpod/bpf/{source[:-2]}.o")
            assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 247, "EM_BPF"


@pytest.mark.slow
def test_wheel_installs_into_a_fresh_venv_and_runs(built_wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    # Install the wheel itself (no network); its dependencies are borrowed from this venv's
    # site-packages through a .pth path entry, which does not activate the editable install.
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", str(built_wheel)],
        check=True,
    )
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    Path(site, "borrowed-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    agent = str(venv / "bin" / "kpod-metrics")
    version = subprocess.run([agent, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert version.returncode == 0, version.stderr
    assert re.fullmatch(r"kpod-metrics \d+\.\d+\.\d+\S*\n", version.stdout)
    listing = subprocess.run(
        [str(py), "-c", "import importlib.resources, kpod; print(kpod.__file__); "
         "print(*sorted(p.name for p in importlib.resources.files('kpod.bpf').iterdir()))"],
        capture_output=True, text=True, cwd=tmp_path,  # not the repo: `-c` puts the cwd on sys.path
    )  # fmt: skip
    assert listing.returncode == 0, listing.stderr
    where = listing.stdout.split("\n")
    assert where[0].startswith(str(venv)), "kpod must come from the wheel, not the editable install"
    assert {p.name[:-2] + ".o" for p in (REPO / "bpf").glob("*.bpf.c")} <= set(where[1].split())
    # The installed agent finds its objects where the eBPF receivers look for them.
    config = str(REPO / "config.example.yaml")
    check = subprocess.run([agent, "validate", "--config", config], capture_output=True, text=True, cwd=tmp_path)
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
def test_build_stage_refuses_a_foreign_arch_without_its_btf(tmp_path: Path) -> None:
    reason = _toolchain_skip()
    if reason:
        pytest.skip(reason)
    context = _context_copy(tmp_path / "src")
    foreign = "arm64" if _host_arch() == "amd64" else "amd64"
    script = _build_script().replace("DIST=/dist", f"DIST={tmp_path / 'dist'}")
    env = {**os.environ, "TARGETARCH": foreign, "BUILDARCH": _host_arch()}
    result = subprocess.run(["sh", "-c", script], cwd=context, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert f"deploy/btf/vmlinux-{foreign}.btf" in result.stderr
    assert not list(context.glob("bpf/*.bpf.o")), "nothing is built with the wrong vmlinux.h"


@pytest.mark.slow
def test_build_stage_uses_a_provided_btf_for_the_target_arch(tmp_path: Path) -> None:
    """A BTF file at deploy/btf/vmlinux-<arch>.btf is what vmlinux.h is generated from."""
    reason = _toolchain_skip()
    if reason:
        pytest.skip(reason)
    context = _context_copy(tmp_path / "src")
    (context / "deploy" / "btf").mkdir(exist_ok=True)
    shutil.copy("/sys/kernel/btf/vmlinux", context / "deploy" / "btf" / f"vmlinux-{_host_arch()}.btf")
    script = _build_script().replace("DIST=/dist", f"DIST={tmp_path / 'dist'}")
    # BUILDARCH differs: only the provided BTF can make this build succeed.
    env = {**os.environ, "TARGETARCH": _host_arch(), "BUILDARCH": "elsewhere"}
    result = subprocess.run(["sh", "-c", script], cwd=context, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"bpftool btf dump file deploy/btf/vmlinux-{_host_arch()}.btf format c" in result.stdout
    assert list((tmp_path / "dist").glob("*.whl"))


@pytest.mark.slow
def test_agent_runs_on_a_read_only_root(tmp_path: Path) -> None:
    """The container runs with readOnlyRootFilesystem: the agent, every receiver included, must
    not write anywhere.  Here: a private mount namespace with / remounted read-only."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a private mount namespace)")
    require_tools("unshare")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "agent.yaml"
    config.write_text(
        "kpod: {profile: comprehensive, poll_interval: 1s, discovery: {mode: local}}\n"
        f"exporters: {{prometheus: {{endpoint: '127.0.0.1:{port}'}}}}\n"
        "service: {pipelines: {metrics: {exporters: [prometheus]}}}\n"
    )
    agent = shlex.join(
        [str(Path(sys.executable).parent / "kpod-metrics"), "run", "--config", str(config), "--cycles", "3"]
    )
    script = (
        f"mount --make-rprivate / && mount -o remount,bind,ro / && ! touch {tmp_path}/probe 2>/dev/null && exec {agent}"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("KUBERNETES_SERVICE_HOST", None)
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Read-only file system" not in result.stderr
    assert not (tmp_path / "probe").exists()
