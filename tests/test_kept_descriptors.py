"""Closing kept descriptors (kpod.cgroup.keptfds.close_all) while another thread keeps more: at
the interpreter's exit the finalizers close them while receiver threads that overran their
collection may still be reading (a test's agent once died at exit with "dictionary changed size
during iteration")."""

from __future__ import annotations

import errno
import os

import pytest

from kpod.cgroup import keptfds
from kpod.cgroup.keptfds import close_all


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as error:
        assert error.errno == errno.EBADF
        return False
    return True


def test_close_all_closes_what_is_kept_while_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    kept = {f"/kept/{i}": os.open(os.devnull, os.O_RDONLY) for i in range(3)}
    late = os.open(os.devnull, os.O_RDONLY)
    opened = [*kept.values(), late]
    real_close = os.close

    def close_while_another_keeps(fd: int) -> None:
        real_close(fd)
        if "/kept/late" not in kept and late in opened:  # another thread keeps one, once
            opened.remove(late)
            kept["/kept/late"] = late

    monkeypatch.setattr(keptfds.os, "close", close_while_another_keeps)
    try:
        close_all(kept, int)
    finally:
        monkeypatch.undo()
        still = [fd for fd in [*opened, late] if _is_open(fd)]
        for fd in still:
            os.close(fd)
    assert kept == {}
    assert still == [], "a descriptor kept while close_all ran stayed open"


def test_close_all_takes_the_number_from_each_value() -> None:
    class Table:
        def __init__(self, fd: int) -> None:
            self.fd = fd

    tables = {key: Table(os.open(os.devnull, os.O_RDONLY)) for key in ("a", "b")}
    fds = [t.fd for t in tables.values()]
    close_all(tables, lambda table: table.fd)
    assert tables == {} and not any(map(_is_open, fds))
