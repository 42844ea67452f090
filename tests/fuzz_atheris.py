"""Coverage-guided fuzzing (atheris/libFuzzer) of the agent's parsers, for `make fuzz`.

    python tests/fuzz_atheris.py <target> [libFuzzer flags, e.g. -runs=20000 -max_total_time=60]

Targets: parsers (every kernel/cgroup file parser), mountinfo, podlist, watch, config.  The
property is the one tests/test_fuzz.py checks with hypothesis: nothing but the documented
exception escapes (ValueError for a pod list, ConfigError for a config, nothing for the rest).
Hypothesis generates structured input; libFuzzer mutates bytes guided by coverage and finds the
branches structure-aware generation does not think of.  Not collected by pytest.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable

import atheris

with atheris.instrument_imports():
    from kpod.processors.k8sattributes.discovery import decode_watch_event
    from kpod.processors.k8sattributes.podlist import decode_pod_list

    from kpod.cgroup import parsers as p
    from kpod.cgroup.mounts import parse_mountinfo_cgroups
    from kpod.config import ConfigError, load_config


def _text(data: bytes) -> str:
    # What the receivers hand the parsers: bytes decoded with surrogateescape (kpod.cgroup.files).
    return data.decode("utf-8", "surrogateescape")


def parsers(data: bytes) -> None:
    text = _text(data)
    for parse in (p.parse_io_stat, p.parse_blkio_throttle, p.parse_cpu_stat,
                  p.parse_single_int, p.parse_pressure_totals, p.parse_net_dev,
                  p.parse_uevent, p.parse_devname, p.parse_cgroup_procs, p.parse_flat_keyed):  # fmt: skip
        parse(text)
    key = text.split(" ", 1)[0][:16]
    if key:
        p.parse_flat_keyed_value(text, key)


def mountinfo(data: bytes) -> None:
    text = _text(data)
    p.parse_mountinfo(text)
    parse_mountinfo_cgroups(text)


def podlist(data: bytes) -> None:
    with contextlib.suppress(ValueError):  # the documented error: not a PodList
        decode_pod_list(data)


def watch(data: bytes) -> None:
    decode_watch_event(data)


_CONFIG_PATH = os.path.join(tempfile.mkdtemp(prefix="kpod-fuzz-"), "config.yaml")


def config(data: bytes) -> None:
    with open(_CONFIG_PATH, "wb") as handle:
        handle.write(data)
    try:
        load_config(_CONFIG_PATH, environ={})
    except ConfigError as error:
        message = str(error)
        if "\n" in message or "internal error" in message:
            raise AssertionError(f"not a clean one-line config error: {message!r}") from None


TARGETS: dict[str, Callable[[bytes], None]] = {
    "parsers": parsers, "mountinfo": mountinfo, "podlist": podlist, "watch": watch, "config": config,
}  # fmt: skip


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(TARGETS)}}} [libFuzzer flags]")
    target = TARGETS[sys.argv[1]]
    atheris.Setup([sys.argv[0], *sys.argv[2:]], target)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
