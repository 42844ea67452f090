"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from engine import BuiltImage

REPO = Path(__file__).resolve().parents[1]
PLUGIN_SOURCE = Path(__file__).resolve().parent / "plugin" / "kpod_testplugin.py"

ENTRY_POINTS = """\
[kpod.receivers]
constant = kpod_testplugin:constant

[kpod.processors]
recording = kpod_testplugin:recording_processor

[kpod.exporters]
recording = kpod_testplugin:recording_exporter

[kpod.settings_checks]
node_name = kpod_testplugin:check_node_name
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


# ----------------------------------------------------------------------------- the image


_IMAGE_REPORT: list[str] = []


@pytest.fixture(scope="session")
def agent_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BuiltImage]:
    """The agent's image, built once per session by `make image` (deploy/Dockerfile, podman) under
    a name of its own, and removed at the end.  The base image is reused when it exists.
    KPOD_TEST_IMAGE=<image> uses an image built before instead (and leaves it)."""
    from engine import (
        BASE_IMAGE,
        BuiltImage,
        build_image,
        engine_skip_reason,
        image_size,
        remove_image,
        require_engine,
        unique_name,
    )
    from engine import podman as run_podman

    reason = engine_skip_reason()
    if reason:
        pytest.skip(reason)
    require_engine()
    given = os.environ.get("KPOD_TEST_IMAGE")  # a developer's `make image` result: used as is, kept
    if given:
        yield BuiltImage(given, image_size(given), 0.0, BASE_IMAGE)
        return
    tag = f"localhost/{unique_name('agent')}:test"
    base_existed = run_podman("image", "exists", BASE_IMAGE, check=False).returncode == 0
    log = tmp_path_factory.mktemp("image") / "build.log"
    began = time.monotonic()
    try:
        build_image(tag, log)
        built = BuiltImage(tag, image_size(tag), time.monotonic() - began, BASE_IMAGE)
        base = "base image reused" if base_existed else "base image made"
        _IMAGE_REPORT.append(
            f"agent image: built in {built.build_seconds:.0f} s ({base}), {built.size_bytes / 1e6:.0f} MB"
            f" ({tag}, removed at the end)"
        )
        yield built
    finally:
        remove_image(tag)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _IMAGE_REPORT:
        terminalreporter.write_line(line)
