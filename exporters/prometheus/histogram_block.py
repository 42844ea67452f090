"""The Metric messages of a whole histogram family in the protobuf exposition, encoded at once.

A node's exposition holds some 1,300 histograms of 27 buckets; encoded series by series in Python
(protobuf.histogram_message) they cost ~13 us each, twice the text render of the same batch.  Here
a family's numbers go through a few operations that each run in C over all of its series:

- every bucket count is packed into a fixed-width slot of one big integer (array), and the
  cumulative counts (prefix sums within each series), the native deltas (zigzag of the difference
  with the bucket below) and their varints (7-bit groups spread into bytes) are computed by
  shifts, masks and additions on that integer, slot by slot, carries never crossing a slot;
- the fixed part of each series' Histogram message (sample count and sum, classic buckets, zero
  bucket) has the same layout in every series: a template repeated per series, into which the
  varints and sums are copied by strided memoryview assignments;
- what varies per series (the window of non-empty native buckets, the message lengths) is found
  with bytes.find over a map of the non-empty slots and sliced out of the deltas' bytes.

Varints are written at a fixed width (4 or 8 bytes) rather than minimal: protobuf decoders read
the value, whatever the width (up to 10 bytes).  Fields are in an order of the layout's choosing
(count and sum are not first), which protobuf decoders also accept; the decoded messages are
those of histogram_message(), which the tests check with the official classes.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from itertools import repeat
from operator import add, attrgetter, mul, sub
from struct import Struct

from kpod.exporters.protowire import SMALL, varint, zigzag

from kpod.model import HistogramValue

_pack_double = Struct("<d").pack
_counts = attrgetter("counts")
_sum = attrgetter("sum")
# array type codes of 4- and 8-byte unsigned integers (C unsigned int, unsigned long long).
_CODES = {size: next(code for code in "ILQ" if array(code).itemsize == size) for size in (4, 8)}
_BIG_ENDIAN = sys.byteorder == "big"  # slots are little-endian
_NONZERO = bytes([0] + [1] * 255)  # bytes.translate table: 1 for a non-zero byte
_SMALL_LIMIT = len(SMALL)
# Pieces of a series' Metric field: tag, length, labels, the Histogram's tag and length, its fixed
# part, its native buckets.
PIECES = 7


def _repeat(slot_values: Sequence[int], width: int, n: int) -> int:
    """An integer of n series of len(slot_values) slots of `width` bytes, slot j of every series
    holding slot_values[j]."""
    one = b"".join(value.to_bytes(width, "little") for value in slot_values)
    return int.from_bytes(one * n, "little")


class _Constants:
    """What encoding n series of a layout needs besides their numbers: the big-integer masks,
    the repeated template, the ranges and slices of each series' bytes."""

    __slots__ = (
        "after_zero", "bias", "bodies", "cont", "empty", "ends", "high", "histogram_tags", "keep", "low", "marks",
        "metric_tags", "n", "next_zero", "offsets", "ones", "ones_n", "prefix", "records", "spread", "starts", "top",
    )  # fmt: skip

    def __init__(self, layout: BlockLayout, n: int) -> None:
        buckets, width = layout.buckets, layout.width
        slot = (1 << 8 * width) - 1
        bits = 7 * width
        self.n = n
        self.records = layout.record * n
        self.bodies = [slice(i * layout.stride, i * layout.stride + layout.size) for i in range(n)]
        series_bytes = buckets * width
        self.starts = range(0, n * series_bytes, series_bytes)
        self.ends = range(series_bytes, (n + 1) * series_bytes, series_bytes)
        self.after_zero = range(width, n * series_bytes, series_bytes)
        self.next_zero = range(series_bytes + 1, (n + 1) * series_bytes + 1, series_bytes)
        self.offsets = [start * (series_bytes + 1) for start in self.starts]
        self.ones_n = [1] * n
        self.empty = [b""] * n
        self.metric_tags = [b"\x22"] * n
        self.histogram_tags = [b"\x3a"] * n
        self.marks = _repeat([1] + [0] * (buckets - 1), width, n)
        # Prefix sums (Hillis-Steele): step s adds slot j - s to slot j, for j >= s in each series.
        self.prefix = []
        step = 1
        while step < buckets:
            self.prefix.append((8 * width * step, _repeat([0] * step + [slot] * (buckets - step), width, n)))
            step *= 2
        # Bits that must be clear in every count and cumulative count: below 2^(7w - 1), so that
        # the varints (7w bits) hold them and the deltas' zigzag.
        self.high = _repeat([slot & ~((1 << bits - 1) - 1)] * buckets, width, n)
        # Varint spreading, step k: the bits from 8k - 1 up move up by one.
        self.spread = [_repeat([slot & ~((1 << 8 * k - 1) - 1)] * buckets, width, n) for k in range(1, width)]
        self.cont = _repeat([int.from_bytes(b"\x80" * (width - 1) + b"\x00", "little")] * buckets, width, n)
        # Deltas: slot 1's bucket below is taken as empty (slot 0 is the zero bucket, not native).
        self.keep = _repeat([slot, 0] + [slot] * (buckets - 2), width, n)
        self.bias = self.top = _repeat([1 << bits - 1] * buckets, width, n)
        self.ones = _repeat([(1 << bits) - 1] * buckets, width, n)
        self.low = _repeat([0xFF] * buckets, width, n)


class BlockLayout:
    """What every histogram family with these bounds, this mode and this varint width shares:
    the template of a series' fixed part (`record`, `size` bytes, then padding to `stride`),
    where each of its numbers goes, and the native span prefixes of every window."""

    def __init__(self, bounds: tuple[float, ...], first: int | None, classic: bool, width: int) -> None:
        self.bounds = bounds
        self.first = first
        self.width = width
        self.buckets = buckets = len(bounds) + 1
        record = bytearray()
        # (offset in the record, dense slot of the cumulative count written there)
        slots: list[tuple[int, int]] = []
        self.sum_at = 0

        def number(tag: int, slot: int) -> None:
            record.append(tag)
            slots.append((len(record), slot))
            record.extend(b"\x80" * (width - 1) + b"\x00")

        def cells() -> None:
            # Bucket {upper_bound (2) first, then cumulative_count (1)}: the count lands 12 bytes
            # into a cell of 12 + width bytes, aligned to 4 when the cells are.
            for index, bound in enumerate(bounds):
                record.extend(bytes((0x1A, 10 + width)) + b"\x11" + _pack_double(bound))
                number(0x08, index)

        if first is not None:
            record.extend(b"\x11" + bytes(8))  # sample_sum, at 1
            self.sum_at = 1
            record.extend(b"\x28\x00")  # schema 0
            number(0x08, buckets - 1)  # sample_count (the last cumulative count), at 12
            if classic:
                cells()
            record.extend(b"\x31" + _pack_double(bounds[0]))  # zero_threshold
            number(0x38, 0)  # zero_count: the first cumulative count is the zero bucket's
        else:
            cells()
            number(0x08, buckets - 1)
            self.sum_at = len(record) + 1
            record.extend(b"\x11" + bytes(8))
        self.size = len(record)
        self.stride = -(-self.size // 4) * 4  # records aligned to 4 bytes: copies by 32-bit words
        self.record = bytes(record) + bytes(self.stride - self.size)
        self.slots = slots
        self.dense = Struct(f"<{buckets}{_CODES[width]}")
        self._constants: dict[int, _Constants] = {}  # by number of series, for whole families
        # The native part after the fixed one, by window of non-empty slots [low, high]: the
        # positive_span and the tag and length of positive_delta, at low * buckets * width + high
        # (byte offsets of those slots in a series' dense slots).
        self.prefixes: list[bytes] = []
        if first is not None:
            span_bytes = buckets * width
            self.prefixes = [b""] * (span_bytes * span_bytes + 1)  # the last one: no window
            for low in range(1, buckets):
                for high in range(low, buckets):
                    span = b"\x08" + varint(zigzag(first + low - 1)) + b"\x10" + varint(high - low + 1)
                    self.prefixes[low * width * span_bytes + high * width] = (
                        b"\x62" + SMALL[len(span)] + span + b"\x6a" + varint((high - low + 1) * width)
                    )

    def constants(self, n: int, keep: bool) -> _Constants:
        """The constants for n series, kept for the next cycle if `keep` (a whole family: the
        same n every cycle, ~2 KB per series) or made for this once (the part of a family that
        changed, a different n each cycle)."""
        constants = self._constants.get(n)
        if constants is None:
            constants = _Constants(self, n)
            if keep:
                if len(self._constants) >= 4:
                    self._constants.clear()
                self._constants[n] = constants
        return constants

    def encode(self, heads: Sequence[bytes], values: Sequence[HistogramValue], whole: bool) -> list[bytes] | None:
        """The Metric fields (tag, length, message) of these series, `heads` being each one's
        encoded labels, as PIECES pieces per series (series i is pieces[PIECES * i:][:PIECES]);
        None when a count does not fit this layout's width (or is negative, or a series has
        another number of buckets).  `whole`: these are a whole family (see constants())."""
        n = len(values)
        buckets, width = self.buckets, self.width
        packed = array(_CODES[width])
        try:
            for _ in map(packed.extend, map(_counts, values)):
                pass
        except (OverflowError, TypeError):  # negative, beyond the slots, or not integers
            return None
        if len(packed) != n * buckets:
            return None
        if _BIG_ENDIAN:
            packed.byteswap()
        constants = self.constants(n, whole)
        counts = int.from_bytes(packed, "little")
        if counts & constants.high:
            return None
        cumulative = counts
        for shift, keep in constants.prefix:
            cumulative += (cumulative << shift) & keep
        if cumulative & constants.high:
            return None
        dense_bytes = n * buckets * width
        varints = memoryview(self._spread(cumulative, constants).to_bytes(dense_bytes, "little"))

        # The fixed part of every series: the template, the varints and sums copied into it.
        buffer = bytearray(constants.records)
        raw = memoryview(buffer)
        words, word_varints = raw.cast("I"), varints.cast("I")
        stride, series_bytes = self.stride, buckets * width
        for offset, slot in self.slots:
            if offset % 4 == 0:
                for half in range(width // 4):
                    source = word_varints[slot * width // 4 + half :: series_bytes // 4]
                    words[offset // 4 + half :: stride // 4] = source
            else:
                for byte in range(width):
                    raw[offset + byte :: stride] = varints[slot * width + byte :: series_bytes]
        sums = memoryview(Struct(f"<{n}d").pack(*map(_sum, values)))
        for byte in range(8):
            raw[self.sum_at + byte :: stride] = sums[byte::8]
        bodies = list(map(raw.__getitem__, constants.bodies))

        size = self.size
        if self.first is None:
            tails = constants.empty
            body_lengths: list[int] = [size] * n
        else:
            # The window of each series' non-empty native buckets: slot 0 of every series is
            # marked, so that a series without any has its window's low end at the next series'
            # slot 0 and its high end at its own (a window that prefixes maps to b"").
            deltas = self._deltas(counts, constants).to_bytes(dense_bytes, "little")
            folded = counts
            fold = 8
            while fold < 8 * width:
                folded |= folded >> fold
                fold *= 2
            marked = (folded & constants.low | constants.marks).to_bytes(dense_bytes, "little")
            nonzero = marked.translate(_NONZERO) + b"\x01"
            lows = list(map(nonzero.find, constants.ones_n, constants.after_zero, constants.next_zero))
            highs = list(map(nonzero.rfind, constants.ones_n, constants.starts, constants.ends))
            keys = map(sub, map(add, map(mul, lows, repeat(series_bytes, n)), highs), constants.offsets)
            windows = map(deltas.__getitem__, map(slice, lows, map(add, highs, repeat(width, n))))
            tails = list(map(add, map(self.prefixes.__getitem__, keys), windows))
            body_lengths = list(map(add, map(len, tails), repeat(size, n)))
        # A Metric: its labels, then the Histogram's tag, length and message.
        metric_lengths = list(map(add, map(len, heads), map(add, body_lengths, repeat(1, n))))
        if max(metric_lengths) >= _SMALL_LIMIT - 2:  # lengths of more than 2 varint bytes: never seen
            body_varints = list(map(varint, body_lengths))
            metric_varints = list(map(varint, map(add, metric_lengths, map(len, body_varints))))
        else:
            body_varints = list(map(SMALL.__getitem__, body_lengths))
            metric_varints = list(map(SMALL.__getitem__, map(add, metric_lengths, map(len, body_varints))))
        pieces: list[bytes] = [b""] * (PIECES * n)
        pieces[0::PIECES] = constants.metric_tags
        pieces[1::PIECES] = metric_varints
        pieces[2::PIECES] = heads
        pieces[3::PIECES] = constants.histogram_tags
        pieces[4::PIECES] = body_varints
        pieces[5::PIECES] = bodies
        pieces[6::PIECES] = tails
        return pieces

    @staticmethod
    def _spread(values: int, masks: _Constants) -> int:
        """Each slot's value (below 2^(7w)) as a varint of w bytes."""
        for mask in masks.spread:
            values += values & mask
        return values | masks.cont

    def _deltas(self, counts: int, masks: _Constants) -> int:
        """Each slot's varint of zigzag(count - the count of the slot below); slot 1's is its
        count, slot 0's is meaningless."""
        bits = 7 * self.width
        biased = counts + masks.bias - ((counts << 8 * self.width) & masks.keep)
        negative = (biased & masks.top) ^ masks.top
        zigzags = ((biased << 1) & masks.ones) ^ ((negative << 1) - (negative >> bits - 1))
        return self._spread(zigzags, masks)
