"""The config file as YAML that remembers the line of every key (for errors that name it).

Mappings and lists come back as LineMap / LineList (a dict / list with `line` and, for mappings,
`key_lines`); strings have `${env:...}` substituted as they are read (kpod.config.env).
"""

from __future__ import annotations

import typing
from typing import Any

import yaml

from kpod.config.env import substitute_env
from kpod.config.errors import ConfigError, short


class LineMap(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[str, int]


class LineList(list):  # type: ignore[type-arg]
    line: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineMap:
    result = LineMap()
    result.line = node.start_mark.line + 1
    result.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key)
        line = key_node.start_mark.line + 1
        if key in result:
            raise ConfigError(f"line {line}: duplicate key {key!r}")
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = line
    return result


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    return result


def _construct_str(loader: _Loader, node: yaml.ScalarNode) -> Any:
    value = loader.construct_scalar(node)
    if "${env:" in value:
        return substitute_env(value, loader.environ)  # type: ignore[attr-defined]
    return value


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)
_Loader.add_constructor("tag:yaml.org,2002:str", _construct_str)


def parse_yaml(text: str, environ: typing.Mapping[str, str]) -> Any:
    try:
        # The reader checks the characters at once: a NUL byte fails here, before any parsing.
        loader = _Loader(text)
    except yaml.YAMLError as error:
        raise ConfigError(short(f"YAML error: {error}")) from None
    loader.environ = environ  # type: ignore[attr-defined]
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(short(f"{where}YAML syntax error: {error.problem}")) from None
    except yaml.YAMLError as error:
        raise ConfigError(short(f"YAML error: {error}")) from None
    except RecursionError:
        # PyYAML composes nodes recursively: thousands of nested [ or { exhaust the stack.
        raise ConfigError("YAML error: nested too deeply") from None
    finally:
        loader.dispose()
