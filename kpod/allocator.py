"""The C allocator's settings for the agent's process (glibc; elsewhere nothing is changed).

glibc's malloc keeps freed memory for reuse, tuned for programs that do not run for months
from many short threads.  Two of its defaults hold memory the agent no longer uses:

- arenas per thread: each collecting thread (one per receiver per cycle, kpod.scheduler) may
  get an arena of its own, up to 8 per CPU, and every arena keeps its free chunks.  The GIL
  serialises the Python work anyway, so spreading threads over arenas buys no concurrency:
  M_ARENA_MAX 2.
- the dynamic mmap threshold: freeing an mmapped block (a rendered exposition, a pod list, a
  large file read) raises the threshold to that block's size, so the next blocks of that size
  come from an arena, where a few live small chunks keep them resident.  Setting
  M_MMAP_THRESHOLD (to glibc's own default, 128 KiB) switches that adjustment off: blocks
  from 128 KiB up are mmapped and returned to the kernel when freed.

Applied once, before the agent starts any thread (an arena limit does not shrink arenas that
exist).  The RSS this saves is measured in docs/perf/readings/scale.md.

Tried and left out (ad hoc, 110 pods, kubelet mode, four agents side by side for a minute):
M_ARENA_MAX 1, and malloc_trim(0) once a second, each moved RSS by less than 0.5 MiB, within
what two identical agents differ by.  Little of the agent's memory is free malloc memory (about
1.3 MiB free in the arenas, mallinfo2); most of it is Python objects in obmalloc's arenas (13 MiB,
under 1 MiB of it free) and the code of imported modules, which only importing less reduces.
"""

from __future__ import annotations

import ctypes
import platform

M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
ARENA_MAX = 2
MMAP_THRESHOLD = 128 * 1024

SETTINGS = ((M_ARENA_MAX, ARENA_MAX), (M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def tune() -> bool:
    """Apply SETTINGS through mallopt; False when the C library is not glibc or refuses one."""
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in SETTINGS)
