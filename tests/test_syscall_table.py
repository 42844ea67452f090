"""kpod/kernel/syscall_table.py is what scripts/gen_syscall_table.py makes of the captured UAPI
numbers (scripts/syscall_numbers): nobody edits the generated table by hand, and the generator
runs offline from what the repository holds."""

from __future__ import annotations

from pathlib import Path

from kpod.kernel import syscall_table
from scripts import gen_syscall_table

REPO = Path(__file__).resolve().parents[1]


def test_table_is_the_generators_output() -> None:
    generated = gen_syscall_table.render()
    assert (REPO / "kpod" / "kernel" / "syscall_table.py").read_text() == generated, (
        "kpod/kernel/syscall_table.py differs: python3 scripts/gen_syscall_table.py > kpod/kernel/syscall_table.py"
    )
    assert Path(syscall_table.__file__).read_text() == generated  # the module the agent imports


def test_captured_numbers_are_the_abi() -> None:
    """A few numbers every kernel of the arch has had for years (the ABI never renumbers)."""
    x86_64 = gen_syscall_table.table((gen_syscall_table.NUMBERS / "x86_64.defines").read_text())
    arm64 = gen_syscall_table.table((gen_syscall_table.NUMBERS / "arm64.defines").read_text())
    assert (x86_64["read"], x86_64["write"], x86_64["getppid"], x86_64["openat"]) == (0, 1, 110, 257)
    assert (arm64["read"], arm64["write"], arm64["getppid"], arm64["openat"]) == (63, 64, 173, 56)
    assert arm64["fstat"] == 80  # through the generic table's __NR3264_ alias
    assert "open" not in arm64  # arm64 has only openat
