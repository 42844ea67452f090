"""Open a path inside a process's root without leaving it, and say which mount it reached.

A pod controls every name on the way from its root to its mount points.  The agent used to
walk <proc_root>/<pid>/root/<mount point> with plain path resolution, where an absolute symlink
resolves against the *agent's* root: a pod that mounted a tmpfs at /d/m and then another tmpfs
over /d, holding `m -> /etc`, had the agent measure the host's filesystem under the pod's
labels, and tell by a missing series which host paths do not exist.  Here:

  * `open_in_root(root_fd, path)` resolves `path` with `root_fd` as "/" and refuses every
    symlink on the way: openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
    where the kernel has it (5.6+; a seccomp profile may still refuse it), else one O_PATH |
    O_NOFOLLOW openat per component, which refuses a symlink component and ".." in the same way.
    Mount points as mountinfo prints them are canonical (the kernel's d_path: no symlink, no
    ".."), so a symlink on the way means that the path no longer leads where mountinfo says;
    no symlink is followed at all, in the pod's favour or not.  Nothing is read: O_PATH.
  * `mount_of(fd)` is statx(STATX_MNT_ID) of what was reached: the mount's id, which is what
    mountinfo's first field names (5.8+), or, where statx has no mount id, its device.  The
    caller reports a mount only if that is the mount mountinfo names.

Both are system calls through ctypes (the standard library has neither openat2 nor statx).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
from dataclasses import dataclass

# linux/openat2.h
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10
# openat2 has number 437 in the generic syscall table and on x86_64 alike.
_SYS_OPENAT2 = 437
# linux/stat.h
_STATX_TYPE = 0x0001
_STATX_MNT_ID = 0x1000
_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_SIZE = 256  # struct statx, padding included
_OFF_MASK, _OFF_MODE, _OFF_DEV_MAJOR, _OFF_MNT_ID = 0, 28, 136, 144

_O_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# The C library this process already runs on (dlopen(NULL)): ctypes.util.find_library would run
# ldconfig in a child process and import subprocess, tempfile and shutil for it.
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_statx = getattr(_libc, "statx", None)  # glibc 2.28+
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int

# None until probed: whether openat2 works here (the kernel has it, no seccomp filter refuses it).
_OPENAT2: bool | None = None


def _openat2(dir_fd: int, path: bytes, resolve: int) -> int:
    # Without O_NOFOLLOW: with it, a symlink as the last component would be opened itself;
    # without it, RESOLVE_NO_SYMLINKS refuses that one too (ELOOP).
    how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, resolve)
    fd = _syscall(
        ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd), ctypes.c_char_p(path),
        ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)),
    )  # fmt: skip
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return int(fd)


def openat2_available() -> bool:
    """Whether openat2 with RESOLVE_IN_ROOT works in this process (probed once)."""
    global _OPENAT2
    if _OPENAT2 is None:
        try:
            os.close(_openat2(-100, b"/", RESOLVE_IN_ROOT | RESOLVE_NO_SYMLINKS))  # AT_FDCWD
            _OPENAT2 = True
        except OSError:  # ENOSYS (before 5.6), EPERM/ENOSYS from a seccomp filter, E2BIG/EINVAL
            _OPENAT2 = False
    return _OPENAT2


def open_in_root(root_fd: int, path: str, walk: bool = False) -> int:
    """An O_PATH descriptor of `path` resolved inside `root_fd` (see the module doc).  Raises
    OSError: ELOOP for a symlink on the way, EXDEV for "..", ENOENT, EACCES...  `walk` forces
    the component-by-component route (tests run both)."""
    encoded = os.fsencode(path)
    if b".." in encoded.split(b"/"):  # openat2 would keep it inside root; the walk refuses it: both refuse
        raise OSError(errno.EXDEV, f"{path}: '..' in a mount point")
    if not walk and openat2_available():
        relative = encoded.lstrip(b"/") or b"."
        for _ in range(8):  # EAGAIN: a rename raced the lookup somewhere under root; retry
            try:
                return _openat2(root_fd, relative, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_SYMLINKS)
            except OSError as error:
                if error.errno != errno.EAGAIN:
                    raise
        raise OSError(errno.EAGAIN, f"{path}: the tree kept changing during lookup")
    fd = os.open(".", os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY, dir_fd=root_fd)
    try:
        for part in encoded.split(b"/"):
            if part in (b"", b"."):
                continue
            child = os.open(part, _O_PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise OSError(errno.ELOOP, f"{path}: a symlink on the way")
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True, slots=True)
class Reached:
    """What an O_PATH descriptor points at."""

    mode: int
    dev: tuple[int, int]
    mount_id: int | None  # None where statx cannot say (before 5.8, or no statx in libc)


def mount_of(fd: int) -> Reached:
    if _statx is not None:
        buf = ctypes.create_string_buffer(_STATX_SIZE)
        if _statx(fd, b"", _AT_EMPTY_PATH | _AT_SYMLINK_NOFOLLOW, _STATX_TYPE | _STATX_MNT_ID, buf) == 0:
            (mask,) = struct.unpack_from("=I", buf, _OFF_MASK)
            (mode,) = struct.unpack_from("=H", buf, _OFF_MODE)
            major, minor = struct.unpack_from("=II", buf, _OFF_DEV_MAJOR)
            (mount_id,) = struct.unpack_from("=Q", buf, _OFF_MNT_ID)
            return Reached(mode, (major, minor), mount_id if mask & _STATX_MNT_ID else None)
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EPERM):  # statx refused by a seccomp filter: fstat
            raise OSError(code, os.strerror(code))
    info = os.fstat(fd)
    return Reached(info.st_mode, (os.major(info.st_dev), os.minor(info.st_dev)), None)
