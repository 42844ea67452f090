"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugin" / "kpod_testplugin.py"

ENTRY_POINTS = """\
[kpod.receivers]
constant = kpod_testplugin:constant

[kpod.processors]
recording = kpod_testplugin:recording_processor

[kpod.exporters]
recording = kpod_testplugin:recording_exporter
"""


def install_test_plugin(directory: Path) -> Path:
    """Lay out the test plugin as an installed distribution (module + dist-info with its
    entry points) in `directory`, which then only has to be on sys.path / PYTHONPATH."""
    shutil.copy(PLUGIN_SOURCE, directory / "kpod_testplugin.py")
    dist_info = directory / "kpod_testplugin-1.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kpod-testplugin\nVersion: 1.0\n")
    (dist_info / "entry_points.txt").write_text(ENTRY_POINTS)
    return directory


@pytest.fixture
def test_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    directory = install_test_plugin(tmp_path_factory.mktemp("plugin"))
    sys.path.insert(0, str(directory))
    try:
        import kpod_testplugin

        kpod_testplugin.EVENTS.clear()
        kpod_testplugin.RecordingExporter.batches.clear()
        yield directory
    finally:
        sys.path.remove(str(directory))
        sys.modules.pop("kpod_testplugin", None)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """An environment without KPOD_* variables or a Kubernetes service address."""
    for name in list(os.environ):
        if name.startswith("KPOD_") or name == "KUBERNETES_SERVICE_HOST":
            monkeypatch.delenv(name)
    return dict(os.environ)
