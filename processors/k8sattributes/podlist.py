"""A PodList document decoded item by item, from chunks as they arrive.

The kubelet's /pods is every pod of the node with its whole spec and status: some 1.5 MB of
JSON at 110 pods, which `json.loads` turns into ten times that in Python objects at once (and
the raw bytes are held meanwhile).  Those objects live only until each pod is cut down to a
`PodInfo`, but the allocator keeps the memory they took: the agent's RSS would carry the peak
of every poll.  `PodListDecoder` is fed the response's chunks and turns each pod into a PodInfo
as soon as its JSON is complete, so at any moment it holds the undecoded remainder (at most a
chunk and one item) and one pod's objects.

The result is the one `json.loads` + `pod_from_json` per item would give: the same pods, the
same items skipped (valid JSON that is not a usable pod), the same errors (not JSON at all:
truncated, malformed, nested too deep; not a PodList: another kind, a top level that is not an
object), and the last of duplicate keys wins as in `json.loads`.  One difference: the bytes must
be UTF-8 (optionally with a BOM), as RFC 8259 requires between systems; `json.loads` would also
guess UTF-16 and UTF-32.

How: the top-level object is walked key by key; every value but the `items` array, and every
item of it, is decoded whole by the `json` module's own scanner (`raw_decode`, in C).  A value
that does not decode yet is retried when more text has come (twice as much as at the last try,
so that a huge value costs linear time, not quadratic); it is an error only at the end of the
body.  `max_value_chars` bounds what is buffered for one value (a hostile or broken server sends
one endless item): beyond it the body is refused with a one-line error.
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from dataclasses import dataclass
from typing import Any, NoReturn

from kpod.processors.k8sattributes.pods import PodInfo, pod_from_json

# Decoded text kept for one pending value at most.  The API server refuses objects over 1.5 MiB
# (etcd's request limit); a pod ten times that is not a pod.
MAX_VALUE_CHARS = 16 * 1024 * 1024

_WHITESPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()
_BAD_JSON = (ValueError, RecursionError)  # JSONDecodeError is a ValueError
# What every malformed body says, whichever step finds it (json.loads' failure type, as the
# whole-body decoder said it).
NOT_JSON = "response is not JSON (JSONDecodeError)"

# States of the walk through the top-level object.
_START, _KEY_OR_END, _KEY, _COLON, _VALUE, _ITEM_OR_END, _ITEM, _ITEM_NEXT, _NEXT, _END, _OTHER = range(11)


@dataclass(frozen=True)
class PodListPage:
    """One decoded PodList document (a page of the API's list, or the kubelet's /pods)."""

    pods: list[PodInfo]
    resource_version: str
    cont: str
    skipped: int  # items that were not a usable pod


class _Incomplete(Exception):
    """More text is needed before the value at the current position can be decoded."""


# What can follow the digits a number decoded so far, up to the end of the text: the rest of a
# number the next chunk may complete.
_NUMBER_TAIL = re.compile(r"[0-9.eE+-]+\Z")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar_text(value: Any) -> str:
    """A resourceVersion or continue token is an opaque string; anything else reads as absent."""
    return value if isinstance(value, str) else (str(value) if isinstance(value, int) and value else "")


class PodListDecoder:
    """feed() the body's chunks in order, then finish() for the page.

    Both raise ValueError with a short one-line reason ("response is not JSON (...)", "...
    not a PodList (...)", "... a value larger than ..."), and nothing else.  A malformed item is skipped and
    counted (`skipped`), not fatal: one odd pod must not hide the others.
    """

    def __init__(self, log: logging.Logger | None = None, max_value_chars: int | None = None) -> None:
        self.log = log
        self.max_value_chars = MAX_VALUE_CHARS if max_value_chars is None else max_value_chars
        self.pods: list[PodInfo] = []
        self.skipped = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8-sig")()
        self._text = ""
        self._pos = 0
        self._state = _START
        self._key = ""
        self._retry_at = 0  # text pending (len(_text) - _pos) before a value that failed is tried again
        self._eof = False
        self._items_ok = False  # the last "items" key held an array
        self._kind: Any = None
        self._metadata: Any = None

    # Input ----------------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        try:
            text = self._utf8.decode(chunk)
        except UnicodeDecodeError:
            raise ValueError("response is not JSON (UnicodeDecodeError)") from None
        self.feed_text(text)

    def feed_text(self, text: str) -> None:
        if self._pos:
            self._text = self._text[self._pos :]
            self._pos = 0
        self._text += text
        self._walk()

    def finish(self) -> PodListPage:
        try:
            tail = self._utf8.decode(b"", final=True)
        except UnicodeDecodeError:
            raise ValueError("response is not JSON (UnicodeDecodeError)") from None
        self._eof = True
        self.feed_text(tail)
        if self._state == _OTHER:
            return self._other_document()
        if self._state != _END:
            raise ValueError(NOT_JSON)  # the body ended inside the document
        if not self._items_ok:
            raise ValueError(f"response is not a PodList (kind {str(self._kind)[:64]!r})")
        metadata = self._metadata if isinstance(self._metadata, dict) else {}
        return PodListPage(
            self.pods, scalar_text(metadata.get("resourceVersion")), scalar_text(metadata.get("continue")), self.skipped
        )

    # The walk -------------------------------------------------------------------------------

    def _walk(self) -> None:
        try:
            while self._step():
                pass
        except _Incomplete:
            if len(self._text) - self._pos > self.max_value_chars:
                raise ValueError(f"response has a value larger than {_size(self.max_value_chars)}") from None

    def _ready(self) -> bool:
        return self._eof or len(self._text) - self._pos >= self._retry_at

    def _skip_space(self) -> str:
        """The next character after whitespace ("" when the text ends there)."""
        end = _WHITESPACE.match(self._text, self._pos).end()  # type: ignore[union-attr]
        self._pos = end
        if end < len(self._text):
            return self._text[end]
        if self._eof:
            return ""
        raise _Incomplete

    def _value(self) -> Any:
        """Decode the JSON value at the current position (whitespace skipped)."""
        if not self._ready():
            raise _Incomplete
        try:
            value, end = _DECODER.raw_decode(self._text, self._pos)
        except RecursionError:
            raise ValueError("response is not JSON (RecursionError)") from None
        except ValueError:
            if self._eof:
                raise ValueError(NOT_JSON) from None
            self._wait_for_more()
        if not self._eof and (end == len(self._text) or (_is_number(value) and _NUMBER_TAIL.match(self._text, end))):
            # A number cut by the chunk decodes too: "12" of "123", and "0" of "0.5" or "1" of
            # "1e5" stop before a tail that could still go on.
            self._wait_for_more()
        self._pos = end
        self._retry_at = 0
        return value

    def _wait_for_more(self) -> None:
        # Tried again once twice as much text is there (or at the end): a value that spans many
        # chunks costs time linear in its size, not quadratic.
        self._retry_at = 2 * (len(self._text) - self._pos)
        raise _Incomplete

    @staticmethod
    def _malformed() -> NoReturn:
        raise ValueError(NOT_JSON)

    def _separator(self, close: str, after_comma: int, after_close: int) -> bool:
        char = self._skip_space()
        if char == ",":
            self._state = after_comma
        elif char == close:
            self._state = after_close
        else:
            self._malformed()
        self._pos += 1
        return True

    def _step(self) -> bool:
        """One move of the walk; False at the end of the document."""
        state = self._state
        if state == _START:
            char = self._skip_space()
            if char == "{":
                self._pos += 1
                self._state = _KEY_OR_END
            elif char == "":
                raise ValueError(NOT_JSON)
            else:
                self._state = _OTHER  # decoded whole at the end, for its error message
            return True
        if state in (_KEY_OR_END, _KEY):
            char = self._skip_space()
            if char == "}" and state == _KEY_OR_END:
                self._pos += 1
                self._state = _END
            elif char == '"':
                self._key = self._value()
                self._state = _COLON
            else:
                self._malformed()
            return True
        if state == _COLON:
            if self._skip_space() != ":":
                self._malformed()
            self._pos += 1
            self._state = _VALUE
            return True
        if state == _VALUE:
            char = self._skip_space()
            if self._key == "items":
                # The last "items" counts, as in json.loads.
                self.pods, self.skipped, self._items_ok = [], 0, char == "["
                if char == "[":
                    self._pos += 1
                    self._state = _ITEM_OR_END
                    return True
            value = self._value()
            if self._key == "kind":
                self._kind = value
            elif self._key == "metadata":
                self._metadata = value
            self._state = _NEXT
            return True
        if state in (_ITEM_OR_END, _ITEM):
            char = self._skip_space()
            if char == "]" and state == _ITEM_OR_END:
                self._pos += 1
                self._state = _NEXT
                return True
            self._item(self._value())
            self._state = _ITEM_NEXT
            return True
        if state == _ITEM_NEXT:  # after an item: another, or the end of "items"
            return self._separator("]", _ITEM, _NEXT)
        if state == _NEXT:  # after a top-level value: another key, or the end of the document
            return self._separator("}", _KEY, _END)
        if state == _END:
            char = self._skip_space()
            if char:
                raise ValueError(NOT_JSON)
            return False
        # _OTHER: the top level is not an object; held whole (bounded) for finish().
        if len(self._text) - self._pos > self.max_value_chars:
            raise ValueError(f"response has a value larger than {_size(self.max_value_chars)}")
        return False

    def _item(self, item: Any) -> None:
        try:
            self.pods.append(pod_from_json(item))
        except (ValueError, AttributeError, TypeError, RecursionError) as error:
            self.skipped += 1
            if self.log:
                self.log.debug("skipping a malformed pod in the list: %s", type(error).__name__)

    def _other_document(self) -> PodListPage:
        try:
            document = json.loads(self._text[self._pos :])
        except _BAD_JSON as error:
            raise ValueError(f"response is not JSON ({type(error).__name__})") from None
        raise ValueError(f"response is not a PodList (kind {type(document).__name__!r})")


def _size(chars: int) -> str:
    return f"{chars / 2**20:g} MiB"


def decode_pod_list(data: bytes | str, log: logging.Logger | None = None) -> PodListPage:
    """A whole PodList document at once (see PodListDecoder).  Pure: raises only ValueError."""
    decoder = PodListDecoder(log)
    if isinstance(data, str):
        decoder.feed_text(data)
    else:
        decoder.feed(data)
    return decoder.finish()
