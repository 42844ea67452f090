"""Run a command with a given RLIMIT_NOFILE, as a container runtime would start it, optionally
under a seccomp filter that refuses to change any rlimit (as a strict seccomp profile or an LSM
may): `python rlimit_exec.py SOFT HARD [--refuse-setrlimit] -- COMMAND...`.

The filter answers EPERM to setrlimit() and to prlimit64() with a new limit; reading limits
(prlimit64 with new_limit NULL, which glibc's getrlimit is) still works.  It is installed with
no_new_privs, so the command cannot drop it, and it ends with the command's process.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import struct
import sys

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6].
_NR, _ARCH, _ARG2_LOW, _ARG2_HIGH = 0, 4, 16 + 2 * 8, 16 + 2 * 8 + 4
# (AUDIT_ARCH_*, __NR_setrlimit, __NR_prlimit64) by machine.
_SYSCALLS = {"x86_64": (0xC000003E, 160, 302), "aarch64": (0xC00000B7, 164, 261)}
_LD_ABS, _JEQ, _RET = 0x20, 0x15, 0x06  # BPF_LD|BPF_W|BPF_ABS, BPF_JMP|BPF_JEQ|BPF_K, BPF_RET|BPF_K
_ALLOW, _DENY = 0x7FFF0000, 0x00050000 | errno.EPERM  # SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO
_PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 38, 22, 2


def _refusing_filter(arch: int, nr_setrlimit: int, nr_prlimit64: int) -> bytes:
    # (code, jump if true, jump if false, k); jumps skip that many instructions after the next.
    program = [
        (_LD_ABS, 0, 0, _ARCH),
        (_JEQ, 0, 7, arch),  # another ABI (compat calls): allowed
        (_LD_ABS, 0, 0, _NR),
        (_JEQ, 6, 0, nr_setrlimit),  # -> deny
        (_JEQ, 0, 4, nr_prlimit64),  # not prlimit64 -> allow
        (_LD_ABS, 0, 0, _ARG2_LOW),  # new_limit
        (_JEQ, 0, 3, 0),  # -> deny
        (_LD_ABS, 0, 0, _ARG2_HIGH),
        (_JEQ, 0, 1, 0),  # NULL: only reads the limit -> allow; else deny
        (_RET, 0, 0, _ALLOW),
        (_RET, 0, 0, _DENY),
    ]
    return b"".join(struct.pack("=HBBI", *instruction) for instruction in program)


def refuse_setrlimit() -> None:
    machine = platform.machine()
    if machine not in _SYSCALLS:
        raise SystemExit(f"rlimit_exec: no syscall numbers for {machine}")
    code = _refusing_filter(*_SYSCALLS[machine])
    buffer = ctypes.create_string_buffer(code, len(code))

    class SockFprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    fprog = SockFprog(len(code) // 8, ctypes.addressof(buffer))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise SystemExit(f"rlimit_exec: PR_SET_NO_NEW_PRIVS: {os.strerror(ctypes.get_errno())}")
    if libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(fprog), 0, 0) != 0:
        raise SystemExit(f"rlimit_exec: PR_SET_SECCOMP: {os.strerror(ctypes.get_errno())}")


def main(argv: list[str]) -> None:
    split = argv.index("--")
    options, command = argv[:split], argv[split + 1 :]
    soft, hard = int(options[0]), int(options[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if "--refuse-setrlimit" in options[2:]:
        refuse_setrlimit()
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
