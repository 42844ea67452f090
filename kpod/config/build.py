"""Typed building: YAML values into the config dataclasses, checked against their type hints.

Unknown keys, wrong types and out-of-range values are errors naming the key and its line; a
dataclass with a `validate()` method is validated once built (a ValueError names the key).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass
from typing import Any

from kpod.config.errors import ConfigError, short
from kpod.config.yamlfile import LineMap
from kpod.units import Duration

MAX_LIST_ITEMS = 1000  # longer lists in a config are a mistake (or an attack), not a setting


@dataclass
class Where:
    """Where a value came from, for error messages."""

    source: str  # the file name, or "environment"
    key: str  # dotted key path
    line: int = 0

    def child(self, key: str, container: Any) -> Where:
        line = self.line
        if isinstance(container, LineMap):
            line = container.key_lines.get(key, container.line)
        return Where(self.source, f"{self.key}.{key}" if self.key else key, line)

    def error(self, message: str) -> ConfigError:
        prefix = f"{self.source}:{self.line}" if self.line else self.source
        return ConfigError(f"{prefix}: {short(self.key)}: {short(message)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def build_value(tp: Any, value: Any, where: Where, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return build_value(args[0], value, where, meta)
    if tp is Duration:
        try:
            duration = Duration.parse(value)
        except ValueError as error:
            raise where.error(str(error)) from None
        check_range(duration.seconds, where, meta)
        return duration
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        return build(tp, value, where)  # type: ignore[arg-type]
    if tp is bool:
        if not isinstance(value, bool):
            raise where.error(f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise where.error(f"expected an integer, got {value!r}")
        check_range(value, where, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise where.error(f"expected a number, got {value!r}")
        check_range(value, where, meta)
        try:
            return float(value)
        except OverflowError:  # an integer with hundreds of digits
            raise where.error("number out of range") from None
    if tp is str:
        if not isinstance(value, str):
            raise where.error(f"expected a string, got {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise where.error(f"must be one of {', '.join(choices)}, got {value!r}")
        return value
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if value is None:
            return []
        if not isinstance(value, list):
            raise where.error(f"expected a list, got {value!r}")
        limit = meta.get("max_items", MAX_LIST_ITEMS)
        if len(value) > limit:
            raise where.error(f"at most {limit} items, got {len(value)}")
        return [build_value(item_type, item, where, {}) for item in value]
    if origin is dict:
        _, item_type = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise where.error(f"expected a mapping, got {value!r}")
        return {str(k): build_value(item_type, v, where.child(str(k), value), {}) for k, v in value.items()}
    if tp is Any:
        return value
    raise where.error(f"unsupported setting type {_type_name(tp)}")


def check_range(value: float, where: Where, meta: typing.Mapping[str, Any]) -> None:
    low = meta.get("min", 0)
    high = meta.get("max")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise where.error(f"must be {bound}, got {value}")


def build(cls: type, data: Any, where: Where) -> Any:
    """Build dataclass `cls` from a YAML mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise where.error(f"expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [key for key in data if key not in fields]
    if unknown:
        child = where.child(unknown[0], data)
        raise child.error(f"unknown key (known keys: {', '.join(fields)})")
    values: dict[str, Any] = {}
    for key, value in data.items():
        values[key] = build_value(hints[key], value, where.child(key, data), fields[key].metadata)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as error:
            raise _blame_field(str(error), fields, data, where) from None
    return instance


def _blame_field(message: str, fields: typing.Mapping[str, Any], data: Any, where: Where) -> ConfigError:
    """A validate() error that starts with one of the dataclass's fields ("endpoint: ...",
    "tls.cert_file and ...", "backoff_max must ...") names that field's full key and line."""
    first = re.split(r"[ :.]", message, maxsplit=1)[0]
    if first not in fields:
        return where.error(message)
    rest = message[len(first) + 2 :] if message.startswith(first + ": ") else message
    return where.child(first, data).error(rest)
