"""Protobuf wire format, the few pieces both exporters write by hand (varints, fields).

The Prometheus protobuf exposition (prometheus/protobuf.py) and OTLP requests (otlp/encoding.py)
are written byte by byte rather than through message objects: most of what they carry is cached
bytes or fixed-width numbers, and building messages field by field in Python would cost more
than the whole encoding.  Tests decode both with the official generated classes.
"""

from __future__ import annotations

# Varints of 0 .. 2^14 - 1 (one or two bytes), looked up rather than computed: most counts,
# deltas and lengths fall here.
SMALL = [bytes((n,)) if n < 0x80 else bytes((n & 0x7F | 0x80, n >> 7)) for n in range(1 << 14)]


def varint(n: int) -> bytes:
    """A base-128 varint (n >= 0), minimal."""
    if n < 0x4000:
        return SMALL[n]
    if n < 0x200000:
        return bytes((n & 0x7F | 0x80, n >> 7 & 0x7F | 0x80, n >> 14))
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def zigzag(n: int) -> int:
    """The sint32/sint64 mapping of n (0, -1, 1, -2 ... -> 0, 1, 2, 3 ...)."""
    return n << 1 if n >= 0 else (-n << 1) - 1


def field(tag: int, data: bytes) -> bytes:
    """A length-delimited field; `tag` is the key byte, field number << 3 | 2 (numbers < 16)."""
    return bytes((tag,)) + varint(len(data)) + data
