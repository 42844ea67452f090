"""Test support for the cgroup receivers: where shared/fixtures is, and a node-shaped fixture tree.

shared/ sits beside the repository (CI clones the repo elsewhere and puts shared/ next to it),
so the fixtures are found relative to the repository root's parent; KPOD_SHARED_FIXTURES
overrides that.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path(os.environ.get("KPOD_SHARED_FIXTURES", REPO.parent / "shared" / "fixtures"))
V2 = FIXTURES / "cgroup-v2-kernel-6.1"
HYBRID = FIXTURES / "cgroup-hybrid-kernel-6.18"
