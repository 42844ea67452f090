"""kpod.gcpolicy against CPython's collector itself, in a fresh interpreter per case (the
settings are process-wide), once settled and once with the defaults, so that the test also
shows it can tell the two apart."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Cycles of points as the pipeline makes them: each cycle's points replace the last one's.
# How many collections do 30 such cycles cost, once the heap has its steady size?  And is
# garbage with a reference cycle, made after the settling, still collected without anyone
# calling gc.collect()?
CHILD = """
import gc, json, sys, weakref
from kpod.model import CgroupRef, Kind, MetricDef, Point
settled = sys.argv[1] == "settled"
held_before = [[i] for i in range(1000)]
if settled:
    from kpod import gcpolicy
    gcpolicy.settle()
collections = []
gc.callbacks.append(lambda phase, info: phase == "start" and collections.append(info["generation"]))
metric = MetricDef("m", Kind.COUNTER, "1", "")
refs = [CgroupRef(i, f"/c{i}") for i in range(300)]
last = []
for number in range(32):
    last = [Point(metric, ref, (("k", str(n)),), float(n)) for ref in refs for n in range(12)]
    if number == 1:
        collections.clear()  # two cycles' points alive at once: the heap's steady size
per_cycle = len(collections)

class Node:
    pass

a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
kept = [[i] for i in range(3 * 20_000)]  # net allocations past any young threshold
print(json.dumps({
    "collections": per_cycle,
    "cycle_collected": gone() is None,
    "frozen": gc.get_freeze_count(),
    "held_before": len(held_before),
}))
"""


def _run(mode: str) -> dict[str, int | bool]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout)


def test_settled_cycles_cost_no_collections_and_cyclic_garbage_still_goes() -> None:
    default, settled = _run("default"), _run("settled")
    # 30 cycles of 3,600 points: dozens of collections by default, none once settled.
    assert default["collections"] >= 30, default
    assert settled["collections"] == 0, settled
    # What was alive at the settling is frozen (out of every later collection)...
    assert default["frozen"] == 0 and settled["frozen"] >= settled["held_before"], settled
    # ...and a reference cycle made afterwards is still freed by the automatic collector.
    assert settled["cycle_collected"] and default["cycle_collected"]
