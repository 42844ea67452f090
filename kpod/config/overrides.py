"""`KPOD_*` environment variables: one per leaf of the `kpod:` section, winning over the file."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

from kpod.config.env import scalar
from kpod.config.errors import ConfigError
from kpod.config.yamlfile import LineMap
from kpod.settings import KpodSettings
from kpod.units import Duration


def leaf_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for name, tp in typing.get_type_hints(cls).items():
        if not any(f.name == name for f in dataclasses.fields(cls)):
            continue
        if dataclasses.is_dataclass(tp) and tp is not Duration:
            out.extend(leaf_paths(tp, (*prefix, name)))  # type: ignore[arg-type]
        else:
            out.append(((*prefix, name), tp))
    return out


def env_var_name(path: tuple[str, ...]) -> str:
    return "KPOD_" + "_".join(path).upper()


def env_overrides(environ: typing.Mapping[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    """(variable, key path under kpod, raw value) for every KPOD_* variable that is set."""
    found = []
    for path, tp in leaf_paths(KpodSettings):
        name = env_var_name(path)
        if name in environ:
            raw = environ[name]
            value: Any = (
                [item.strip() for item in raw.split(",") if item.strip()]
                if typing.get_origin(tp) is list
                else scalar(raw)
            )
            found.append((name, path, value))
    return found


def apply_overrides(kpod: Any, environ: typing.Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    """Put KPOD_* values into the raw `kpod:` mapping; returns it and {dotted key: variable}."""
    if kpod is None:
        kpod = LineMap()
        kpod.key_lines = {}
    if not isinstance(kpod, dict):
        return kpod, {}
    sources: dict[str, str] = {}
    for variable, path, value in env_overrides(environ):
        node = kpod
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = LineMap()
                child.key_lines = {}
                node[part] = child
            node = child
        node[path[-1]] = value
        if isinstance(node, LineMap):
            node.key_lines.pop(path[-1], None)
        sources["kpod." + ".".join(path)] = variable
    return kpod, sources


def blame_environment(error: ConfigError, env_sources: dict[str, str]) -> ConfigError:
    message = str(error)
    for key, variable in env_sources.items():
        if f": {key}: " in message:
            return ConfigError(f"{variable} (environment): {key}: {message.split(f': {key}: ', 1)[1]}")
    return error
