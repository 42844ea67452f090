"""Load and validate the agent's YAML config.

One validator for everything: the `kpod:` section and every component's config are
dataclasses, and `build()` checks YAML against their type hints.  Every problem becomes a
`ConfigError` whose message is one line naming the file, the line where known, and the key:

    config.yaml:12: kpod.poll_interval: expected a duration like 30s, 500ms, 2m or 1h, got 'soon'

Order of precedence: dataclass defaults < the file < `KPOD_*` environment variables.
`${env:VAR}` and `${env:VAR:-default}` are substituted in every string value of the file.
"""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from kpod import profiles
from kpod.component import Factory
from kpod.kernel.syscalls import resolve_syscalls
from kpod.registry import Registry, UnknownComponent, split_id
from kpod.settings import KpodSettings
from kpod.units import Duration

MAX_LIST_ITEMS = 1000  # longer lists in a config are a mistake (or an attack), not a setting


class ConfigError(Exception):
    """A config problem, as one line."""


MAX_MESSAGE_PART = 300  # a hostile file must not turn the one-line error into a 100 KB line


def _short(text: str) -> str:
    """One line, bounded: a key or message quoting a huge or multi-line value stays readable."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= MAX_MESSAGE_PART else text[: MAX_MESSAGE_PART - 3] + "..."


# --------------------------------------------------------------------------- YAML with lines


class _LineMap(dict):  # type: ignore[type-arg]
    """A YAML mapping that remembers the line of each key (1-based)."""

    line: int = 0
    key_lines: dict[str, int]


class _LineList(list):  # type: ignore[type-arg]
    line: int = 0


class _Loader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> _LineMap:
    result = _LineMap()
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


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> _LineList:
    result = _LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    return result


_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def substitute_env(value: str, environ: typing.Mapping[str, str]) -> Any:
    """Replace ${env:VAR} / ${env:VAR:-default}.  A value that is exactly one reference is
    re-read as a YAML scalar, so `${env:POLL_MS}` can be an integer."""

    def replace(match: re.Match[str]) -> str:
        found = environ.get(match.group(1))
        if found is None or (found == "" and match.group(2) is not None):
            return match.group(2) or ""
        return found

    whole = _ENV_REF.fullmatch(value)
    substituted = _ENV_REF.sub(replace, value)
    if whole:
        return _scalar(substituted)
    return substituted


def _scalar(text: str) -> Any:
    """Read text as YAML reads a plain scalar: '30000' -> 30000, 'true' -> True."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) else text


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
        raise ConfigError(_short(f"YAML error: {error}")) from None
    loader.environ = environ  # type: ignore[attr-defined]
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"line {mark.line + 1}: " if mark else ""
        raise ConfigError(_short(f"{where}YAML syntax error: {error.problem}")) from None
    except yaml.YAMLError as error:
        raise ConfigError(_short(f"YAML error: {error}")) from None
    except RecursionError:
        # PyYAML composes nodes recursively: thousands of nested [ or { exhaust the stack.
        raise ConfigError("YAML error: nested too deeply") from None
    finally:
        loader.dispose()


# --------------------------------------------------------------------------- typed building


@dataclass
class _Where:
    """Where a value came from, for error messages."""

    source: str  # the file name, or "environment"
    key: str  # dotted key path
    line: int = 0

    def child(self, key: str, container: Any) -> _Where:
        line = self.line
        if isinstance(container, _LineMap):
            line = container.key_lines.get(key, container.line)
        return _Where(self.source, f"{self.key}.{key}" if self.key else key, line)

    def error(self, message: str) -> ConfigError:
        prefix = f"{self.source}:{self.line}" if self.line else self.source
        return ConfigError(f"{prefix}: {_short(self.key)}: {_short(message)}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _build_value(tp: Any, value: Any, where: _Where, meta: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build_value(args[0], value, where, meta)
    if tp is Duration:
        try:
            duration = Duration.parse(value)
        except ValueError as error:
            raise where.error(str(error)) from None
        _check_range(duration.seconds, where, meta)
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
        _check_range(value, where, meta)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise where.error(f"expected a number, got {value!r}")
        _check_range(value, where, meta)
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
        return [_build_value(item_type, item, where, {}) for item in value]
    if origin is dict:
        _, item_type = typing.get_args(tp)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise where.error(f"expected a mapping, got {value!r}")
        return {str(k): _build_value(item_type, v, where.child(str(k), value), {}) for k, v in value.items()}
    if tp is Any:
        return value
    raise where.error(f"unsupported setting type {_type_name(tp)}")


def _check_range(value: float, where: _Where, meta: typing.Mapping[str, Any]) -> None:
    low = meta.get("min", 0)
    high = meta.get("max")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise where.error(f"must be {bound}, got {value}")


def build(cls: type, data: Any, where: _Where) -> Any:
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
        values[key] = _build_value(hints[key], value, where.child(key, data), fields[key].metadata)
    instance = cls(**values)
    validate = getattr(instance, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as error:
            raise where.error(str(error)) from None
    return instance


# --------------------------------------------------------------------------- KPOD_* overrides


def _leaf_paths(cls: type, prefix: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    out: list[tuple[tuple[str, ...], Any]] = []
    for name, tp in typing.get_type_hints(cls).items():
        if not any(f.name == name for f in dataclasses.fields(cls)):
            continue
        if dataclasses.is_dataclass(tp) and tp is not Duration:
            out.extend(_leaf_paths(tp, (*prefix, name)))  # type: ignore[arg-type]
        else:
            out.append(((*prefix, name), tp))
    return out


def env_var_name(path: tuple[str, ...]) -> str:
    return "KPOD_" + "_".join(path).upper()


def env_overrides(environ: typing.Mapping[str, str]) -> list[tuple[str, tuple[str, ...], Any]]:
    """(variable, key path under kpod, raw value) for every KPOD_* variable that is set."""
    found = []
    for path, tp in _leaf_paths(KpodSettings):
        name = env_var_name(path)
        if name in environ:
            raw = environ[name]
            value: Any = (
                [item.strip() for item in raw.split(",") if item.strip()]
                if typing.get_origin(tp) is list
                else _scalar(raw)
            )
            found.append((name, path, value))
    return found


def _apply_overrides(kpod: Any, environ: typing.Mapping[str, str]) -> tuple[Any, dict[str, str]]:
    """Put KPOD_* values into the raw `kpod:` mapping; returns it and {dotted key: variable}."""
    if kpod is None:
        kpod = _LineMap()
        kpod.key_lines = {}
    if not isinstance(kpod, dict):
        return kpod, {}
    sources: dict[str, str] = {}
    for variable, path, value in env_overrides(environ):
        node = kpod
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = _LineMap()
                child.key_lines = {}
                node[part] = child
            node = child
        node[path[-1]] = value
        if isinstance(node, _LineMap):
            node.key_lines.pop(path[-1], None)
        sources["kpod." + ".".join(path)] = variable
    return kpod, sources


# --------------------------------------------------------------------------- the agent config


@dataclass
class ComponentConfig:
    id: str
    kind: str
    factory: Factory
    config: Any
    # Receivers only: collect on this interval instead of the poll interval.
    interval: Duration | None = None


@dataclass
class AgentConfig:
    source: str
    kpod: KpodSettings
    receivers: list[ComponentConfig] = field(default_factory=list)
    processors: list[ComponentConfig] = field(default_factory=list)
    exporters: list[ComponentConfig] = field(default_factory=list)


TOP_LEVEL_KEYS = ("kpod", "receivers", "processors", "exporters", "service")
DEFAULT_PROCESSORS = ["k8sattributes"]
DEFAULT_EXPORTERS = ["prometheus"]
# Keys every receiver accepts in addition to its own.
COMMON_RECEIVER_KEYS = ("interval",)


def default_discovery_mode(environ: typing.Mapping[str, str]) -> str:
    """Inside a pod (the API server's address is in the environment) informer, else local."""
    return "informer" if environ.get("KUBERNETES_SERVICE_HOST") else "local"


def load_config(
    path: str | None,
    environ: typing.Mapping[str, str] | None = None,
    registry: Registry | None = None,
) -> AgentConfig:
    """Read, substitute, override, validate.  Raises ConfigError (one line) on any problem."""
    try:
        return _load_config(path, environ, registry)
    except ConfigError:
        raise
    except (RecursionError, OverflowError, MemoryError, ValueError, TypeError, AttributeError, KeyError) as error:
        # A validation bug must still end as the promised one-line error, not a traceback; the
        # words "internal error" make it recognisable (the fuzz tests fail on them).
        raise ConfigError(
            f"{path or '<defaults>'}: internal error while validating: {type(error).__name__}: {_short(str(error))}"
        ) from None


def _load_config(
    path: str | None,
    environ: typing.Mapping[str, str] | None,
    registry: Registry | None,
) -> AgentConfig:
    environ = os.environ if environ is None else environ
    registry = registry or Registry()
    source = path or "<defaults>"
    if path is None:
        document: Any = _LineMap()
        document.key_lines = {}
    else:
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
            raise ConfigError(f"{path}: cannot read: {reason}") from None
        try:
            document = parse_yaml(text, environ)
        except ConfigError as error:
            message = str(error)
            if message.startswith("line "):
                raise ConfigError(f"{path}:{message.removeprefix('line ')}") from None
            raise ConfigError(f"{path}: {message}") from None
        if document is None:
            document = _LineMap()
            document.key_lines = {}
    root = _Where(source, "")
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the file must be a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise root.child(key, document).error(f"unknown top-level key (known: {', '.join(TOP_LEVEL_KEYS)})")

    raw_kpod, env_sources = _apply_overrides(document.get("kpod"), environ)
    try:
        kpod: KpodSettings = build(KpodSettings, raw_kpod, root.child("kpod", document))
    except ConfigError as error:
        raise _blame_environment(error, env_sources) from None
    _finish_settings(kpod, root.child("kpod", document), environ)

    config = AgentConfig(source=source, kpod=kpod)
    declared = {
        kind: _declared(document, section, root)
        for kind, section in (("receiver", "receivers"), ("processor", "processors"), ("exporter", "exporters"))
    }
    pipeline = _pipeline(document, root)
    profile_overrides = dict(profiles.profile_receivers(kpod.profile))
    # Every declared component is checked, in file order, even if no pipeline uses it.
    built: dict[tuple[str, str], ComponentConfig] = {}
    for kind, entries in declared.items():
        for component_id, (raw, where) in entries.items():
            overrides_for = profile_overrides.get(component_id, {}) if kind == "receiver" else {}
            built[kind, component_id] = _component(registry, kind, component_id, raw, where, overrides_for)

    # Receivers: the profile's, plus any the pipeline names (custom: only those).
    receiver_ids: list[str] = []
    overrides: dict[str, dict[str, Any]] = {}
    for type_name, profile_overrides in profiles.profile_receivers(kpod.profile):
        if not kpod.bpf.enabled and _requires_bpf(registry, type_name):
            continue
        receiver_ids.append(type_name)
        overrides[type_name] = profile_overrides
    for component_id, where in pipeline["receivers"]:
        if component_id not in declared["receiver"] and component_id not in receiver_ids:
            raise where.error(f"receiver {component_id!r} is not declared under receivers:")
        if component_id not in receiver_ids:
            receiver_ids.append(component_id)
    if not receiver_ids:
        raise root.child("service", document).error(
            "no receivers: with profile custom, list them in service.pipelines.metrics.receivers"
        )
    processor_ids = [cid for cid, _ in pipeline["processors"]] or list(DEFAULT_PROCESSORS)
    # Without a pipeline, the Prometheus exporter with its defaults (the file may configure it).
    exporter_ids = [cid for cid, _ in pipeline["exporters"]] or (
        [] if "service" in document else list(DEFAULT_EXPORTERS)
    )
    for kind, ids, wheres in (
        ("processor", processor_ids, dict(pipeline["processors"])),
        ("exporter", exporter_ids, dict(pipeline["exporters"])),
    ):
        for component_id in ids:
            if component_id in wheres and component_id not in declared[kind]:
                raise wheres[component_id].error(f"{kind} {component_id!r} is not declared under {kind}s:")
    if not exporter_ids:
        raise root.child("service", document).error("the metrics pipeline has no exporters")

    for kind, ids, target in (
        ("receiver", receiver_ids, config.receivers),
        ("processor", processor_ids, config.processors),
        ("exporter", exporter_ids, config.exporters),
    ):
        for component_id in ids:
            if (kind, component_id) in built:
                target.append(built[kind, component_id])
                continue
            # Implied by the profile or the default pipeline.
            where = root.child("kpod", document).child("profile", raw_kpod)
            target.append(_component(registry, kind, component_id, None, where, overrides.get(component_id, {})))
    return config


def _blame_environment(error: ConfigError, env_sources: dict[str, str]) -> ConfigError:
    message = str(error)
    for key, variable in env_sources.items():
        if f": {key}: " in message:
            return ConfigError(f"{variable} (environment): {key}: {message.split(f': {key}: ', 1)[1]}")
    return error


def _finish_settings(kpod: KpodSettings, where: _Where, environ: typing.Mapping[str, str]) -> None:
    """Cross-field checks and defaults that depend on the environment."""
    if kpod.profile not in KpodSettings.PROFILES:
        raise where.child("profile", {}).error(f"must be one of {', '.join(KpodSettings.PROFILES)}")
    if kpod.discovery.mode == "":
        kpod.discovery.mode = default_discovery_mode(environ)
    if kpod.discovery.mode not in kpod.discovery.CHOICES:
        raise _Where(where.source, "kpod.discovery.mode", where.line).error(
            f"must be one of {', '.join(kpod.discovery.CHOICES)}, got {kpod.discovery.mode!r}"
        )
    if kpod.poll_interval.seconds < 0.1:
        raise _Where(where.source, "kpod.poll_interval", where.line).error("must be at least 100ms")
    if not kpod.node_name:
        kpod.node_name = socket.gethostname()
    # The default URL names ${env:NODE_IP}; a default never went through the file's substitution.
    kpod.discovery.kubelet.url = str(substitute_env(kpod.discovery.kubelet.url, environ))
    try:
        resolve_syscalls(kpod.syscall.tracked_syscalls)
    except ValueError as error:
        raise _Where(where.source, "kpod.syscall.tracked_syscalls", where.line).error(str(error)) from None
    if not 1 <= kpod.bpf.map_max_entries <= 1_048_576:
        raise _Where(where.source, "kpod.bpf.map_max_entries", where.line).error(
            "must be between 1 and 1048576"
        )
    selector = kpod.filter.label_selector
    if selector:
        from kpod.processors.k8sattributes.selector import parse_selector
        try:
            parse_selector(selector)
        except ValueError as error:
            raise _Where(where.source, "kpod.filter.label_selector", where.line).error(str(error)) from None


def _requires_bpf(registry: Registry, type_name: str) -> bool:
    try:
        return registry.factory("receiver", type_name).requires_bpf
    except UnknownComponent:
        return False


def _declared(document: dict[str, Any], section: str, root: _Where) -> dict[str, tuple[Any, _Where]]:
    value = document.get(section)
    where = root.child(section, document)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping of component ids, got {value!r}")
    out: dict[str, tuple[Any, _Where]] = {}
    for component_id, raw in value.items():
        child = where.child(component_id, value)
        type_name, name = split_id(component_id)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", type_name) or (name and not re.fullmatch(r"[\w.-]+", name)):
            raise child.error("a component id is type[/name], e.g. otlp or otlp/backup")
        out[component_id] = (raw, child)
    return out


def _pipeline(document: dict[str, Any], root: _Where) -> dict[str, list[tuple[str, _Where]]]:
    service = document.get("service") or {}
    where = root.child("service", document)
    if not isinstance(service, dict):
        raise where.error("expected a mapping with key pipelines")
    for key in service:
        if key != "pipelines":
            raise where.child(key, service).error("unknown key (known keys: pipelines)")
    pipelines = service.get("pipelines") or {}
    where = where.child("pipelines", service)
    if not isinstance(pipelines, dict):
        raise where.error("expected a mapping with key metrics")
    for key in pipelines:
        if key != "metrics":
            raise where.child(key, pipelines).error("unknown pipeline (only metrics exists)")
    metrics = pipelines.get("metrics")
    where = where.child("metrics", pipelines)
    if metrics is None:
        metrics = {}
    if not isinstance(metrics, dict):
        raise where.error("expected a mapping with keys receivers, processors, exporters")
    out: dict[str, list[tuple[str, _Where]]] = {}
    for key in metrics:
        if key not in ("receivers", "processors", "exporters"):
            raise where.child(key, metrics).error("unknown key (known keys: receivers, processors, exporters)")
    for key in ("receivers", "processors", "exporters"):
        items = metrics.get(key) or []
        child = where.child(key, metrics)
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise child.error("expected a list of component ids")
        if len(set(items)) != len(items):
            raise child.error("lists a component twice")
        out[key] = [(item, child) for item in items]
    return out


def _component(
    registry: Registry, kind: str, component_id: str, raw: Any, where: _Where, overrides: dict[str, Any]
) -> ComponentConfig:
    type_name, _ = split_id(component_id)
    try:
        factory = registry.factory(kind, type_name)
    except UnknownComponent as error:
        raise where.error(str(error)) from None
    if raw is not None and not isinstance(raw, dict):
        raise where.error(f"expected a mapping of settings, got {raw!r}")
    merged: dict[str, Any] = _LineMap()
    merged.key_lines = dict(getattr(raw, "key_lines", {}))
    merged.line = getattr(raw, "line", where.line)
    merged.update(overrides)
    merged.update(raw or {})
    interval = None
    if kind == "receiver" and "interval" in merged:
        interval = _build_value(Duration, merged.pop("interval"), where.child("interval", merged), {"min": 0.1})
    config = build(factory.config_class, merged, where)
    return ComponentConfig(component_id, kind, factory, config, interval)
