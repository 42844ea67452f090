"""The messages between the agent and its statfs worker: fixed-size binary frames on two pipes.

A request names the mount to measure as the process's root (<proc_root>/<pid>/root), the mount
point inside it and what mountinfo says the mount is (its id and device), plus the pod it is
counted for.  An answer carries the request's id, an outcome, an errno and the statvfs figures.
Paths travel as bytes (os.fsencode), so names that are not UTF-8 reach the kernel unchanged.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

# payload length, request id, mount id (0: unknown), device major, minor, pod number
_REQUEST = struct.Struct("=IQQIII")
# request id, outcome, errno, f_blocks, f_bfree, f_bavail, f_frsize
_ANSWER = struct.Struct("=QiiQQQQ")
ANSWER_SIZE = _ANSWER.size
MAX_PAYLOAD = 16384  # two paths; PATH_MAX is 4096

# Outcomes.
MEASURED = 0  # the mount, a directory: figures follow
NOT_A_DIRECTORY = 1  # the mount, but a bind-mounted file (or socket, device): not a filesystem
NOT_THE_MOUNT = 2  # the path leads elsewhere (a symlink on the way, overmounted): not reported
FAILED = 3  # errno says why
STUCK = 4  # still running past its deadline; a LATE answer follows if it ever returns
STUCK_LIMIT = 5  # not run: its pod has as many stuck probes as it may (or the worker is full)
CANCELLED = 6  # not run: a CANCEL came first (the agent gave up on it; a new cycle has begun)
LATE = 0x100  # or'ed into the outcome of an answer to a request already answered STUCK


# A request with this id is no probe: it cancels every request still queued (not yet running).
CANCEL_ID = 0


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    root: str
    mount_point: str
    mount_id: int
    dev: tuple[int, int]
    group: int


@dataclass(frozen=True, slots=True)
class Answer:
    id: int
    outcome: int
    errno: int = 0
    blocks: int = 0
    bfree: int = 0
    bavail: int = 0
    frsize: int = 0

    @property
    def late(self) -> bool:
        return bool(self.outcome & LATE)


def encode_cancel() -> bytes:
    return encode_request(Request(CANCEL_ID, "", "", 0, (0, 0), 0))


def encode_request(request: Request) -> bytes:
    return request_frame(request.id, request.root, request.mount_point, request.mount_id, request.dev, request.group)


def request_frame(rid: int, root: str, mount_point: str, mount_id: int, dev: tuple[int, int], group: int) -> bytes:
    """encode_request of the request with these fields, without making the Request."""
    payload = _paths(root, mount_point)
    return _REQUEST.pack(len(payload), rid, mount_id, dev[0], dev[1], group) + payload


@functools.lru_cache(maxsize=4096)
def _paths(root: str, mount_point: str) -> bytes:
    """A request's two paths as bytes: the same mounts are asked about every cycle."""
    payload = os.fsencode(root) + b"\0" + os.fsencode(mount_point)
    if len(payload) > MAX_PAYLOAD:
        raise ValueError("mount point path too long")
    return payload


def decode_requests(buffer: bytearray) -> list[Request]:
    """The complete requests at the start of `buffer`, removed from it.  Raises ValueError on a
    frame that cannot be one (the pipe is the agent's own: that is a bug, not an input)."""
    out: list[Request] = []
    offset = 0
    while len(buffer) - offset >= _REQUEST.size:
        length, rid, mount_id, major, minor, group = _REQUEST.unpack_from(buffer, offset)
        if length > MAX_PAYLOAD:
            raise ValueError(f"request frame of {length} bytes")
        end = offset + _REQUEST.size + length
        if len(buffer) < end:
            break
        root, sep, point = bytes(buffer[offset + _REQUEST.size : end]).partition(b"\0")
        if not sep:
            raise ValueError("request frame without its separator")
        out.append(Request(rid, os.fsdecode(root), os.fsdecode(point), mount_id, (major, minor), group))
        offset = end
    del buffer[:offset]
    return out


def encode_answer(answer: Answer) -> bytes:
    return _ANSWER.pack(answer.id, answer.outcome, answer.errno, answer.blocks, answer.bfree, answer.bavail,
                        answer.frsize)  # fmt: skip


def decode_answers(buffer: bytearray) -> list[Answer]:
    """The complete answers at the start of `buffer`, removed from it."""
    return [Answer(*fields) for fields in decode_answer_fields(buffer)]


def decode_answer_fields(buffer: bytearray) -> list[tuple[int, int, int, int, int, int, int]]:
    """decode_answers as tuples of the Answer fields, in their order (no object per answer: the
    agent reads a few hundred per cycle)."""
    count = len(buffer) // ANSWER_SIZE
    out = list(_ANSWER.iter_unpack(buffer[: count * ANSWER_SIZE])) if count else []  # a copy: then resized
    del buffer[: count * ANSWER_SIZE]
    return out
