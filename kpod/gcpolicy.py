"""The cyclic garbage collector's settings for the agent's process, applied once it runs.

A cycle builds a few thousand points (and their tuples and histograms) that live until the next
cycle replaces them, and reference counting frees them then: they never need the cyclic
collector.  With CPython's defaults it still visits them: a young-generation collection every
700 net allocations (a dozen per cycle, each promoting the points alive at that moment), and
every few tens of cycles a full collection over everything the process holds, some 60,000
objects of imported modules (the `kubernetes` client alone is most of them), which takes tens of
milliseconds with the GIL held.  On bench/cycle.py's node at 110 pods (timed through
gc.callbacks over 20 cycles, in an ad hoc run): 1.6 ms of young, 1.5 ms of middle and 3.8 ms of
full collections per cycle on average, a quarter of the cost of reading the cycle's files.

After the first cycle (imports done, BPF objects loaded, the kernel's BTF released, caches
filled):

- `gc.freeze()` moves everything alive to the permanent generation: full collections no longer
  walk the modules.  What is frozen is never collected; objects of that moment that later
  become unreachable through a reference cycle are kept (a bounded, one-time amount: nothing
  made after the freeze is frozen).
- the young generation's threshold goes from 700 to YOUNG_THRESHOLD net allocations.  A cycle
  allocates about as much as it frees (the last cycle's points go as the new ones come), so
  collections become rare; garbage with reference cycles is still collected, at the latest
  after that many net allocations (a few megabytes at most).
"""

from __future__ import annotations

import gc

YOUNG_THRESHOLD = 20_000


def settle() -> None:
    """Freeze what the started agent holds and raise the young generation's threshold.  Called
    once, after the first cycle; a second call freezes what is alive then as well."""
    gc.collect()  # what is garbage now is freed, not frozen
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, old)
