"""Prometheus exposition, rendered once per collection cycle.

Pure functions over a Batch: label escaping and the text (0.0.4) and OpenMetrics (1.0)
renderers, with names from the one naming rule (naming.py).  The exporter keeps the rendered
bytes (and their gzip) and the server serves them, so a scrape never does collection or
rendering work.
"""

from __future__ import annotations

import math
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from itertools import accumulate, chain, compress, pairwise, repeat
from operator import add, and_, attrgetter, eq, ne, not_

from kpod.exporters.prometheus.labels import Grouping, LabelCache
from kpod.exporters.prometheus.naming import family_name, label_name, prometheus_name

from kpod.model import Batch, HistogramValue, Kind, MetricDef

TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"
# Rendered by protobuf.py, which the exporter imports only when a scrape first asks for it.
PROTOBUF_CONTENT_TYPE = "application/vnd.google.protobuf; proto=io.prometheus.client.MetricFamily; encoding=delimited"


def utf8_label_value(value: str) -> str:
    """`value` as valid UTF-8: values from pods may carry bytes that are not UTF-8 (decoded with
    surrogateescape); they are replaced so that every exposition stays valid UTF-8."""
    if value.isascii():
        return value
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeEncodeError:  # lone surrogates that no decoder produced
        return value.encode("utf-8", "replace").decode("utf-8")


def escape_label_value(value: str) -> str:
    value = utf8_label_value(value)
    if "\\" in value or '"' in value or "\n" in value:
        value = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return value


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    if type(value) is int:
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)


def _pairs(labels: Iterable[tuple[str, str]]) -> str:
    return ",".join(f'{label_name(k)}="{escape_label_value(v)}"' for k, v in labels)


def _join_labels(head: str, tail: str) -> str:
    return f"{head},{tail}" if head else tail


# Numbers go into templates' holes: %d for an int, and %a for any other number, which writes
# repr() of its argument, the exposition's text of a finite float that is not integral.  The
# other numbers are replaced by what repr() writes as format_value() does.


class _Shown:
    """A number whose repr() is `text`."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return self.text


_NON_FINITE = {"nan": _Shown("NaN"), "inf": _Shown("+Inf"), "-inf": _Shown("-Inf")}


def _shown(value: float) -> object:
    """`value` for a %a hole: repr() of the result is format_value(value)."""
    kind = type(value)
    if kind is int:
        return value
    if kind is float:
        if value.is_integer():
            return int(value) if abs(value) < 1e15 else value
        if math.isfinite(value):
            return value
        return _NON_FINITE[repr(value)]
    return _Shown(format_value(value))


def _all_shown(numbers: Sequence[float]) -> Sequence[object]:
    """`numbers` for %a holes, checked and converted in C where it can be: all ints are
    themselves; all finite floats are themselves where they have a fraction (sums, seconds) and
    ints where they are whole (bytes, counts and idle zeros: most of a node's floats) and below
    1e15, as format_value() writes them.  Any other mix goes through _shown() one by one."""
    kinds = set(map(type, numbers))
    if kinds == {float}:
        if all(map(math.isfinite, numbers)):
            whole = list(map(float.is_integer, numbers))
            if not any(whole):
                return numbers
            if all(whole):
                if max(map(abs, numbers)) < 1e15:
                    return list(map(int, numbers))
            else:
                integral = list(compress(numbers, whole))
                if max(map(abs, integral)) < 1e15:
                    shown = list(numbers)
                    deque(map(shown.__setitem__, compress(range(len(shown)), whole), map(int, integral)), maxlen=0)
                    return shown
    elif kinds <= {int}:
        return numbers
    return list(map(_shown, numbers))


class _Family:
    """What the renderer keeps of a family between cycles: its series' labels and shape (the
    values' one type, or each series' form: a value's type, a histogram's bounds), in order, and
    the concatenation of the series' texts with holes for their numbers (`template`), which one
    bytes-format call fills with the family's numbers; where each series' text ends in it
    (`ends`).  A series' text is a slice of the template: kept once, not also as bytes of its
    own (about 1.5 MiB at 110 pods).  A histogram family keeps its values too, and each series'
    text when it was rendered series by series (`chunks`)."""

    __slots__ = ("blocks", "chunks", "ends", "labels", "shape", "template", "values")

    def __init__(self, labels: list[str], shape: object, template: bytes, ends: array[int]) -> None:
        self.labels = labels
        self.shape = shape
        self.template = template
        self.ends = ends
        self.blocks = _blocks(ends, shape)
        self.values: list[HistogramValue] | None = None
        self.chunks: list[bytes] | None = None

    def fill(self, numbers: tuple[object, ...]) -> list[bytes]:
        """The family's text with `numbers` in its holes, in blocks of about BLOCK bytes."""
        if self.blocks is None:
            return [self.template % numbers]
        template = self.template
        return [template[start:end] % numbers[first:stop] for start, end, first, stop in self.blocks]

    def same(self, labels: list[str], shape: object) -> bool:
        # Identity first: a series' label text is the same object every cycle (labels.py), and
        # so are the bounds of a receiver's histograms.
        return self.shape == shape and self.labels == labels

    def piece(self, index: int) -> bytes:
        """The text of series `index`."""
        return self.template[self.ends[index - 1] if index else 0 : self.ends[index]]

    @staticmethod
    def rebuilt(
        previous: _Family | None, labels: list[str], shape: object, piece: Callable[[str, object], bytes]
    ) -> _Family:
        """The family of these series: the texts of series it had already are reused (a pod
        that comes or goes costs its own series' texts, not the family's).  This runs over every
        series of every family each time a pod comes or goes: where each series was (looked up
        by its label text, whose hash is kept) and whether it had the same form are found in C,
        and so are the runs of series that follow one another in both families.  Each run is
        one slice of the previous template (a pod that comes or goes splits a family into a
        few), and only the series that are new (or changed shape) go through Python."""
        old = previous if previous is not None else _EMPTY_FAMILY
        count, missing = len(labels), len(old.labels)
        forms = list(_forms(shape, count))
        # Where each series was in the previous family (`missing`: it was not), and whether it
        # was there in the same form (equal shapes are kept).
        where = list(map(dict(zip(old.labels, range(missing), strict=True)).get, labels, repeat(missing, count)))
        if type(shape) is not tuple and shape == old.shape:  # one type for all, as before
            kept = list(map(ne, where, repeat(missing)))
        else:
            old_forms = [*_forms(old.shape, missing), _NO_FORM]
            kept = list(map(eq, map(old_forms.__getitem__, where), forms))
        # A series joins the run before it when both are kept and it came right after that one.
        follows = map(eq, where[1:], map(add, where, repeat(1)))
        joins = chain((False,), map(and_, map(and_, follows, kept[1:]), kept))
        starts = list(compress(range(count), map(not_, joins)))
        view = memoryview(old.template)
        texts: list[bytes | memoryview] = []
        ends = array("Q")
        at = 0  # where the next text goes in the new template
        for first, stop in pairwise([*starts, count]):
            if kept[first]:  # series first..stop-1 were where[first]..where[stop-1]
                begin = old.ends[where[first] - 1] if where[first] else 0
                ends.extend(map(add, old.ends[where[first] : where[stop - 1] + 1], repeat(at - begin)))
                texts.append(view[begin : old.ends[where[stop - 1]]])
            else:  # one series, new or of another form
                texts.append(piece(labels[first], forms[first]))
                ends.append(at + len(texts[-1]))
            at = ends[-1]
        return _Family(labels, shape, b"".join(texts), ends)


# A family's text is made in blocks of about this many bytes (a series' text at most more), each
# below glibc's mmap threshold (128 KiB, kpod/allocator.py): a block comes from the heap, where
# a larger text would be mapped and its pages faulted in afresh every cycle (0.8 vs 0.45 ms for
# a 600 KB histogram family, ad hoc).
BLOCK = 64 * 1024


def _blocks(ends: array[int], shape: object) -> list[tuple[int, int, int, int]] | None:
    """Where a family's template is cut into blocks, at series' ends: (start, end) in the
    template and (first, stop) in its numbers, per block; None when it is one block."""
    if not ends or ends[-1] <= BLOCK:
        return None
    holes = map(_holes, shape) if type(shape) is tuple else repeat(_holes(shape))
    blocks = []
    start = first = stop = 0
    last = len(ends) - 1
    for index, (end, count) in enumerate(zip(ends, holes, strict=False)):
        stop += count
        if end - start >= BLOCK or index == last:
            blocks.append((start, end, first, stop))
            start, first = end, stop
    return blocks


def _holes(form: object) -> int:
    """The numbers in the text of a series of this form: a histogram's (its form is its bounds)
    cumulative counts, +Inf's included, its sum and its count; a counter's or gauge's value."""
    return len(form) + 3 if type(form) is tuple else 1  # type: ignore[arg-type]


def _forms(shape: object, count: int) -> Iterable[object]:
    """Each series' form: a family's shape is their tuple, or the one type of all of them."""
    return shape if type(shape) is tuple else repeat(shape, count)  # type: ignore[return-value]


_NO_FORM = object()  # the form of a series a family does not have: equal to none
_EMPTY_FAMILY = _Family([], int, b"", array("Q"))
_SCALAR_TYPES = {int, float}
_bounds = attrgetter("bounds")
_counts = attrgetter("counts")
_sum = attrgetter("sum")


def _scalar_piece(sample: str, labels: str, kind: object) -> bytes:
    """A counter's or gauge's line with a hole for its value."""
    hole = "%d" if kind is int else "%a"
    escaped = labels.replace("%", "%%")
    return (f"{sample}{{{escaped}}} {hole}\n" if labels else f"{sample} {hole}\n").encode()


class Renderer:
    """Renders batches.  Caches across cycles what rarely changes: label strings (labels.py)
    and, per family, the text of its series with holes for their numbers (_Family).

    The render of a 110-pod node where every value changed (some 7,400 series, 1,320 of them
    histograms of 29 numbers: 37,000 lines) has a budget of 20 ms (issue 18, bench/core.py).
    A family's series are the same ones, in the same order, cycle after cycle (they change when
    pods come and go), so a family is rendered by one bytes-format call over its kept template:
    the work per number is done in C, and the Python work per series is the lookup of its
    labels and, for a histogram, collecting its numbers."""

    def __init__(self) -> None:
        self._labels = LabelCache(_pairs, _join_labels)
        self._grouping = Grouping(self._labels)
        self._les_cache: dict[tuple[float, ...], list[str]] = {}
        # metric -> (text HELP/TYPE lines, OpenMetrics HELP/TYPE lines, family name, sample name)
        self._heads: dict[MetricDef, tuple[bytes, bytes, str, str]] = {}
        self._families: dict[MetricDef, _Family] = {}

    def render(self, batch: Batch) -> tuple[bytes, bytes, int]:
        """Render a batch as text 0.0.4 and as OpenMetrics 1.0: both bodies and the number of
        series (a histogram counts once)."""
        rendered = self.render_parts(batch)
        return rendered.text(), rendered.openmetrics(), rendered.series

    def render_parts(self, batch: Batch) -> Rendered:
        """Render a batch's samples once (the two formats differ only in their HELP/TYPE lines);
        each body is joined when asked for: a cycle scraped in one format pays one join of a
        body that is megabytes long."""
        text: list[bytes] = []  # each family's HELP/TYPE lines, in either format
        openmetrics: list[bytes] = []
        samples: list[list[bytes]] = []  # each family's, in parts
        previous = self._families
        kept: dict[MetricDef, _Family] = {}
        series = 0
        for metric, (labels, values) in self._grouping(batch).items():
            text_head, openmetrics_head, family_text, sample = self._family_head(metric)
            if metric.kind is Kind.HISTOGRAM:
                family, parts, count = self._histogram_family(family_text, labels, values, previous.get(metric))
            else:
                family, parts, count = self._scalar_family(sample, labels, values, previous.get(metric))
            if family is not None:
                kept[metric] = family
            series += count
            text.append(text_head)
            openmetrics.append(openmetrics_head)
            samples.append(parts)
        self._families = kept
        self._labels.prune(batch, series)
        heads = {"text": text, "openmetrics": openmetrics}
        return Rendered(heads, samples, {"text": b"", "openmetrics": b"# EOF\n"}, series)

    def _family_head(self, metric: MetricDef) -> tuple[bytes, bytes, str, str]:
        head = self._heads.get(metric)
        if head is None:
            family, sample = family_name(metric), prometheus_name(metric)
            help_text = escape_help(metric.description)
            head = self._heads[metric] = (
                f"# HELP {sample} {help_text}\n# TYPE {sample} {metric.kind.value}\n".encode(),
                f"# HELP {family} {help_text}\n# TYPE {family} {metric.kind.value}\n".encode(),
                family,
                sample,
            )
        return head

    def _scalar_family(
        self, sample: str, labels: list[str], values: tuple[float | HistogramValue, ...], previous: _Family | None
    ) -> tuple[_Family | None, list[bytes], int]:
        """A counter or gauge family's lines (its series' labels and values, in parts), what to
        keep of it and its number of series.  Values that are neither ints nor floats (a histogram value in
        a counter) are left out, and such a family is rendered line by line and not kept."""
        kinds = set(map(type, values))
        # The shape: the values' one type (most families), else each value's.
        shape: object = next(iter(kinds)) if len(kinds) == 1 else tuple(map(type, values))
        if previous is None or not previous.same(labels, shape):
            if not kinds <= _SCALAR_TYPES:
                lines = [
                    _scalar_piece(sample, series, type(value)) % (value if type(value) is int else _shown(value))
                    for series, value in zip(labels, values, strict=True)
                    if not isinstance(value, HistogramValue)
                ]
                return None, lines, len(lines)
            previous = _Family.rebuilt(previous, labels, shape, partial(_scalar_piece, sample))
        if shape is not int:
            values = tuple(_all_shown(values))
        return previous, previous.fill(values), len(values)

    def _histogram_family(
        self, family: str, labels: list[str], given: tuple[float | HistogramValue, ...], previous: _Family | None
    ) -> tuple[_Family | None, list[bytes], int]:
        """A histogram family's lines (in parts), what to keep of it and its number of series
        (see _scalar_family); values that are not histograms are left out."""
        if set(map(type, given)) != {HistogramValue}:
            chunks = [
                self._histogram_template(family, series, value.bounds) % _histogram_numbers([value])
                for series, value in zip(labels, given, strict=True)
                if isinstance(value, HistogramValue)
            ]
            return None, chunks, len(chunks)
        values: list[HistogramValue] = list(given)  # type: ignore[arg-type]
        shape = tuple(map(_bounds, values))
        if previous is None or not previous.same(labels, shape):
            previous = _Family.rebuilt(previous, labels, shape, partial(self._histogram_template, family))
        elif previous.values is not None:
            # On a real node most histograms do not change from one cycle to the next: when at
            # most half of them did, only those are rendered again (series by series), and the
            # others' text is reused.  Compared in C: counts and sums (bounds are the shape).
            same_sums = list(map(eq, map(_sum, previous.values), map(_sum, values)))
            if 2 * sum(same_sums) >= len(values):  # else more than half changed: no need to look further
                unchanged = list(map(and_, same_sums, map(eq, map(_counts, previous.values), map(_counts, values))))
                if 2 * (len(values) - sum(unchanged)) <= len(values):
                    return previous, _histogram_series(previous, values, unchanged), len(labels)
        previous.values, previous.chunks = values, None
        return previous, previous.fill(_histogram_numbers(values)), len(labels)

    def _histogram_template(self, family: str, labels: str, bounds: tuple[float, ...]) -> bytes:
        """The text of one histogram series with %d holes for the cumulative counts and the
        count, and %a for the sum."""
        escaped = labels.replace("%", "%%")
        head = f"{family}_bucket{{{escaped}," if labels else f"{family}_bucket{{"
        suffix = f"{{{escaped}}}" if labels else ""
        lines = [f'{head}le="{le}"}} %d\n' for le in self._les(bounds)]
        lines.append(f"{family}_sum{suffix} %a\n{family}_count{suffix} %d\n")
        return "".join(lines).encode()

    def _les(self, bounds: tuple[float, ...]) -> list[str]:
        les = self._les_cache.get(bounds)
        if les is None:
            les = self._les_cache[bounds] = [format_value(float(b)) for b in bounds] + ["+Inf"]
        return les


def _histogram_series(family: _Family, values: list[HistogramValue], unchanged: list[bool]) -> list[bytes]:
    """A histogram family's text, series by series: the kept text of the unchanged ones, the
    changed ones (all of them when the last cycle kept no text per series) rendered anew."""
    chunks = family.chunks
    if chunks is None:
        chunks = [b""] * len(values)
        unchanged = [False] * len(values)
    for index in compress(range(len(values)), map(not_, unchanged)):
        chunks[index] = family.piece(index) % _histogram_numbers([values[index]])
    family.values, family.chunks = values, chunks
    return list(chunks)  # the family changes its own list next cycle, the render keeps this one


def _histogram_numbers(values: list[HistogramValue]) -> tuple[object, ...]:
    """The numbers of histogram templates, in their order: each one's cumulative counts, its
    sum and its count (the last cumulative count)."""
    numbers: list[object] = []
    extend, append = numbers.extend, numbers.append
    sums = _all_shown(list(map(_sum, values)))
    if len(set(map(len, map(_counts, values)))) == 1 and len(set(map(id, map(_bounds, values)))) == 1:
        buckets = len(values[0].bounds) + 1  # one count tuple length and one bounds for all
        if len(values[0].counts) == buckets:
            for value, total in zip(values, sums, strict=True):
                extend(accumulate(value.counts))
                append(total)
                append(numbers[-2])
            return tuple(numbers)
    for value, total in zip(values, sums, strict=True):
        counts = value.counts
        buckets = len(value.bounds) + 1
        if len(counts) != buckets:  # tolerate a short or long count tuple: pad or cut
            counts = (tuple(counts) + (0,) * buckets)[:buckets]
        extend(accumulate(counts))
        append(total)
        append(numbers[-2])
    return tuple(numbers)


class Rendered:
    """One batch's text and OpenMetrics bodies, in the parts they were rendered in: each
    family's HELP/TYPE lines in either format (`heads`), its samples (the same in both, in
    blocks: see BLOCK) and a format's last line (`tails`).  A body is served as its parts
    (http.Body, one sendmsg) and gzipped from them: never joined into one bytes object, which
    at 110 pods would be a megabyte mapped and faulted in afresh every cycle (about 0.8 ms); both
    formats share the samples."""

    __slots__ = ("_heads", "_samples", "_tails", "series")

    def __init__(
        self, heads: dict[str, list[bytes]], samples: list[list[bytes]], tails: dict[str, bytes], series: int
    ) -> None:
        self._heads = heads
        self._samples = samples
        self._tails = tails
        self.series = series

    def parts(self, fmt: str) -> list[bytes]:
        """The body of `fmt` ("text" or "openmetrics"), in order."""
        parts: list[bytes] = []
        for head, family in zip(self._heads[fmt], self._samples, strict=True):
            parts.append(head)
            parts += family
        parts.append(self._tails[fmt])
        return parts

    def text(self) -> bytes:
        return b"".join(self.parts("text"))

    def openmetrics(self) -> bytes:
        return b"".join(self.parts("openmetrics"))
