"""Where the compiled BPF objects are (its own module: the loader and the probes both need it)."""

from __future__ import annotations

import os

import kpod.bpf


def object_path(name: str, program_dir: str = "") -> str:
    """Where `<name>.bpf.o` is: the configured directory, else the one shipped in kpod.bpf.
    libbpf opens the object by its path, so the package is a directory of files (never a zip):
    its directory is the package's own, found without importlib.resources (which imports
    zipfile and the rest of its readers: ~0.5 MiB of the agent's resident memory)."""
    directory = program_dir or os.path.dirname(kpod.bpf.__file__ or "")
    return os.path.join(directory, f"{name}.bpf.o")
