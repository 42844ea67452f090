"""Pod churn soak (bench/soak.py) with its bounds as assertions.

SOAK_CYCLES create/delete cycles of real kubepods-shaped cgroups with a live process each and
the matching API events from the fake API server, against the agent process in informer mode
at poll 1 s: 100 cycles in `make test` (the warm-up alone is 70), 500 in `make soak` (which also
writes docs/perf/soak.md).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from kernel_util import kernel_skip_reason
from kpod.exporters.prometheus.exposition import Renderer

from kpod.model import Batch, CgroupRef, Kind, MetricDef, Point, Resource

REPO = Path(__file__).resolve().parents[1]
CYCLES = int(os.environ.get("SOAK_CYCLES", "100"))


@pytest.mark.kernel
@pytest.mark.skipif(kernel_skip_reason() is not None, reason=kernel_skip_reason() or "")
def test_soak_pod_churn_leaks_nothing(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from bench import sections
    from bench.soak import SoakResult, measure, render

    measured = measure(CYCLES, command=f"SOAK_CYCLES={CYCLES} pytest tests/test_soak.py", workdir=tmp_path)
    result = SoakResult(**measured.data["result"])
    text = render(measured.data)
    print(text)
    if CYCLES >= 500:  # `make soak`: the soak section of docs/PERFORMANCE.md
        sections.write("soak", measured)
    assert not result.violations(), text
    # The churn was seen at all: some soak pods were labelled in scrapes while alive.
    assert result.pods_labelled > 0, text


def test_renderer_keeps_no_label_cache_for_gone_cgroups() -> None:
    """What the soak found: the renderer's per-resource label cache held every gone cgroup's
    Resource until a clear at 4x the series count (~1 KiB each).  Under churn (fresh Resource
    objects every cycle, as k8sattributes makes them when pods change) it stays near the live set."""
    metrics = [MetricDef(f"kpod.m{i}", Kind.COUNTER, "1", "x") for i in range(12)]

    def resource(i: int) -> Resource:
        return Resource((("namespace", "soak"), ("pod", f"soak-{i}"), ("container", "app"), ("node", "n")))

    stable = [(CgroupRef(10**6 + i, f"/s/{i}"), resource(10**6 + i)) for i in range(80)]
    renderer = Renderer()
    most = 0
    for cycle in range(1500):
        live = [(CgroupRef(k, f"/p/{k}"), resource(k)) for k in range(cycle, cycle + 5)]
        renderer.render(Batch([Point(m, ref, (), 1.0, res) for ref, res in stable + live for m in metrics]))
        most = max(most, len(renderer._heads))
    series = 12 * 85
    assert most <= series // 4 + 256 + 1, most  # was 5000+ before: 4 * series + 1000
