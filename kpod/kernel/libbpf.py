"""A thin, typed ctypes binding over libbpf.so.1: just what kpod's receivers need.

Objects are CO-RE `.bpf.o` files built by `make bpf`; libbpf relocates them against the
running kernel's BTF at load time, so nothing is compiled here and no kernel headers are read.

    obj = BpfObject.open("bpf/cpu_sched.bpf.o")
    obj.maps["sched_cgroups"].set_max_entries(4096)     # before load
    obj.programs["sched_switch"].set_autoload(False)     # optional program off
    obj.load()
    link = obj.programs["sched_switch"].attach()         # tracepoint / tp_btf / raw_tp
    for key, value in obj.maps["sched_cgroups"].lookup_batch(): ...
    obj.close()                                          # destroys links, frees maps

Errors from libbpf come back as `LibbpfError` (an OSError with errno set).  libbpf's own log
goes to the `kpod.libbpf` logger (warnings as WARNING, info and debug as DEBUG); the lines of
the latest failed load are kept on the exception, since the verifier's reason is in them.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterator
from ctypes import (
    POINTER,
    byref,
    c_bool,
    c_char_p,
    c_int,
    c_size_t,
    c_uint32,
    c_uint64,
    c_void_p,
)

log = logging.getLogger("kpod.libbpf")

LIBBPF_SONAME = "libbpf.so.1"

# enum bpf_map_type values we care about (uapi, stable).
BPF_MAP_TYPE_HASH = 1
BPF_MAP_TYPE_ARRAY = 2
BPF_MAP_TYPE_PERCPU_HASH = 5
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_LRU_HASH = 9
BPF_MAP_TYPE_LRU_PERCPU_HASH = 10
BPF_MAP_TYPE_RINGBUF = 27
BPF_MAP_TYPE_SK_STORAGE = 24
BPF_MAP_TYPE_INODE_STORAGE = 28
BPF_MAP_TYPE_TASK_STORAGE = 29
BPF_MAP_TYPE_CGRP_STORAGE = 32

# Local-storage maps hang their values off kernel objects: no keys to iterate, no max_entries.
LOCAL_STORAGE_TYPES = (
    BPF_MAP_TYPE_SK_STORAGE,
    BPF_MAP_TYPE_INODE_STORAGE,
    BPF_MAP_TYPE_TASK_STORAGE,
    BPF_MAP_TYPE_CGRP_STORAGE,
)

# Maps whose inserts need a free entry: the only ones a fill level means anything for.
HASH_TYPES = (
    BPF_MAP_TYPE_HASH,
    BPF_MAP_TYPE_PERCPU_HASH,
    BPF_MAP_TYPE_LRU_HASH,
    BPF_MAP_TYPE_LRU_PERCPU_HASH,
)

MAP_TYPE_NAMES = {
    BPF_MAP_TYPE_HASH: "hash",
    BPF_MAP_TYPE_ARRAY: "array",
    BPF_MAP_TYPE_PERCPU_HASH: "percpu_hash",
    BPF_MAP_TYPE_PERCPU_ARRAY: "percpu_array",
    BPF_MAP_TYPE_LRU_HASH: "lru_hash",
    BPF_MAP_TYPE_LRU_PERCPU_HASH: "lru_percpu_hash",
    BPF_MAP_TYPE_RINGBUF: "ringbuf",
    BPF_MAP_TYPE_SK_STORAGE: "sk_storage",
    BPF_MAP_TYPE_INODE_STORAGE: "inode_storage",
    BPF_MAP_TYPE_TASK_STORAGE: "task_storage",
    BPF_MAP_TYPE_CGRP_STORAGE: "cgrp_storage",
}

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2


# The kernel's internal "not supported" (linux/errno.h, not in user space's errno): what a
# fentry/fexit attach returns where the architecture has no BPF trampoline (arm64 before 6.4).
ENOTSUPP = 524


class LibbpfError(OSError):
    """A libbpf call failed.  `log_lines` holds what libbpf logged during the call, if anything."""

    def __init__(self, err: int, what: str, log_lines: list[str] | None = None) -> None:
        err = abs(err) or errno.EINVAL
        text = "not supported by this kernel (ENOTSUPP)" if err == ENOTSUPP else os.strerror(err)
        super().__init__(err, f"{what}: {text}")
        self.log_lines = log_lines or []


# --- loading the library -----------------------------------------------------------------

_PRINT_FN = ctypes.CFUNCTYPE(c_int, c_int, c_char_p, c_void_p)
LIBBPF_WARN, LIBBPF_INFO, LIBBPF_DEBUG = 0, 1, 2

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
# The C library this process already runs on (dlopen(NULL)): ctypes.util.find_library would run
# ldconfig in a child process and import subprocess, tempfile and shutil for it.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [c_char_p, c_size_t, c_char_p, c_void_p]
_libc.vsnprintf.restype = c_int

# libbpf logs through one process-wide callback; lines logged while a thread loads an object
# are also collected for that thread so a failed load can explain itself.
_capture = threading.local()


# va_list is a small struct passed by pointer on x86-64 (24 bytes) and arm64 (32 bytes), and
# va_copy is a plain copy there: a copy is consumed to measure, the original to format, so a
# verifier log of megabytes arrives whole without a huge standing buffer.
_VA_LIST_SIZE = 32


def _on_libbpf_print(level: int, fmt: bytes, args: int) -> int:
    ap_copy = ctypes.create_string_buffer(_VA_LIST_SIZE)
    ctypes.memmove(ap_copy, args, _VA_LIST_SIZE)
    needed = _libc.vsnprintf(None, 0, fmt, ctypes.addressof(ap_copy))
    buf = ctypes.create_string_buffer(max(needed, 0) + 1)
    _libc.vsnprintf(buf, len(buf), fmt, args)
    text = buf.value.decode(errors="replace").rstrip("\n")
    lines = getattr(_capture, "lines", None)
    if lines is not None:
        lines.append(text)
    log.log(logging.WARNING if level == LIBBPF_WARN else logging.DEBUG, "%s", text)
    return 0


_print_callback = _PRINT_FN(_on_libbpf_print)  # module-level: must outlive every call

# int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size)
_RINGBUF_FN = ctypes.CFUNCTYPE(c_int, c_void_p, c_void_p, c_size_t)


def _sig(lib: ctypes.CDLL, name: str, restype: object, *argtypes: object) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def lib() -> ctypes.CDLL:
    """libbpf.so.1 with argument types declared; raises LibbpfError if it is not installed."""
    global _lib
    with _lib_lock:
        if _lib is not None:
            return _lib
        try:
            handle = ctypes.CDLL(LIBBPF_SONAME, use_errno=True)
        except OSError as exc:
            raise LibbpfError(errno.ENOENT, f"{LIBBPF_SONAME} not found (apt install libbpf1)") from exc
        p = c_void_p
        _sig(handle, "libbpf_set_print", p, _PRINT_FN)
        _sig(handle, "libbpf_major_version", c_uint32)
        _sig(handle, "libbpf_minor_version", c_uint32)
        _sig(handle, "bpf_object__open_file", p, c_char_p, p)
        _sig(handle, "bpf_object__load", c_int, p)
        _sig(handle, "bpf_object__close", None, p)
        _sig(handle, "bpf_object__name", c_char_p, p)
        _sig(handle, "bpf_object__btf", p, p)
        _sig(handle, "bpf_object__next_program", p, p, p)
        _sig(handle, "bpf_object__next_map", p, p, p)
        _sig(handle, "bpf_program__name", c_char_p, p)
        _sig(handle, "bpf_program__section_name", c_char_p, p)
        _sig(handle, "bpf_program__set_autoload", c_int, p, c_bool)
        _sig(handle, "bpf_program__set_attach_target", c_int, p, c_int, c_char_p)
        _sig(handle, "bpf_map__set_autocreate", c_int, p, c_bool)
        _sig(handle, "bpf_program__autoload", c_bool, p)
        _sig(handle, "bpf_program__fd", c_int, p)
        _sig(handle, "bpf_program__attach", p, p)
        _sig(handle, "bpf_program__attach_perf_event", p, p, c_int)
        _sig(handle, "bpf_link__destroy", c_int, p)
        _sig(handle, "bpf_map__name", c_char_p, p)
        _sig(handle, "bpf_map__type", c_int, p)
        _sig(handle, "bpf_map__fd", c_int, p)
        _sig(handle, "bpf_map__max_entries", c_uint32, p)
        _sig(handle, "bpf_map__set_max_entries", c_int, p, c_uint32)
        _sig(handle, "bpf_map__set_type", c_int, p, c_int)
        _sig(handle, "bpf_map__set_map_flags", c_int, p, c_uint32)
        _sig(handle, "bpf_map__initial_value", p, p, POINTER(ctypes.c_size_t))
        _sig(handle, "bpf_map__reuse_fd", c_int, p, c_int)
        _sig(handle, "ring_buffer__new", p, c_int, _RINGBUF_FN, p, p)
        _sig(handle, "ring_buffer__consume", c_int, p)
        _sig(handle, "ring_buffer__free", None, p)
        _sig(handle, "bpf_map__key_size", c_uint32, p)
        _sig(handle, "bpf_map__value_size", c_uint32, p)
        _sig(handle, "bpf_map__btf_key_type_id", c_uint32, p)
        _sig(handle, "bpf_map__btf_value_type_id", c_uint32, p)
        _sig(handle, "bpf_map_lookup_elem", c_int, c_int, p, p)
        _sig(handle, "bpf_map_update_elem", c_int, c_int, p, p, c_uint64)
        _sig(handle, "bpf_map_delete_elem", c_int, c_int, p)
        _sig(handle, "bpf_map_get_next_key", c_int, c_int, p, p)
        _sig(handle, "bpf_map_lookup_batch", c_int, c_int, p, p, p, p, POINTER(c_uint32), p)
        _sig(handle, "bpf_map_delete_batch", c_int, c_int, p, POINTER(c_uint32), p)
        _sig(handle, "bpf_obj_get_info_by_fd", c_int, c_int, p, POINTER(c_uint32))
        _sig(handle, "bpf_prog_load", c_int, c_int, c_char_p, c_char_p, p, c_size_t, p)
        _sig(handle, "btf__load_vmlinux_btf", p)
        _sig(handle, "btf__free", None, p)
        _sig(handle, "btf__type_cnt", c_uint32, p)
        _sig(handle, "btf__type_by_id", p, p, c_uint32)
        _sig(handle, "btf__name_by_offset", c_char_p, p, c_uint32)
        _sig(handle, "btf__find_by_name_kind", c_int, p, c_char_p, c_uint32)
        handle.libbpf_set_print(_print_callback)
        _lib = handle
        return handle


def version() -> str:
    handle = lib()
    return f"{handle.libbpf_major_version()}.{handle.libbpf_minor_version()}"


def _errno_or(default: int = errno.EINVAL) -> int:
    return ctypes.get_errno() or default


class _Capture:
    """Collects libbpf's log lines on this thread for the duration of a call."""

    def __enter__(self) -> list[str]:
        self.previous = getattr(_capture, "lines", None)
        _capture.lines = []
        return _capture.lines

    def __exit__(self, *exc: object) -> None:
        _capture.lines = self.previous


# --- objects, programs, links --------------------------------------------------------------


class Link:
    """An attachment; `destroy` detaches it (idempotent)."""

    def __init__(self, ptr: int, what: str) -> None:
        self._ptr: int | None = ptr
        self.what = what

    def destroy(self) -> None:
        if self._ptr:
            lib().bpf_link__destroy(self._ptr)
            self._ptr = None

    @property
    def alive(self) -> bool:
        return self._ptr is not None


class Program:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self._ptr = ptr
        self.name: str = lib().bpf_program__name(ptr).decode()
        self.section: str = lib().bpf_program__section_name(ptr).decode()

    def set_autoload(self, autoload: bool) -> None:
        """Before load: a program with autoload off is neither verified nor loaded."""
        rc = lib().bpf_program__set_autoload(self._ptr, autoload)
        if rc:
            raise LibbpfError(rc, f"{self.name}: set_autoload")

    @property
    def autoload(self) -> bool:
        return bool(lib().bpf_program__autoload(self._ptr))

    def set_attach_target(self, function: str) -> None:
        """Before load: the kernel function a fentry/fexit program attaches to (not its section's)."""
        rc = lib().bpf_program__set_attach_target(self._ptr, 0, function.encode())
        if rc:
            raise LibbpfError(rc, f"{self.name}: set_attach_target({function})")

    @property
    def fd(self) -> int:
        if self._obj.closed:
            raise ValueError(f"program {self.name}: its object is closed")
        return lib().bpf_program__fd(self._ptr)

    def attach(self) -> Link:
        """Attach by section name (tracepoint/, tp_btf/, raw_tp/ ...); kept in the object's links."""
        with _Capture() as lines:
            ptr = lib().bpf_program__attach(self._ptr)
        if not ptr:
            raise LibbpfError(_errno_or(), f"attach {self.name} ({self.section})", lines)
        link = Link(ptr, self.section)
        self._obj.links.append(link)
        return link

    def attach_perf_event(self, perf_fd: int) -> Link:
        """Attach to an opened perf event.  On success libbpf owns perf_fd (closes it on destroy)."""
        with _Capture() as lines:
            ptr = lib().bpf_program__attach_perf_event(self._ptr, perf_fd)
        if not ptr:
            raise LibbpfError(_errno_or(), f"attach {self.name} to perf event", lines)
        link = Link(ptr, f"perf_event fd {perf_fd}")
        self._obj.links.append(link)
        return link


# Entries per BPF_MAP_LOOKUP_BATCH call at most; fewer where keys and values do not fit in the
# batch scratch buffer.
MAX_BATCH = 1024


class _BatchScratch:
    """The memory batch lookups write into, kept between reads and lent to one read at a time.

    Every cycle reads a dozen hash maps (bpf_maps counts them, the receivers read them).  A
    fresh zeroed buffer per read, for 1,024 entries of 240-byte values (histograms), is a
    240 KiB block, mmapped and faulted in each time (kpod.allocator sends blocks from 128 KiB
    up to mmap), and copying all of it out (`.raw`) made another: most of the CPU of reading
    a map of a few hundred entries.  A read that finds the buffer lent out (two collecting
    threads), or needs more than it holds, gets one of its own.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._free: ctypes.Array[ctypes.c_char] | None = None

    def take(self, size: int) -> ctypes.Array[ctypes.c_char]:
        if size <= self.size:
            with self._lock:
                free, self._free = self._free, None
            if free is not None:
                return free
        return ctypes.create_string_buffer(max(size, self.size))

    def give(self, buffer: ctypes.Array[ctypes.c_char]) -> None:
        if len(buffer) != self.size:
            return  # a larger one, for a bucket that did not fit: not kept
        with self._lock:
            self._free = buffer


# 64 KiB: keys and values of 256 histogram entries, of 1,024 counter entries.
_SCRATCH = _BatchScratch(64 * 1024)


def _split(raw: bytes, size: int) -> list[bytes]:
    """`raw` cut into consecutive pieces of `size` bytes."""
    return [raw[i : i + size] for i in range(0, len(raw), size)]


class Map:
    def __init__(self, obj: BpfObject, ptr: int) -> None:
        self._obj = obj
        self._ptr = ptr
        handle = lib()
        self.name: str = handle.bpf_map__name(ptr).decode()
        self.type: int = handle.bpf_map__type(ptr)
        self.key_size: int = handle.bpf_map__key_size(ptr)
        self.value_size: int = handle.bpf_map__value_size(ptr)
        self.btf_key_type_id: int = handle.bpf_map__btf_key_type_id(ptr)
        self.btf_value_type_id: int = handle.bpf_map__btf_value_type_id(ptr)

    @property
    def type_name(self) -> str:
        return MAP_TYPE_NAMES.get(self.type, str(self.type))

    @property
    def _live(self) -> int:
        """The map pointer, or ValueError once the object is closed (the pointer is freed then)."""
        if self._obj.closed:
            raise ValueError(f"map {self.name}: its object is closed")
        return self._ptr

    @property
    def max_entries(self) -> int:
        return lib().bpf_map__max_entries(self._live)

    def set_max_entries(self, n: int) -> None:
        """Only before load."""
        rc = lib().bpf_map__set_max_entries(self._live, n)
        if rc:
            raise LibbpfError(rc, f"{self.name}: set_max_entries({n})")

    def retype(self, map_type: int, max_entries: int, flags: int = 0) -> None:
        """Only before load: another map type with the same key and value (a fallback route,
        e.g. a task-storage map becoming a hash keyed by thread id where the kernel lacks it)."""
        handle = lib()
        for what, rc in (
            (f"set_type({map_type})", handle.bpf_map__set_type(self._live, map_type)),
            (f"set_map_flags({flags:#x})", handle.bpf_map__set_map_flags(self._live, flags)),
            (f"set_max_entries({max_entries})", handle.bpf_map__set_max_entries(self._live, max_entries)),
        ):
            if rc:
                raise LibbpfError(rc, f"{self.name}: {what}")
        self.type = map_type

    def set_autocreate(self, create: bool) -> None:
        """Before load: a map no loaded program uses need not exist (its type may not, here)."""
        rc = lib().bpf_map__set_autocreate(self._live, create)
        if rc:
            raise LibbpfError(rc, f"{self.name}: set_autocreate")

    def initial_value(self) -> ctypes.Array[ctypes.c_char]:
        """The bytes of an internal map (.rodata) as loading will write them; writable before load."""
        size = ctypes.c_size_t(0)
        addr = lib().bpf_map__initial_value(self._live, ctypes.byref(size))
        if not addr:
            raise LibbpfError(errno.EINVAL, f"{self.name}: no initial value (not a global data map?)")
        return (ctypes.c_char * size.value).from_address(addr)

    @property
    def fd(self) -> int:
        return lib().bpf_map__fd(self._live)

    def reuse_fd(self, fd: int) -> None:
        """Before load: this object uses the existing map `fd` (same type, key, value, size)
        instead of creating its own: two objects then share one kernel map."""
        rc = lib().bpf_map__reuse_fd(self._live, fd)
        if rc:
            raise LibbpfError(rc, f"{self.name}: reuse_fd({fd})")

    # Element access works on raw bytes; kpod.kernel.btflayout turns them into structs.

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self.value_size)
        rc = lib().bpf_map_lookup_elem(self.fd, key, value)
        if rc:
            if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
                return None
            raise LibbpfError(rc, f"{self.name}: lookup")
        return value.raw

    def update(self, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
        rc = lib().bpf_map_update_elem(self.fd, key, value, flags)
        if rc:
            raise LibbpfError(rc, f"{self.name}: update")

    def delete(self, key: bytes) -> bool:
        rc = lib().bpf_map_delete_elem(self.fd, key)
        if rc:
            if -rc == errno.ENOENT:
                return False
            raise LibbpfError(rc, f"{self.name}: delete")
        return True

    def keys(self) -> Iterator[bytes]:
        """Iterate keys with get_next_key (one syscall per key; entries may change meanwhile)."""
        handle = lib()
        current = ctypes.create_string_buffer(self.key_size)
        nxt = ctypes.create_string_buffer(self.key_size)
        first = True
        while True:
            rc = handle.bpf_map_get_next_key(self.fd, None if first else current, nxt)
            if rc:
                if -rc == errno.ENOENT:
                    return
                raise LibbpfError(rc, f"{self.name}: get_next_key")
            first = False
            yield nxt.raw
            ctypes.memmove(current, nxt, self.key_size)

    @property
    def countable(self) -> bool:
        """False for local-storage maps (userspace cannot iterate them and they have no capacity)
        and ring buffers (a byte queue, no entries)."""
        return self.type not in LOCAL_STORAGE_TYPES and self.type != BPF_MAP_TYPE_RINGBUF

    @property
    def can_fill(self) -> bool:
        """True for maps that lose data once full: hash maps, whose inserts fail (or, LRU, evict)
        when every entry is taken.  Arrays preallocate every slot and are updated in place, so
        no update can fail for lack of room; local storage hangs off kernel objects."""
        return self.type in HASH_TYPES

    @property
    def fill_reason(self) -> str | None:
        """Why the map has no fill level (None when it has one)."""
        if self.can_fill:
            return None
        if self.type in LOCAL_STORAGE_TYPES:
            return f"{self.type_name}: values live on kernel objects, no capacity to run out of"
        if self.type in (BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY):
            return f"{self.type_name}: every slot is preallocated, an update never runs out of room"
        return f"{self.type_name}: no fill level"

    def count(self) -> int | None:
        """Entries in use, for maps that can fill (hash maps); None for the others (see can_fill).

        Hash and LRU hash maps are counted with BPF_MAP_LOOKUP_BATCH, a syscall per batch where
        get_next_key takes one per entry (bpf_maps counts every map each cycle); per-CPU hashes
        (one value per possible CPU) walk their keys."""
        if not self.can_fill:
            return None
        if self.type in (BPF_MAP_TYPE_HASH, BPF_MAP_TYPE_LRU_HASH):
            return sum(count for _, _, count in self._batches(MAX_BATCH))
        return sum(1 for _ in self.keys())

    def lookup_batch(self, chunk: int = MAX_BATCH) -> list[tuple[bytes, bytes]]:
        """All (key, value) pairs via BPF_MAP_LOOKUP_BATCH, at most `chunk` entries per syscall.

        Hash maps only (per-CPU maps return one value per possible CPU: not handled here).
        """
        ks, vs = self.key_size, self.value_size
        out: list[tuple[bytes, bytes]] = []
        for keys, values, count in self._batches(chunk):
            # Only the entries the kernel wrote: the buffers are larger than most batches.
            raw_k = ctypes.string_at(keys, count * ks)
            raw_v = ctypes.string_at(values, count * vs)
            out.extend(zip(_split(raw_k, ks), _split(raw_v, vs), strict=True))
        return out

    def _batches(self, chunk: int) -> Iterator[tuple[int, int, int]]:
        """(address of the keys, address of the values, entries there) of each
        BPF_MAP_LOOKUP_BATCH call, to the map's end.  The memory is reused by the next call:
        read it before asking for the next batch."""
        handle = lib()
        ks, vs = self.key_size, self.value_size
        chunk = max(1, min(chunk, _SCRATCH.size // (ks + vs)))
        buffer = _SCRATCH.take(chunk * (ks + vs))
        # The batch cursor is opaque; for hash maps the kernel uses a u32 bucket index.
        in_batch = ctypes.create_string_buffer(max(ks, 8))
        out_batch = ctypes.create_string_buffer(max(ks, 8))
        first = True
        try:
            while True:
                keys = ctypes.addressof(buffer)
                values = keys + chunk * ks
                count = c_uint32(chunk)
                rc = handle.bpf_map_lookup_batch(
                    self.fd, None if first else in_batch, out_batch, keys, values, byref(count), None
                )
                err = -rc if rc else 0
                if rc and err != errno.ENOENT:
                    if err == errno.ENOSPC and chunk < (1 << 20):
                        # The next bucket holds more entries than the buffer (the kernel copied
                        # nothing and kept the cursor): the same call again with a bigger one.
                        chunk *= 4
                        _SCRATCH.give(buffer)
                        buffer = _SCRATCH.take(chunk * (ks + vs))
                        continue
                    raise LibbpfError(rc, f"{self.name}: lookup_batch")
                yield keys, values, count.value
                if err == errno.ENOENT:  # no more entries
                    return
                ctypes.memmove(in_batch, out_batch, len(out_batch))
                first = False
        finally:
            _SCRATCH.give(buffer)

    def delete_batch(self, keys: list[bytes]) -> int:
        """Delete keys with BPF_MAP_DELETE_BATCH; returns how many were deleted.

        The kernel stops at the first key that is missing (ENOENT); the rest are then deleted
        one by one, since a key deleted meanwhile by someone else is not an error for us.
        """
        if not keys:
            return 0
        buf = b"".join(keys)
        count = c_uint32(len(keys))
        rc = lib().bpf_map_delete_batch(self.fd, buf, byref(count), None)
        if rc == 0:
            return count.value
        if -rc != errno.ENOENT:
            raise LibbpfError(rc, f"{self.name}: delete_batch")
        done = count.value
        for key in keys[done + 1 :]:
            done += self.delete(key)
        return done


class RingBuffer:
    """A consumer of a BPF_MAP_TYPE_RINGBUF map: `consume()` hands every record waiting to
    `on_record(bytes)` without blocking, and returns how many there were.  Not thread-safe:
    one consumer."""

    def __init__(self, map_fd: int, on_record: Callable[[bytes], None]) -> None:
        self._on_record = on_record
        self._callback = _RINGBUF_FN(self._sample)  # kept: libbpf calls it until free
        self._ptr: int | None = lib().ring_buffer__new(map_fd, self._callback, None, None)
        if not self._ptr:
            raise LibbpfError(_errno_or(), f"ring_buffer__new(fd {map_fd})")

    def _sample(self, ctx: int, data: int, size: int) -> int:
        self._on_record(ctypes.string_at(data, size))
        return 0

    def consume(self) -> int:
        if not self._ptr:
            return 0
        rc = lib().ring_buffer__consume(self._ptr)
        if rc < 0:
            raise LibbpfError(rc, "ring_buffer__consume")
        return rc

    def close(self) -> None:
        if self._ptr:
            lib().ring_buffer__free(self._ptr)
            self._ptr = None


class BpfObject:
    """An opened (then loaded) BPF object file.  `close` is idempotent and destroys links."""

    def __init__(self, ptr: int, path: str) -> None:
        self._ptr: int | None = ptr
        self.path = path
        self.links: list[Link] = []
        self.loaded = False
        handle = lib()
        self.name: str = handle.bpf_object__name(ptr).decode()
        self.programs: dict[str, Program] = {}
        prog = handle.bpf_object__next_program(ptr, None)
        while prog:
            program = Program(self, prog)
            self.programs[program.name] = program
            prog = handle.bpf_object__next_program(ptr, prog)
        self.maps: dict[str, Map] = {}
        mp = handle.bpf_object__next_map(ptr, None)
        while mp:
            bpf_map = Map(self, mp)
            self.maps[bpf_map.name] = bpf_map
            mp = handle.bpf_object__next_map(ptr, mp)

    @classmethod
    def open(cls, path: str) -> BpfObject:
        with _Capture() as lines:
            ptr = lib().bpf_object__open_file(path.encode(), None)
        if not ptr:
            raise LibbpfError(_errno_or(errno.ENOENT), f"open {path}", lines)
        return cls(ptr, path)

    @property
    def btf_ptr(self) -> int:
        """The object's `struct btf *` (owned by the object; valid until close)."""
        if not self._ptr:
            raise ValueError(f"{self.path}: object is closed")
        return lib().bpf_object__btf(self._ptr) or 0

    def load(self) -> None:
        if not self._ptr:
            raise ValueError(f"{self.path}: object is closed")
        with _Capture() as lines:
            rc = lib().bpf_object__load(self._ptr)
        if rc:
            raise LibbpfError(rc, f"load {os.path.basename(self.path)}", lines)
        self.loaded = True

    def destroy_links(self) -> None:
        for link in self.links:
            link.destroy()
        self.links.clear()

    def close(self) -> None:
        self.destroy_links()
        if self._ptr:
            lib().bpf_object__close(self._ptr)
            self._ptr = None
            self.loaded = False

    @property
    def closed(self) -> bool:
        return self._ptr is None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- a trivial program ------------------------------------------------------------------------

BPF_PROG_TYPE_TRACEPOINT = 5
# r0 = 0; exit: struct bpf_insn {u8 code; u8 dst:4, src:4; s16 off; s32 imm}, 8 bytes each.
_TRIVIAL_INSNS = bytes.fromhex("b7 00 0000 00000000  95 00 0000 00000000")


def load_trivial_program() -> None:
    """Load and close "return 0" as a tracepoint program: the bpf() call the agent's programs
    need (CAP_BPF and CAP_PERFMON for a tracing type), with nothing that can fail to verify.
    Raises LibbpfError with the errno of the refusal."""
    insns = ctypes.create_string_buffer(_TRIVIAL_INSNS, len(_TRIVIAL_INSNS))
    fd = lib().bpf_prog_load(BPF_PROG_TYPE_TRACEPOINT, b"kpod_probe", b"GPL", insns, len(_TRIVIAL_INSNS) // 8, None)
    if fd < 0:
        raise LibbpfError(fd, "bpf(BPF_PROG_LOAD) of a trivial tracepoint program")
    os.close(fd)


# --- perf events ----------------------------------------------------------------------------

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_PAGE_FAULTS_MAJ = 6
PERF_FLAG_FD_CLOEXEC = 1 << 3
_NR_PERF_EVENT_OPEN = {"x86_64": 298, "aarch64": 241}


class PerfEventAttr(ctypes.Structure):
    """The first 64 bytes of struct perf_event_attr (PERF_ATTR_SIZE_VER0, a frozen ABI).

    The kernel accepts this older, shorter size and zero-fills the rest; flags stay 0, so the
    event starts enabled.
    """

    _fields_ = (
        ("type", c_uint32),
        ("size", c_uint32),
        ("config", c_uint64),
        ("sample_period", c_uint64),
        ("sample_type", c_uint64),
        ("read_format", c_uint64),
        ("flags", c_uint64),
        ("wakeup_events", c_uint32),
        ("bp_type", c_uint32),
        ("config1", c_uint64),
    )


def perf_event_open(type_: int, config: int, cpu: int, sample_period: int = 1, pid: int = -1) -> int:
    """perf_event_open(2) for one CPU (pid -1: every task on that CPU).  Returns the fd."""
    nr = _NR_PERF_EVENT_OPEN.get(platform.machine())
    if nr is None:
        raise LibbpfError(errno.ENOSYS, f"perf_event_open: unknown syscall number on {platform.machine()}")
    attr = PerfEventAttr(type=type_, size=ctypes.sizeof(PerfEventAttr), config=config, sample_period=sample_period)
    syscall = _libc.syscall
    syscall.restype = ctypes.c_long
    fd = syscall(
        ctypes.c_long(nr), byref(attr), c_int(pid), c_int(cpu), c_int(-1), ctypes.c_ulong(PERF_FLAG_FD_CLOEXEC)
    )
    if fd < 0:
        raise LibbpfError(ctypes.get_errno(), f"perf_event_open(type={type_}, config={config}, cpu={cpu})")
    return int(fd)


def online_cpus(path: str = "/sys/devices/system/cpu/online") -> list[int]:
    """Parse a CPU list like "0-3,5" (the format of /sys/devices/system/cpu/online)."""
    with open(path) as f:
        text = f.read().strip()
    cpus: list[int] = []
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_NOEXIST",
    "BpfObject",
    "LibbpfError",
    "Link",
    "Map",
    "PerfEventAttr",
    "Program",
    "lib",
    "load_trivial_program",
    "online_cpus",
    "perf_event_open",
    "version",
]
