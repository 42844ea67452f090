"""kpod.allocator against glibc itself: its arenas and mmapped blocks as malloc_info reports them.

Each case runs in a fresh interpreter (the settings are process-wide and an arena limit only
holds for threads started after it), once tuned and once with glibc's defaults, so the test
also shows that it can tell the two apart.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Eight threads each hold a malloc'ed chunk at the same moment: how many arenas serve them?
# Then a 4 MiB block is freed (by default that raises the mmap threshold to 4 MiB) and a
# 512 KiB block is held: is it mmapped (the mmapped total grows) or taken from an arena?
CHILD = """
import ctypes, json, os, re, sys, tempfile, threading
tuned = sys.argv[1] == "tuned" and __import__("kpod.allocator").allocator.tune()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, (ctypes.c_char_p, ctypes.c_char_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)

def malloc_info():
    fd, path = tempfile.mkstemp()
    os.close(fd)
    handle = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, handle)
    libc.fclose(handle)
    with open(path) as f:
        text = f.read()
    os.unlink(path)
    return text

def mmapped():
    return int(re.findall(r'<total type="mmap" count="\\d+" size="(\\d+)"/>', malloc_info())[-1])

barrier = threading.Barrier(9)
def hold():
    chunk = libc.malloc(1000)
    barrier.wait()
    barrier.wait()
    libc.free(chunk)
threads = [threading.Thread(target=hold) for _ in range(8)]
for thread in threads:
    thread.start()
barrier.wait()
arenas = malloc_info().count("<heap nr=")
barrier.wait()
for thread in threads:
    thread.join()
libc.free(libc.malloc(4 << 20))
before = mmapped()
block = libc.malloc(512 << 10)
print(json.dumps({"tuned": tuned, "arenas": arenas, "mmapped_growth": mmapped() - before}))
libc.free(block)
"""


def _child(mode: str) -> dict[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    return json.loads(out.stdout)


def test_tuned_glibc_keeps_two_arenas_and_mmaps_large_blocks() -> None:
    tuned = _child("tuned")
    assert tuned["tuned"] is True
    assert tuned["arenas"] <= 2, tuned
    assert tuned["mmapped_growth"] >= 512 << 10, tuned


def test_glibc_defaults_differ_where_the_tuning_acts() -> None:
    """Without it: an arena per thread, and after a large free a 512 KiB block from an arena."""
    default = _child("default")
    assert default["tuned"] is False
    assert default["arenas"] > 2, default
    assert default["mmapped_growth"] == 0, default
