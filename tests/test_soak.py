"""Pod churn soak (bench/soak.py) with its bounds as assertions.

SOAK_CYCLES create/delete cycles of real kubepods-shaped cgroups with a live process each and
the matching API events from the fake API server, against the agent process in informer mode
at poll 1 s: 40 cycles in `make test`, 500 in `make soak` (which also writes docs/perf/soak.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kernel_util import kernel_test

pytestmark = kernel_test

REPO = Path(__file__).resolve().parents[1]
CYCLES = int(os.environ.get("SOAK_CYCLES", "40"))


def test_soak_pod_churn_leaks_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bench.soak import markdown, run_soak

    result = run_soak(CYCLES, workdir=tmp_path, log=lambda m: print(m, file=sys.stderr))
    text = markdown(result, f"SOAK_CYCLES={CYCLES} pytest tests/test_soak.py")
    print(text)
    if CYCLES >= 500:
        (REPO / "docs" / "perf" / "soak.md").write_text("# Soak\n\n" + text)
    assert not result.violations(), text
    # The churn was seen at all: some soak pods were labelled in scrapes while alive.
    assert result.pods_labelled > 0, text
