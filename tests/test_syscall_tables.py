"""Syscall names on both architectures: every default and every documented list resolves.

One config (a chart's ConfigMap) serves amd64 and arm64 nodes alike, and arm64's table lacks
many x86_64 names (epoll_wait, open, poll...).  A default that does not resolve makes the
syscall receiver refuse to start on that architecture, so: each architecture's default set
resolves on its own table, a name of the other table is skipped (not fatal), and every list
the documentation shows resolves on both tables as it is.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from kpod.config import load_config
from kpod.kernel import syscalls
from kpod.kernel.syscall_table import ARM64, X86_64
from kpod.settings import KpodSettings

REPO = Path(__file__).resolve().parents[1]
ARCHES = sorted(syscalls.TABLES)
# A tracked-syscalls list written out in YAML (flow style) or in a Markdown table cell.
LISTED = re.compile(r"(?:tracked_syscalls|trackedSyscalls)[`:\s|]+(?:list of str \| )?`?(\[[^\]\n]*\])")
DOCUMENTED = [
    REPO / "config.example.yaml",
    REPO / "README.md",
    REPO / "deploy" / "helm" / "kpod-metrics" / "values.yaml",
    *sorted((REPO / "deploy" / "manifests").glob("*.yaml")),
    *sorted((REPO / "docs").rglob("*.md")),
    *sorted((REPO / "deploy").glob("*.md")),
]


def documented_lists() -> list[tuple[str, list[str]]]:
    found = []
    for path in DOCUMENTED:
        for match in LISTED.finditer(path.read_text()):
            names = yaml.safe_load(match.group(1))
            found.append((f"{path.relative_to(REPO)}: {match.group(0)[:60]}", [str(n) for n in names]))
    return found


def test_the_tables_differ_where_it_matters() -> None:
    """The premise: arm64 lacks x86_64's epoll_wait and open; both have the newer forms."""
    assert "epoll_wait" in X86_64 and "epoll_wait" not in ARM64
    assert "open" in X86_64 and "open" not in ARM64
    assert {"epoll_pwait", "openat"} <= set(X86_64) & set(ARM64)


@pytest.mark.parametrize("arch", ARCHES)
def test_each_default_resolves_completely_on_its_own_table(arch: str) -> None:
    names = syscalls.default_tracked(arch)
    assert len(names) == len(set(names)) >= 5
    resolved = syscalls.resolve_syscalls(names, arch)
    assert list(resolved) == names
    assert resolved == {n: syscalls.TABLES[arch][n] for n in names}
    assert syscalls.skipped_note(names, arch) == ""


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_settings_default_is_the_machines_default_set(machine: str) -> None:
    assert KpodSettings().syscall.tracked_syscalls == []  # empty = per architecture
    expected = syscalls.DEFAULT_TRACKED[syscalls.architecture(machine)]
    assert syscalls.default_tracked(machine) == list(expected)
    assert "epoll_pwait" in syscalls.default_tracked("aarch64")
    assert "epoll_wait" in syscalls.default_tracked("x86_64")


@pytest.mark.parametrize("source", ARCHES)
@pytest.mark.parametrize("target", ARCHES)
def test_any_default_is_harmless_on_the_other_architecture(source: str, target: str) -> None:
    """A node of one architecture given the other's list: the shared names are tracked, the
    other architecture's are skipped with a note, and nothing raises."""
    names = syscalls.default_tracked(source)
    resolved = syscalls.resolve_syscalls(names, target)
    skipped = syscalls.other_architectures_only(names, target)
    assert set(resolved) | set(skipped) == set(names)
    assert len(resolved) >= len(names) - 1
    if source != target and source == "x86_64":
        assert skipped == {"epoll_wait": ["x86_64"]}
        note = syscalls.skipped_note(names, target)
        assert note == "not syscalls on arm64, not tracked here: epoll_wait (x86_64 only)"


def test_a_name_no_architecture_has_is_an_error_everywhere() -> None:
    for arch in ARCHES:
        with pytest.raises(ValueError, match=r"unknown syscall name.*frobnicate"):
            syscalls.resolve_syscalls(["read", "frobnicate"], arch)
    with pytest.raises(ValueError, match="supports x86_64 and arm64, not riscv64"):
        syscalls.resolve_syscalls(["read"], "riscv64")


def test_documentation_shows_lists_and_each_resolves_on_both_tables() -> None:
    lists = documented_lists()
    where = {label.split(":")[0] for label, _ in lists}
    # The places a user copies a config from must be found (or this test would pass on nothing).
    assert {"config.example.yaml", "README.md", "deploy/helm/kpod-metrics/values.yaml",
            "docs/CONFIGURATION.md", "deploy/manifests/kpod-metrics.yaml"} <= where, where  # fmt: skip
    for label, names in lists:
        for arch in ARCHES:
            resolved = syscalls.resolve_syscalls(names, arch)
            assert list(resolved) == names, f"{label}: does not resolve on {arch}"
        if not names:  # empty = the architecture's default set, which resolves (above)
            continue


@pytest.mark.parametrize("arch", ARCHES)
def test_the_shipped_config_loads_and_its_set_resolves_on_each_architecture(
    arch: str, clean_env: dict[str, str]
) -> None:
    config = load_config(str(REPO / "config.example.yaml"), environ=clean_env)
    names = config.kpod.syscall.tracked_syscalls or syscalls.default_tracked(arch)
    assert syscalls.resolve_syscalls(names, arch) and syscalls.skipped_note(names, arch) == ""
