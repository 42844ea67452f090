"""The Metric messages of a whole histogram family in the protobuf exposition, encoded at once.

A node's exposition holds some 1,300 histograms of 27 buckets; encoded series by series in Python
(protobuf.histogram_message) they cost ~13 us each, twice the text render of the same batch.  Here
a family's numbers go through a few operations that each run in C over all of its series:

- every bucket count is packed into a fixed-width slot of one big integer, and the cumulative
  counts (prefix sums within each series), the native deltas (zigzag of the difference with the
  bucket below) and their varints are computed by shifts, masks and additions on that integer
  (exporters/varint_slots.py);
- the fixed part of each series' Histogram message (sample count and sum, classic buckets, zero
  bucket) has the same layout in every series: a template repeated per series, into which the
  varints and sums are copied by strided memoryview assignments;
- what varies per series (the window of non-empty native buckets, the message lengths) is found
  with bytes.find over a map of the non-empty slots and sliced out of the deltas' bytes.

Varints are written at a fixed width (4 or 8 bytes) rather than minimal: protobuf decoders read
the value, whatever the width.  Fields are in an order of the layout's choosing
(count and sum are not first), which protobuf decoders also accept; the decoded messages are
those of histogram_message(), which the tests check with the official classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import repeat
from operator import add, attrgetter
from struct import Struct

from kpod.exporters.protowire import SMALL, varint, zigzag
from kpod.exporters.varint_slots import Slots

from kpod.model import HistogramValue

_pack_double = Struct("<d").pack
_counts = attrgetter("counts")
_sum = attrgetter("sum")
_SMALL_LIMIT = len(SMALL)
# Pieces of a series' Metric field: tag, length, labels, the Histogram's tag and length, its fixed
# part, its native buckets.
PIECES = 7


class _Constants:
    """What encoding n series of a layout needs besides their numbers: the slots' constants, the
    repeated template, each series' bytes in it."""

    __slots__ = ("bodies", "empty", "histogram_tags", "metric_tags", "records", "slots")

    def __init__(self, layout: BlockLayout, n: int) -> None:
        self.slots = Slots(layout.buckets, layout.width, n)
        self.records = layout.record * n
        self.bodies = [slice(i * layout.stride, i * layout.stride + layout.size) for i in range(n)]
        self.empty = [b""] * n
        self.metric_tags = [b"\x22"] * n
        self.histogram_tags = [b"\x3a"] * n


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
        constants = self.constants(n, whole)
        slots = constants.slots
        counts = slots.pack(map(_counts, values))
        if counts is None:
            return None
        cumulative = slots.cumulative(counts)
        if cumulative is None:
            return None
        varints = memoryview(slots.to_bytes(slots.varints(cumulative)))

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
            # The window of each series' non-empty native buckets (none: the last prefix, b"").
            deltas = slots.to_bytes(slots.deltas(counts))
            lows, highs = slots.windows(counts)
            keys = slots.window_keys(lows, highs)
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
