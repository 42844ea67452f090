"""Histogram counts in fixed-width slots of one big integer, and what C-level integer arithmetic
computes from them for a whole family of series at once: varints, prefix sums, deltas, and the
window of each series' non-empty buckets.

Both exporters write kernel histograms (27 buckets, some 1,300 series per node) into protobuf;
done series by series and bucket by bucket in Python that is the bulk of their CPU time.  Here a
family's bucket counts are packed into slots of `width` bytes (array), `buckets` slots per
series, and each operation is a handful of shifts, masks and additions on the whole integer,
whose carries never cross a slot because every value is checked to stay below 2^(7w - 1).

A varint written from a slot has exactly `width` bytes (the value's 7-bit groups, continuation
bits on all but the last): protobuf decoders read a varint's value whatever its length (up to
10 bytes), so fixed-width varints decode as the minimal ones would.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Sequence
from itertools import repeat
from operator import add, mul, sub

# array type codes of 4- and 8-byte unsigned integers (C unsigned int, unsigned long long).
_CODES = {size: next(code for code in "ILQ" if array(code).itemsize == size) for size in (4, 8)}
_BIG_ENDIAN = sys.byteorder == "big"  # slots are little-endian
_NONZERO = bytes([0] + [1] * 255)  # bytes.translate table: 1 for a non-zero byte
WIDTHS = (4, 8)  # varints of 4 bytes (values below 2^27) or 8 (below 2^55)


def repeated(slot_values: Sequence[int], width: int, n: int) -> int:
    """An integer of n series of len(slot_values) slots of `width` bytes, slot j of every series
    holding slot_values[j]."""
    one = b"".join(value.to_bytes(width, "little") for value in slot_values)
    return int.from_bytes(one * n, "little")


class Slots:
    """The constants of n series of `buckets` slots of `width` bytes: masks, and the ranges of
    each series' bytes for the windows."""

    __slots__ = (
        "after_zero", "bias", "buckets", "cont", "ends", "high", "keep", "low", "marks", "n", "next_zero",
        "offsets", "ones", "ones_n", "prefix", "series_bytes", "spread", "starts", "top", "width",
    )  # fmt: skip

    def __init__(self, buckets: int, width: int, n: int) -> None:
        slot = (1 << 8 * width) - 1
        bits = 7 * width
        self.buckets, self.width, self.n = buckets, width, n
        self.series_bytes = series_bytes = buckets * width
        # Every value must stay below 2^(7w - 1): its varint holds 7w bits, and so does the zigzag
        # of a difference of two of them.
        self.high = repeated([slot & ~((1 << bits - 1) - 1)] * buckets, width, n)
        # Varint spreading, step k: the bits from 8k - 1 up move up by one.
        self.spread = [repeated([slot & ~((1 << 8 * k - 1) - 1)] * buckets, width, n) for k in range(1, width)]
        self.cont = repeated([int.from_bytes(b"\x80" * (width - 1) + b"\x00", "little")] * buckets, width, n)
        # Prefix sums (Hillis-Steele): step s adds slot j - s to slot j, for j >= s in each series.
        self.prefix: list[tuple[int, int]] = []
        step = 1
        while step < buckets:
            self.prefix.append((8 * width * step, repeated([0] * step + [slot] * (buckets - step), width, n)))
            step *= 2
        # Deltas: slot 1's bucket below is taken as empty (slot 0 is the zero bucket).
        self.keep = repeated([slot, 0] + [slot] * (buckets - 2), width, n)
        self.bias = self.top = repeated([1 << bits - 1] * buckets, width, n)
        self.ones = repeated([(1 << bits) - 1] * buckets, width, n)
        # Windows: the low byte of each slot, and a mark on every series' slot 0.
        self.low = repeated([0xFF] * buckets, width, n)
        self.marks = repeated([1] + [0] * (buckets - 1), width, n)
        self.starts = range(0, n * series_bytes, series_bytes)
        self.ends = range(series_bytes, (n + 1) * series_bytes, series_bytes)
        self.after_zero = range(width, n * series_bytes, series_bytes)
        self.next_zero = range(series_bytes + 1, (n + 1) * series_bytes + 1, series_bytes)
        self.offsets = [start * (series_bytes + 1) for start in self.starts]
        self.ones_n = [1] * n

    def pack(self, counts: Iterable[Sequence[int]]) -> int | None:
        """The counts of n series, `buckets` each, as one integer; None when one does not fit
        (negative, 2^(7w - 1) or more, not an integer) or a series has another number."""
        packed = array(_CODES[self.width])
        try:
            for _ in map(packed.extend, counts):
                pass
        except (OverflowError, TypeError):
            return None
        if len(packed) != self.n * self.buckets:
            return None
        if _BIG_ENDIAN:
            packed.byteswap()
        value = int.from_bytes(packed, "little")
        return None if value & self.high else value

    def to_bytes(self, value: int) -> bytes:
        return value.to_bytes(self.n * self.series_bytes, "little")

    def varints(self, values: int) -> int:
        """Each slot's value (below 2^(7w)) as a varint of w bytes."""
        for mask in self.spread:
            values += values & mask
        return values | self.cont

    def cumulative(self, counts: int) -> int | None:
        """Each slot's count plus the counts below it in its series; None if a sum does not fit."""
        for shift, keep in self.prefix:
            counts += (counts << shift) & keep
        return None if counts & self.high else counts

    def deltas(self, counts: int) -> int:
        """Each slot's varint of zigzag(count - the count of the slot below); slot 1's is its
        count, slot 0's is meaningless."""
        bits = 7 * self.width
        biased = counts + self.bias - ((counts << 8 * self.width) & self.keep)
        negative = (biased & self.top) ^ self.top
        zigzags = ((biased << 1) & self.ones) ^ ((negative << 1) - (negative >> bits - 1))
        return self.varints(zigzags)

    def windows(self, counts: int) -> tuple[list[int], list[int]]:
        """Each series' non-empty slots from 1 up, as the byte offsets (in to_bytes()) of the
        first and the last one.  A series without any has the next series' slot 0 as its first
        and its own slot 0 as its last: a window that window_key() maps past every real one."""
        folded = counts
        fold = 8
        while fold < 8 * self.width:
            folded |= folded >> fold
            fold *= 2
        nonzero = self.to_bytes(folded & self.low | self.marks).translate(_NONZERO) + b"\x01"
        lows = list(map(nonzero.find, self.ones_n, self.after_zero, self.next_zero))
        highs = list(map(nonzero.rfind, self.ones_n, self.starts, self.ends))
        return lows, highs

    def window_keys(self, lows: list[int], highs: list[int]) -> list[int]:
        """(first - start) * series_bytes + (last - start) of each series' window: index into a
        table of series_bytes^2 + 1 entries, the last one for a series without any."""
        series_bytes = self.series_bytes
        return list(map(sub, map(add, map(mul, lows, repeat(series_bytes, self.n)), highs), self.offsets))
