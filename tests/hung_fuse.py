"""A pod with a FUSE mount whose server reads STATFS requests and never answers them.

    python tests/hung_fuse.py DIR [DIR...]

Runs as a "pod" process: it moves itself into a private mount namespace (unshare), mounts a
tmpfs on the first DIR (a healthy volume of the same pod) and a raw /dev/fuse filesystem on
each other one, prints "ready" and serves the FUSE connections: INIT and GETATTR of the root
are answered, STATFS is read (so the kernel has sent it: the caller waits uninterruptibly, see
fs/fuse/dev.c request_wait_answer) and held.  A line "release DIR" on stdin answers the held
STATFS requests of DIR's mount and every later one; EOF on stdin, or the process's death,
closes /dev/fuse, which aborts the connections (the waiters get ENOTCONN) and, with the
namespace, the mounts.

A few dozen lines of the FUSE protocol (linux/fuse.h, protocol 7.31), no libfuse.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
import sys
import threading

CLONE_NEWNS = 0x00020000
MS_REC, MS_PRIVATE = 0x4000, 1 << 18
FUSE_LOOKUP, FUSE_GETATTR, FUSE_STATFS, FUSE_INIT, FUSE_INTERRUPT, FUSE_DESTROY = 1, 3, 17, 26, 36, 38
IN_HEADER = struct.Struct("=IIQQIIIHH")  # len, opcode, unique, nodeid, uid, gid, pid, extlen, padding
OUT_HEADER = struct.Struct("=IiQ")  # len, error, unique
ENOENT, ENOSYS = 2, 38

libc = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        raise OSError(ctypes.get_errno(), f"{what}: {os.strerror(ctypes.get_errno())}")


def mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    check(libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags), data.encode()),
          f"mount {fstype} on {target}")  # fmt: skip


def reply(fd: int, unique: int, error: int = 0, body: bytes = b"") -> None:
    os.write(fd, OUT_HEADER.pack(OUT_HEADER.size + len(body), -error, unique) + body)


def root_attr() -> bytes:
    # fuse_attr_out: attr_valid (1 h: no GETATTR again), nsec, dummy, then fuse_attr.
    attr = struct.pack("=QQQQQQIIIIIIIIII", 1, 0, 0, 0, 0, 0, 0, 0, 0, 0o40755, 2, 0, 0, 0, 4096, 0)
    return struct.pack("=QII", 3600, 0, 0) + attr


def statfs_out() -> bytes:
    # fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
    return struct.pack("=QQQQQIIII6I", 1000, 600, 500, 100, 50, 4096, 255, 4096, 0, *([0] * 6))


class Server:
    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.held: list[int] = []
        self.released = False
        self.lock = threading.Lock()

    def release(self) -> None:
        with self.lock:
            self.released = True
            held, self.held = self.held, []
        for unique in held:
            reply(self.fd, unique, body=statfs_out())

    def serve(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 1 << 17)
            except OSError:
                return  # ENODEV: unmounted / aborted
            length, opcode, unique, nodeid, *_ = IN_HEADER.unpack_from(data)
            body = data[IN_HEADER.size : length]
            if opcode == FUSE_INIT:
                (readahead,) = struct.unpack_from("=I", body, 8)  # fuse_init_in: major, minor, max_readahead
                # fuse_init_out (64 bytes): 7.31, no feature flags, max_write 4096, time_gran 1.
                out = struct.pack("=IIIIHHIIHHI7I", 7, 31, readahead, 0, 0, 0, 4096, 1, 0, 0, 0, *([0] * 7))
                reply(self.fd, unique, body=out)
            elif opcode == FUSE_GETATTR and nodeid == 1:
                reply(self.fd, unique, body=root_attr())
            elif opcode == FUSE_STATFS:
                with self.lock:
                    if not self.released:
                        self.held.append(unique)  # read, never answered: the caller hangs
                        continue
                reply(self.fd, unique, body=statfs_out())
            elif opcode in (FUSE_INTERRUPT, FUSE_DESTROY):
                continue  # no reply to these
            else:
                reply(self.fd, unique, ENOENT if opcode == FUSE_LOOKUP else ENOSYS)


def main(directories: list[str]) -> None:
    check(libc.unshare(CLONE_NEWNS), "unshare")
    mount("none", "/", "", MS_REC | MS_PRIVATE, "")  # nothing we mount leaks to the host
    mount("kpodh", directories[0], "tmpfs", 0, "size=4m")
    servers = {}
    for directory in directories[1:]:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        mount("kpodh", directory, "fuse.kpodh", 0, f"fd={fd},rootmode=40000,user_id=0,group_id=0")
        servers[directory] = Server(fd)
        threading.Thread(target=servers[directory].serve, daemon=True).start()
    print("ready", flush=True)
    while True:
        select.select([sys.stdin], [], [])
        line = sys.stdin.readline()
        if not line:
            os._exit(0)  # closes /dev/fuse: the connection aborts, waiters get ENOTCONN
        command, _, directory = line.rstrip("\n").partition(" ")
        if command == "release":
            servers[directory].release()
            print("released", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
