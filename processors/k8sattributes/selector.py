"""Kubernetes label selectors (the full string syntax) and the pod filter built on them.

Grammar, as `kubectl get -l` takes it:

    selector    := "" | requirement ("," requirement)*
    requirement := key ("=" | "==" | "!=") value
                 | key ("in" | "notin") "(" value ("," value)* ")"
                 | key | "!" key

Semantics (the API server's): `k=v`/`k==v` and `k in (...)` need the label to exist with a
listed value; `k!=v` and `k notin (...)` also match pods without the label; `k` needs the label,
`!k` its absence.  Requirements are ANDed.  `parse_selector` raises ValueError with one line a
user can act on; the config loader calls it to reject a bad `kpod.filter.label_selector`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# Label names: an optional DNS-subdomain prefix and "/", then up to 63 characters starting and
# ending with an alphanumeric.  Values: the same shape without a prefix, or empty.
_NAME = r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^(?:[a-z0-9](?:[-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^(?:{_NAME})?$")

EQUALS, NOT_EQUALS, IN, NOT_IN, EXISTS, NOT_EXISTS = "=", "!=", "in", "notin", "exists", "!"

# Characters that end a bare word.
_SPECIAL = set(" \t\n\r,()=!")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    operator: str  # one of EQUALS, NOT_EQUALS, IN, NOT_IN, EXISTS, NOT_EXISTS
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == EXISTS:
            return present
        if self.operator == NOT_EXISTS:
            return not present
        if self.operator in (EQUALS, IN):
            return present and labels[self.key] in self.values
        # != and notin: a pod without the label matches, as in the API server.
        return not present or labels[self.key] not in self.values


@dataclass(frozen=True, slots=True)
class Selector:
    requirements: tuple[Requirement, ...] = ()
    text: str = ""

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(r.matches(labels) for r in self.requirements)

    def __bool__(self) -> bool:
        return bool(self.requirements)


class _Lexer:
    """Tokens: words, and the operators = == != ! ( ) , ; whitespace separates."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def _skip_space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> tuple[str, int]:
        saved = self.pos
        token = self.next()
        start = self._last_start
        self.pos = saved
        return token, start

    def next(self) -> str:
        """The next token, "" at the end."""
        self._skip_space()
        self._last_start = self.pos
        if self.pos >= len(self.text):
            return ""
        char = self.text[self.pos]
        two = self.text[self.pos : self.pos + 2]
        if two in ("==", "!="):
            self.pos += 2
            return two
        if char in "=!(),":
            self.pos += 1
            return char
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] not in _SPECIAL:
            self.pos += 1
        return self.text[start : self.pos]

    _last_start = 0


def _error(text: str, position: int, message: str) -> ValueError:
    return ValueError(f"invalid label selector {text!r}: {message} at position {position}")


def _check_key(text: str, key: str, position: int) -> str:
    if not key or key in ("=", "==", "!=", "!", "(", ")", ","):
        raise _error(text, position, f"expected a label key, got {key!r}" if key else "expected a label key")
    if not _KEY.match(key):
        raise _error(text, position, f"{key!r} is not a valid label key")
    return key


def _check_value(text: str, value: str, position: int) -> str:
    if not _VALUE.match(value):
        raise _error(text, position, f"{value!r} is not a valid label value")
    return value


def _parse_values(text: str, lexer: _Lexer) -> frozenset[str]:
    token, position = lexer.peek()
    if token != "(":
        raise _error(text, position, 'expected "(" after in/notin')
    lexer.next()
    values: list[str] = []
    expect_value = True
    while True:
        token, position = lexer.peek()
        if token == "":
            raise _error(text, position, 'missing ")"')
        if token == ")":
            lexer.next()
            if expect_value and values:
                raise _error(text, position, "expected a value after ','")
            break
        if expect_value:
            if token == ",":
                raise _error(text, position, "expected a value")
            values.append(_check_value(text, lexer.next(), position))
            expect_value = False
        else:
            if token != ",":
                raise _error(text, position, f"expected ',' or ')', got {token!r}")
            lexer.next()
            expect_value = True
    if not values:
        raise _error(text, position, "in/notin needs at least one value")
    return frozenset(values)


def parse_selector(text: str) -> Selector:
    """Parse a label selector string.  Raises ValueError (one line) when it is not valid."""
    lexer = _Lexer(text)
    requirements: list[Requirement] = []
    if not text.strip():
        return Selector((), text)
    while True:
        token, position = lexer.peek()
        if token == "!":
            lexer.next()
            _, key_position = lexer.peek()
            key = _check_key(text, lexer.next(), key_position)
            requirements.append(Requirement(key, NOT_EXISTS))
        else:
            key = _check_key(text, lexer.next(), position)
            op, op_position = lexer.peek()
            if op in ("=", "==", "!="):
                lexer.next()
                value_token, value_position = lexer.peek()
                if value_token in ("=", "==", "!=", "!", "(", ")"):
                    raise _error(text, value_position, f"expected a value, got {value_token!r}")
                value = "" if value_token in ("", ",") else lexer.next()
                operator = NOT_EQUALS if op == "!=" else EQUALS
                requirements.append(
                    Requirement(key, operator, frozenset([_check_value(text, value, value_position)]))
                )
            elif op in ("in", "notin"):
                lexer.next()
                requirements.append(
                    Requirement(key, IN if op == "in" else NOT_IN, _parse_values(text, lexer))
                )
            elif op in ("", ","):
                requirements.append(Requirement(key, EXISTS))
            else:
                raise _error(text, op_position, f"expected =, ==, !=, in, notin, ',' or the end, got {op!r}")
        token, position = lexer.peek()
        if token == "":
            break
        if token != ",":
            raise _error(text, position, f"expected ',' or the end, got {token!r}")
        lexer.next()
        if lexer.peek()[0] == "":
            raise _error(text, len(text), "expected a requirement after ','")
    return Selector(tuple(requirements), text)


@dataclass(frozen=True)
class PodFilter:
    """Which pods get series: `kpod.filter`, applied identically in informer and kubelet mode.

    `namespaces` (when not empty) is an allow list, `exclude_namespaces` a deny list applied
    after it, `selector` is matched against the pod's labels (their values, by key).
    """

    namespaces: frozenset[str] = frozenset()
    exclude_namespaces: frozenset[str] = frozenset()
    selector: Selector = Selector()

    @classmethod
    def build(
        cls, namespaces: Iterable[str], exclude_namespaces: Iterable[str], label_selector: str
    ) -> PodFilter:
        return cls(frozenset(namespaces), frozenset(exclude_namespaces), parse_selector(label_selector))

    def allows(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.namespaces and namespace not in self.namespaces:
            return False
        if namespace in self.exclude_namespaces:
            return False
        return self.selector.matches(labels)


_LABEL_CHARS = re.compile(r"[^A-Za-z0-9_]")


def prometheus_label_name(pod_label: str) -> str:
    """`label_<name>` for an included pod label: every other character becomes "_".

    app.kubernetes.io/name -> label_app_kubernetes_io_name (the kube-state-metrics convention).
    """
    return "label_" + _LABEL_CHARS.sub("_", pod_label)


def include_label_names(include_labels: Iterable[str]) -> dict[str, str]:
    """Pod label -> Prometheus label name; ValueError when two labels end up with one name."""
    names: dict[str, str] = {}
    taken: dict[str, str] = {}
    for label in include_labels:
        if not label:
            raise ValueError("include_labels: an empty label name")
        name = prometheus_label_name(label)
        if name in taken and taken[name] != label:
            raise ValueError(f"include_labels: {taken[name]!r} and {label!r} both become {name!r}")
        taken[name] = label
        names[label] = name
    return names
