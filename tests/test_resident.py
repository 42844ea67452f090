"""What the running agent keeps imported: modules a default node never uses are not loaded, since
every module imported stays in the agent's resident memory for its whole life (issue 17's RSS
target; docs/perf/readings/scale.md).  Each one here is still loaded when it is used: installed
metadata for a plugin's type (tests/test_registry.py), the protobuf renderer on a scrape that
asks for protobuf (tests/test_prometheus_protobuf.py), help text on --help."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Module -> where it would come from.
NOT_LOADED = {
    "importlib.metadata": "kpod/registry.py reading entry points of built-in components",
    "importlib.resources": "kpod/kernel/objects.py finding the BPF objects",
    "zipfile": "importlib.metadata or importlib.resources",
    "ctypes.util": "kpod/kernel/libbpf.py and inroot.py finding the C library",
    "shutil": "argparse's help formatter asking for the terminal's width",
    "kpod.exporters.prometheus.protobuf": "the Prometheus exporter before any protobuf scrape",
    "kpod.exporters.protowire": "the same, with its varint table",
}


@pytest.mark.parametrize("mode", ["kubelet", "informer"])
def test_a_default_agent_does_not_import_what_it_does_not_use(mode: str) -> None:
    """Everything a comprehensive agent imports before its first cycle (the CLI's parser, the
    config with every component's module, the agent loop, discovery), in a fresh interpreter."""
    script = (
        "import sys\n"
        "from kpod import cli\n"
        "cli._parser()\n"
        "from kpod.config import load_config\n"
        "import kpod.agent, kpod.pipeline, kpod.kernel.inroot\n"
        "import kpod.processors.k8sattributes.discovery\n"
        f"config = load_config(None, environ={{'KPOD_PROFILE': 'comprehensive', 'KPOD_DISCOVERY_MODE': '{mode}',"
        " 'NODE_IP': '127.0.0.1'})\n"
        "print(len(config.receivers), ' '.join(sorted(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, check=True)
    receivers, modules = out.stdout.split(" ", 1)
    assert int(receivers) >= 10
    loaded = set(modules.split())
    assert "kpod.receivers.cpu_sched" in loaded and "kpod.exporters.prometheus.exporter" in loaded
    assert {name: why for name, why in NOT_LOADED.items() if name in loaded} == {}


@pytest.mark.parametrize("columns", ["", "57", "200", "junk", "-3"])
def test_help_is_as_wide_as_argparse_would_make_it(columns: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from kpod.cli import _HelpFormatter

    if columns:
        monkeypatch.setenv("COLUMNS", columns)
    else:
        monkeypatch.delenv("COLUMNS", raising=False)
    ours = _HelpFormatter("kpod-metrics")
    theirs = argparse.RawDescriptionHelpFormatter("kpod-metrics")
    assert ours._width == theirs._width  # type: ignore[attr-defined]
    assert os.environ.get("COLUMNS", "") == columns
