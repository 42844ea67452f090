"""Cgroup paths of any length.

A pod with cgroup delegation can nest cgroups as deep as it likes: 25 levels of 200-character
names make a path past PATH_MAX (4096 bytes), where open() and stat() fail with ENAMETOOLONG.
Such a chain used to vanish without a word (no series, no error).  `open_long` reaches any
depth by opening a directory at most PATH_MAX - 1 bytes down and going on from there with
openat (every component is at most NAME_MAX, 255 bytes, so the path always splits); the
usual short path costs one os.open as before.
"""

from __future__ import annotations

import errno
import os

# Bytes of a path the kernel resolves in one call, with room for the terminating NUL.
PATH_LIMIT = 4095


def open_long(path: str, flags: int) -> int:
    """os.open(path, flags | O_CLOEXEC) for an absolute path of any length.  Raises OSError."""
    encoded = os.fsencode(path)
    if len(encoded) <= PATH_LIMIT:
        return os.open(encoded, flags | os.O_CLOEXEC)
    parts = encoded.split(b"/")
    chunks: list[bytes] = []
    chunk = b""
    for part in parts[1:]:
        if len(part) > 255:
            raise OSError(errno.ENAMETOOLONG, "a path component longer than NAME_MAX", path)
        candidate = chunk + b"/" + part if chunk else part
        if len(candidate) + 1 > PATH_LIMIT:
            chunks.append(chunk)
            chunk = part
        else:
            chunk = candidate
    chunks.append(chunk)
    fd = os.open(b"/" + chunks[0], os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for middle in chunks[1:-1]:
            child = os.open(middle, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(chunks[-1], flags | os.O_CLOEXEC, dir_fd=fd)
    finally:
        os.close(fd)


def is_dir(path: str) -> bool:
    """os.path.isdir for paths of any length."""
    try:
        fd = open_long(path, os.O_PATH | os.O_DIRECTORY)
    except OSError:
        return False
    os.close(fd)
    return True


def exists(path: str) -> bool:
    """os.path.exists for paths of any length."""
    try:
        fd = open_long(path, os.O_PATH)
    except OSError:
        return False
    os.close(fd)
    return True
