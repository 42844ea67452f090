"""Python's view of BPF structs, derived from BTF: the C source is the one source of truth.

A map's key and value types are recorded in the object's BTF (`__type(key, ...)` in the map
definition).  `ctype_of(btf, type_id)` turns such a type into a ctypes type whose size and
member offsets are exactly BTF's: members are placed at their BTF byte offsets with explicit
padding (`_pack_ = 1`), so ctypes' own alignment rules never decide anything.  Bitfields are
covered by padding (readers here never need them).

The same builder lays out kernel uapi structs from the running kernel's BTF
(`vmlinux_struct("bpf_prog_info")`), so `bpf_obj_get_info_by_fd` needs no hand-copied struct.

tests/test_bpf_layout.py checks every map struct of every object against bpftool's dump of the
object's BTF (an independent parser).
"""

from __future__ import annotations

import ctypes
import struct
import threading
from collections.abc import Callable
from ctypes import c_uint32
from dataclasses import dataclass
from typing import Any

from kpod.kernel import libbpf

# BTF kinds (include/uapi/linux/btf.h).
KIND_INT, KIND_PTR, KIND_ARRAY, KIND_STRUCT, KIND_UNION, KIND_ENUM = 1, 2, 3, 4, 5, 6
KIND_FWD, KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT = 7, 8, 9, 10, 11
KIND_FUNC, KIND_FUNC_PROTO, KIND_VAR, KIND_DATASEC, KIND_FLOAT = 12, 13, 14, 15, 16
KIND_DECL_TAG, KIND_TYPE_TAG, KIND_ENUM64 = 17, 18, 19

_MODIFIERS = (KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG)
BTF_INT_SIGNED, BTF_INT_BOOL = 1, 4


class _BtfType(ctypes.Structure):
    _fields_ = (("name_off", c_uint32), ("info", c_uint32), ("size_or_type", c_uint32))


class _BtfMember(ctypes.Structure):
    _fields_ = (("name_off", c_uint32), ("type", c_uint32), ("offset", c_uint32))


class _BtfArray(ctypes.Structure):
    _fields_ = (("type", c_uint32), ("index_type", c_uint32), ("nelems", c_uint32))


class _BtfParam(ctypes.Structure):
    _fields_ = (("name_off", c_uint32), ("type", c_uint32))


# Names of the padding members the builder adds; real C members never start with this.
PAD_PREFIX = "__kpod_pad"


class LayoutError(Exception):
    """A BTF type is missing or does not have the shape the Python side needs."""


@dataclass(frozen=True)
class BtfMember:
    name: str
    type_id: int
    bit_offset: int
    bitfield_size: int  # 0 unless a bitfield


@dataclass(frozen=True)
class BtfTypeInfo:
    id: int
    kind: int
    name: str
    size_or_type: int
    vlen: int
    kflag: bool
    members: tuple[BtfMember, ...] = ()
    array: tuple[int, int] | None = None  # (element type id, nelems)
    int_encoding: int = 0
    int_bits: int = 0
    params: tuple[int, ...] = ()  # FUNC_PROTO parameter type ids
    enumerators: tuple[tuple[str, int], ...] = ()
    section_vars: tuple[tuple[int, int, int], ...] = ()  # DATASEC: (VAR type id, offset, size)


class Btf:
    """Read access to a `struct btf *`: an object's (owned by the object), or one we own
    (`owned=True`, the kernel's), freed when the last Python reference to it goes."""

    def __init__(self, ptr: int, owned: bool = False) -> None:
        if not ptr:
            raise LayoutError("no BTF (object built without -g?)")
        self.ptr = ptr
        self.owned = owned
        self._lib = libbpf.lib()
        self._ctypes: dict[int, Any] = {}

    def __del__(self) -> None:
        if getattr(self, "owned", False) and self.ptr:
            self._lib.btf__free(self.ptr)
            self.ptr = 0

    def name(self, off: int) -> str:
        raw = self._lib.btf__name_by_offset(self.ptr, off)
        return raw.decode() if raw else ""

    def type(self, type_id: int) -> BtfTypeInfo:
        addr = self._lib.btf__type_by_id(self.ptr, type_id)
        if not addr:
            raise LayoutError(f"BTF type id {type_id} does not exist")
        t = _BtfType.from_address(addr)
        kind = (t.info >> 24) & 0x1F
        vlen = t.info & 0xFFFF
        kflag = bool(t.info >> 31)
        tail = addr + ctypes.sizeof(_BtfType)
        info: dict[str, Any] = {}
        if kind == KIND_INT:
            enc = ctypes.c_uint32.from_address(tail).value
            info["int_encoding"] = (enc >> 24) & 0x0F
            info["int_bits"] = enc & 0xFF
        elif kind == KIND_ARRAY:
            arr = _BtfArray.from_address(tail)
            info["array"] = (arr.type, arr.nelems)
        elif kind in (KIND_STRUCT, KIND_UNION):
            members = []
            for i in range(vlen):
                m = _BtfMember.from_address(tail + i * ctypes.sizeof(_BtfMember))
                if kflag:
                    bit_offset, bitfield_size = m.offset & 0xFFFFFF, m.offset >> 24
                else:
                    bit_offset, bitfield_size = m.offset, 0
                members.append(BtfMember(self.name(m.name_off), m.type, bit_offset, bitfield_size))
            info["members"] = tuple(members)
        elif kind == KIND_ENUM:
            values = []
            for i in range(vlen):
                pairs = (ctypes.c_uint32 * 2).from_address(tail + 8 * i)
                raw = pairs[1]
                values.append((self.name(pairs[0]), raw - (1 << 32) if kflag and raw >> 31 else raw))
            info["enumerators"] = tuple(values)
        elif kind == KIND_ENUM64:
            values = []
            for i in range(vlen):
                triple = (ctypes.c_uint32 * 3).from_address(tail + 12 * i)
                values.append((self.name(triple[0]), triple[1] | (triple[2] << 32)))
            info["enumerators"] = tuple(values)
        elif kind == KIND_DATASEC:
            # struct btf_var_secinfo { __u32 type, offset, size; }: the section's variables.
            info["section_vars"] = tuple(
                tuple((ctypes.c_uint32 * 3).from_address(tail + 12 * i)) for i in range(vlen)
            )
        elif kind == KIND_FUNC_PROTO:
            info["params"] = tuple(
                _BtfParam.from_address(tail + i * ctypes.sizeof(_BtfParam)).type for i in range(vlen)
            )
        return BtfTypeInfo(type_id, kind, self.name(t.name_off), t.size_or_type, vlen, kflag, **info)

    def find(self, name: str, kind: int) -> int:
        """The id of the named type of that kind, or 0."""
        type_id = self._lib.btf__find_by_name_kind(self.ptr, name.encode(), kind)
        return type_id if type_id > 0 else 0

    def section_variables(self, section: str) -> dict[str, tuple[int, int]]:
        """{variable: (offset, size)} of a data section (".rodata"), or {} if there is none."""
        type_id = self.find(section, KIND_DATASEC)
        if not type_id:
            return {}
        return {self.type(var).name: (offset, size) for var, offset, size in self.type(type_id).section_vars}

    def enum(self, name: str) -> dict[str, int]:
        """The enumerators of a named enum (constants C shares with Python), or {}."""
        type_id = self.find(name, KIND_ENUM) or self.find(name, KIND_ENUM64)
        return dict(self.type(type_id).enumerators) if type_id else {}

    def resolve(self, type_id: int) -> BtfTypeInfo:
        """Skip typedefs and qualifiers."""
        t = self.type(type_id)
        while t.kind in _MODIFIERS:
            t = self.type(t.size_or_type)
        return t

    def size_of(self, type_id: int) -> int:
        t = self.resolve(type_id)
        if t.kind in (KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT):
            return t.size_or_type
        if t.kind == KIND_PTR:
            return 8  # BPF and every 64-bit kernel we run on
        if t.kind == KIND_ARRAY and t.array:
            return self.size_of(t.array[0]) * t.array[1]
        raise LayoutError(f"BTF type {t.name or t.id} (kind {t.kind}) has no size")

    def type_name(self, type_id: int) -> str:
        """A C-ish spelling of a type, for messages and signature checks ("struct task_struct *")."""
        t = self.type(type_id) if type_id else None
        if t is None:
            return "void"
        if t.kind == KIND_PTR:
            return self.type_name(t.size_or_type) + " *"
        if t.kind in (KIND_STRUCT, KIND_UNION):
            return ("struct " if t.kind == KIND_STRUCT else "union ") + (t.name or "(anon)")
        if t.kind in (KIND_CONST, KIND_VOLATILE, KIND_RESTRICT, KIND_TYPE_TAG):
            return self.type_name(t.size_or_type)
        if t.kind == KIND_ARRAY and t.array:
            return f"{self.type_name(t.array[0])}[{t.array[1]}]"
        return t.name or f"(kind {t.kind})"

    # -- ctypes ----------------------------------------------------------------------------

    def ctype(self, type_id: int) -> Any:
        """A ctypes type with exactly the BTF type's size and member offsets."""
        cached = self._ctypes.get(type_id)
        if cached is None:
            cached = self._build(type_id)
            self._ctypes[type_id] = cached
        return cached

    def _build(self, type_id: int) -> Any:
        t = self.type(type_id)
        if t.kind in _MODIFIERS:
            return self.ctype(t.size_or_type)
        if t.kind == KIND_INT:
            return _int_ctype(t)
        if t.kind in (KIND_ENUM, KIND_ENUM64):
            return _INTS[(t.size_or_type, t.kflag)]
        if t.kind == KIND_PTR:
            return ctypes.c_uint64
        if t.kind == KIND_FLOAT:
            return {4: ctypes.c_float, 8: ctypes.c_double}.get(t.size_or_type, ctypes.c_uint8 * t.size_or_type)
        if t.kind == KIND_ARRAY and t.array:
            elem, n = t.array
            return self.ctype(elem) * n
        if t.kind in (KIND_STRUCT, KIND_UNION):
            return self._build_record(t)
        raise LayoutError(f"BTF type {t.name or t.id}: kind {t.kind} has no data layout")

    def _build_record(self, t: BtfTypeInfo) -> Any:
        is_union = t.kind == KIND_UNION
        base = ctypes.Union if is_union else ctypes.Structure
        fields: list[tuple[str, Any]] = []
        anonymous: list[str] = []
        pos = 0
        for i, m in enumerate(t.members):
            if m.bitfield_size or m.bit_offset % 8:
                continue  # bitfields: left to padding
            member_type = self.resolve(m.type_id)
            if member_type.kind == KIND_INT and member_type.int_bits % 8:
                continue  # a non-kflag bitfield
            offset = m.bit_offset // 8
            ctype = self.ctype(m.type_id)
            name = m.name
            if not name:
                name = f"_anon{i}"
                anonymous.append(name)
            if is_union:
                # Union members all start at 0; a non-zero offset cannot happen in C.
                fields.append((name, ctype))
                continue
            if offset < pos:
                continue  # overlaps what we already placed (cannot happen without bitfields)
            if offset > pos:
                fields.append((f"{PAD_PREFIX}{i}", ctypes.c_uint8 * (offset - pos)))
            fields.append((name, ctype))
            pos = offset + ctypes.sizeof(ctype)
        size = t.size_or_type
        if not is_union and pos < size:
            fields.append((f"{PAD_PREFIX}_end", ctypes.c_uint8 * (size - pos)))
        namespace: dict[str, Any] = {"_pack_": 1, "_fields_": fields}
        if anonymous:
            namespace["_anonymous_"] = anonymous
        record = type(t.name or f"anon_{t.id}", (base,), namespace)
        if is_union and ctypes.sizeof(record) < size:
            record = type(
                t.name or f"anon_{t.id}",
                (ctypes.Union,),
                {
                    "_pack_": 1,
                    "_fields_": [*fields, (f"{PAD_PREFIX}_size", ctypes.c_uint8 * size)],
                    **({"_anonymous_": anonymous} if anonymous else {}),
                },
            )
        if ctypes.sizeof(record) != size:
            raise LayoutError(f"{t.name}: ctypes size {ctypes.sizeof(record)} != BTF size {size}")
        return record


_INTS: dict[tuple[int, bool], Any] = {
    (1, False): ctypes.c_uint8,
    (1, True): ctypes.c_int8,
    (2, False): ctypes.c_uint16,
    (2, True): ctypes.c_int16,
    (4, False): ctypes.c_uint32,
    (4, True): ctypes.c_int32,
    (8, False): ctypes.c_uint64,
    (8, True): ctypes.c_int64,
}


def _int_ctype(t: BtfTypeInfo) -> Any:
    size = t.size_or_type
    if t.name == "char" and size == 1:
        return ctypes.c_char  # char arrays read as bytes (program and map names)
    if t.int_encoding & BTF_INT_BOOL and size == 1:
        return ctypes.c_bool
    found = _INTS.get((size, bool(t.int_encoding & BTF_INT_SIGNED)))
    return found if found is not None else ctypes.c_uint8 * size


# --- layouts of an object's maps ---------------------------------------------------------------


@dataclass(frozen=True)
class MapLayout:
    """Python's view of one map: ctypes key and value types built from the object's BTF."""

    map_name: str
    key_type: Any
    value_type: Any
    key_type_name: str
    value_type_name: str

    def key(self, raw: bytes) -> Any:
        return self.key_type.from_buffer_copy(raw)

    def value(self, raw: bytes) -> Any:
        return self.value_type.from_buffer_copy(raw)

    def key_field_reader(self, name: str) -> Callable[[bytes], int]:
        """A function reading the integer member `name` of a raw key: the same number as
        `key(raw).name`, without building a ctypes struct per key (every entry of every
        per-cgroup map, every cycle)."""
        member = dict(self.key_type._fields_)[name]
        offset = getattr(self.key_type, name).offset
        unpack = _int_unpacker(member)
        if unpack is None:
            return lambda raw: int(getattr(self.key(raw), name))
        return lambda raw: unpack(raw, offset)[0]

    def value_reader(self) -> Callable[[bytes], Any]:
        """A function turning a raw value into what read_cgroup_map reports: an integer value
        type read with struct (as `value(raw).value`), another simple type's `value(raw).value`
        (c_bool, c_double...), the ctypes struct otherwise."""
        unpack = _int_unpacker(self.value_type)
        if unpack is not None:
            return lambda raw: unpack(raw)[0]
        from_raw = self.value_type.from_buffer_copy
        if issubclass(self.value_type, ctypes._SimpleCData):
            return lambda raw: from_raw(raw).value
        return from_raw

    def has_key_field(self, name: str) -> bool:
        return any(f[0] == name for f in getattr(self.key_type, "_fields_", ()))

    def value_fields(self) -> list[str]:
        """The value struct's member names (padding the builder added left out)."""
        return [f[0] for f in getattr(self.value_type, "_fields_", ()) if not f[0].startswith(PAD_PREFIX)]


def _int_unpacker(ctype: Any) -> Callable[..., tuple[Any, ...]] | None:
    """struct's unpack_from for a ctypes integer type (native size: c_uint64 is c_ulong, "L"
    is 8 bytes natively), or None for anything else (structs, arrays, c_char, c_bool)."""
    code = getattr(ctype, "_type_", None)
    if not isinstance(code, str) or code not in "bBhHiIlLqQ":
        return None
    unpacker = struct.Struct(code)
    if unpacker.size != ctypes.sizeof(ctype):
        return None
    return unpacker.unpack_from


def map_layouts(obj: libbpf.BpfObject) -> dict[str, MapLayout]:
    """Layouts of every map of an opened object that has BTF key/value types."""
    btf = Btf(obj.btf_ptr)
    layouts: dict[str, MapLayout] = {}
    for name, bpf_map in obj.maps.items():
        if not bpf_map.btf_key_type_id or not bpf_map.btf_value_type_id:
            continue  # internal maps (.bss/.rodata) have no key type
        key_t = btf.ctype(bpf_map.btf_key_type_id)
        value_t = btf.ctype(bpf_map.btf_value_type_id)
        if ctypes.sizeof(key_t) != bpf_map.key_size or ctypes.sizeof(value_t) != bpf_map.value_size:
            raise LayoutError(
                f"map {name}: BTF sizes {ctypes.sizeof(key_t)}/{ctypes.sizeof(value_t)} != "
                f"map sizes {bpf_map.key_size}/{bpf_map.value_size}"
            )
        layouts[name] = MapLayout(
            name, key_t, value_t, btf.type_name(bpf_map.btf_key_type_id), btf.type_name(bpf_map.btf_value_type_id)
        )
    return layouts


def describe(ctype: Any, prefix: str = "") -> dict[str, tuple[int, int]]:
    """{member path: (byte offset, size)} of a ctypes record, flattened (for the layout test)."""
    out: dict[str, tuple[int, int]] = {}
    for name, sub in getattr(ctype, "_fields_", ()):
        if name.startswith(PAD_PREFIX):
            continue
        field = getattr(ctype, name)
        path = prefix + name
        out[path] = (field.offset, field.size)
        if hasattr(sub, "_fields_"):
            for inner, (off, size) in describe(sub, path + ".").items():
                out[inner] = (field.offset + off, size)
    return out


# --- the running kernel's BTF ----------------------------------------------------------------

_vmlinux_lock = threading.Lock()
_vmlinux: Btf | None = None
_vmlinux_structs: dict[str, Any] = {}


def vmlinux() -> Btf:
    """The running kernel's BTF (/sys/kernel/btf/vmlinux), parsed once; see release_vmlinux()."""
    global _vmlinux
    with _vmlinux_lock:
        if _vmlinux is None:
            ptr = libbpf.lib().btf__load_vmlinux_btf()
            if not ptr:
                raise libbpf.LibbpfError(ctypes.get_errno(), "load kernel BTF (/sys/kernel/btf/vmlinux)")
            _vmlinux = Btf(ptr, owned=True)
        return _vmlinux


def release_vmlinux() -> None:
    """Drop the parsed kernel BTF (about 6 MiB) once start-up decisions are made.

    Safe while another thread still uses it: it is freed with the last reference.  The ctypes
    structs already built from it (bpf_prog_info, ...) stay cached.
    """
    global _vmlinux
    with _vmlinux_lock:
        _vmlinux = None


def vmlinux_struct(name: str) -> Any:
    """A ctypes struct laid out from the kernel's BTF (uapi structs like bpf_prog_info)."""
    cached = _vmlinux_structs.get(name)
    if cached is not None:
        return cached
    btf = vmlinux()
    type_id = btf.find(name, KIND_STRUCT)
    if not type_id:
        raise LayoutError(f"struct {name} is not in the kernel's BTF")
    ctype = btf.ctype(type_id)
    _vmlinux_structs[name] = ctype
    return ctype


def tracepoint_params(name: str) -> list[str] | None:
    """The typed arguments of a tp_btf/raw_tp tracepoint on this kernel, or None if it has none.

    The kernel describes each tracepoint as `typedef void (*btf_trace_<name>)(void *, args...)`;
    tp_btf programs attach only to tracepoints that have it.
    """
    btf = vmlinux()
    type_id = btf.find(f"btf_trace_{name}", KIND_TYPEDEF)
    if not type_id:
        return None
    ptr = btf.type(btf.type(type_id).size_or_type)
    if ptr.kind != KIND_PTR:
        return None
    proto = btf.type(ptr.size_or_type)
    if proto.kind != KIND_FUNC_PROTO:
        return None
    return [btf.type_name(p) for p in proto.params[1:]]  # drop the leading `void *` context
