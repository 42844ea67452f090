"""Where the compiled BPF objects are (its own module: the loader and the probes both need it)."""

from __future__ import annotations

import importlib.resources
import os


def object_path(name: str, program_dir: str = "") -> str:
    """Where `<name>.bpf.o` is: the configured directory, else the one shipped in kpod.bpf."""
    directory = program_dir or str(importlib.resources.files("kpod.bpf"))
    return os.path.join(directory, f"{name}.bpf.o")
