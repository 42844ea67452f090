"""The registry's built-in table against the package's entry points, and what reading
installed metadata is left for (kpod/registry.py): a config of built-in components never
imports importlib.metadata; one that names a plugin's type finds it, and the plugin's settings
checks run."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from kpod.config import ConfigError, load_config
from kpod.registry import BUILT_IN, Registry, installed_entry_points

REPO = Path(__file__).resolve().parents[1]


def test_built_in_table_is_pyprojects_entry_points() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]
    assert declared == BUILT_IN


def test_built_in_table_is_what_the_installed_package_declares() -> None:
    for group, entries in BUILT_IN.items():
        ours = {ep.name: ep.value for ep in installed_entry_points(group) if ep.value.startswith("kpod.")}
        assert ours == entries, group


@pytest.mark.parametrize("group", sorted(BUILT_IN))
def test_every_built_in_entry_point_loads(group: str) -> None:
    registry = Registry()
    kinds = {"kpod.receivers": "receiver", "kpod.processors": "processor", "kpod.exporters": "exporter"}
    if group in kinds:
        for name in BUILT_IN[group]:
            assert registry.factory(kinds[group], name).type == name
    else:
        assert [key for key, _ in registry.settings_checks(installed=False)] == sorted(BUILT_IN[group])


def test_the_default_config_reads_no_installed_metadata(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("kpod: {profile: comprehensive, discovery: {mode: local}}\nexporters:\n  otlp: {}\n")
    script = (
        "import sys\n"
        "from kpod.config import load_config\n"
        f"config = load_config({str(config)!r}, environ={{}})\n"
        "print('importlib.metadata' in sys.modules, len(config.receivers))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    loaded, receivers = out.stdout.split()
    assert loaded == "False"
    assert int(receivers) > 5


def test_a_plugin_type_is_found_and_its_settings_check_runs(tmp_path: Path, test_plugin: Path) -> None:
    from kpod_testplugin import REFUSED_NODE_NAME

    def config(node_name: str, receivers: str) -> Path:
        path = tmp_path / "config.yaml"
        path.write_text(
            f"kpod: {{profile: custom, node_name: {node_name}, discovery: {{mode: local}}}}\n"
            f"receivers:\n{receivers}"
            "exporters:\n  prometheus: {}\n"
            "service:\n  pipelines:\n    metrics:\n      receivers: [memory]\n      exporters: [prometheus]\n"
        )
        return path

    plugin = "  constant/a: {}\n  memory: {}\n"
    loaded = load_config(str(config("node-a", plugin)), environ={})
    assert loaded.kpod.node_name == "node-a"
    with pytest.raises(ConfigError, match="the test plugin refuses node name"):
        load_config(str(config(REFUSED_NODE_NAME, plugin)), environ={})
    # Without a plugin's component in the file, installed metadata is not read: built-in checks only.
    assert load_config(str(config(REFUSED_NODE_NAME, "  memory: {}\n")), environ={}).kpod.node_name == REFUSED_NODE_NAME
    # An unknown type names every known one, the plugin's included.
    with pytest.raises(ConfigError, match=r"unknown receiver type 'nosuch' \(known: .*constant"):
        load_config(str(config("node-a", "  nosuch: {}\n")), environ={})
