"""The agent config: the file (or the defaults) and the environment, built into the `kpod:`
settings and the components of the metrics pipeline.

The profile and `service.pipelines.metrics` decide which receivers, processors and exporters
run; every declared component is built and validated, used or not.  Checks that need more than
one key (cross-references, the environment's defaults) are here; each key's own type and range
are kpod.config.build's.
"""

from __future__ import annotations

import os
import re
import socket
import typing
from dataclasses import dataclass, field
from typing import Any

from kpod import profiles
from kpod.component import Factory
from kpod.config.build import Where, build, build_value
from kpod.config.env import substitute_env
from kpod.config.errors import ConfigError, short
from kpod.config.overrides import apply_overrides, blame_environment
from kpod.config.yamlfile import LineMap, parse_yaml
from kpod.registry import Registry, UnknownComponent, is_built_in, split_id
from kpod.settings import KpodSettings
from kpod.units import Duration


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
    # Valid but probably not meant: one line each, file:line first (validate prints them,
    # run logs them).
    warnings: list[str] = field(default_factory=list)


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
            f"{path or '<defaults>'}: internal error while validating: {type(error).__name__}: {short(str(error))}"
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
        document: Any = LineMap()
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
            document = LineMap()
            document.key_lines = {}
    root = Where(source, "")
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the file must be a YAML mapping with keys {', '.join(TOP_LEVEL_KEYS)}")
    for key in document:
        if key not in TOP_LEVEL_KEYS:
            raise root.child(key, document).error(f"unknown top-level key (known: {', '.join(TOP_LEVEL_KEYS)})")

    raw_kpod, env_sources = apply_overrides(document.get("kpod"), environ)
    try:
        kpod: KpodSettings = build(KpodSettings, raw_kpod, root.child("kpod", document))
    except ConfigError as error:
        raise blame_environment(error, env_sources) from None
    try:
        _finish_settings(kpod, raw_kpod, root.child("kpod", document), environ, registry, _names_plugins(document))
    except ConfigError as error:
        raise blame_environment(error, env_sources) from None

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

    config.warnings = _unused(declared, {"receiver": receiver_ids, "processor": processor_ids,
                                         "exporter": exporter_ids}, kpod, registry)  # fmt: skip
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


def _unused(declared: dict[str, dict[str, tuple[Any, Where]]], used: dict[str, list[str]], kpod: KpodSettings,
            registry: Registry) -> list[str]:  # fmt: skip
    """A component declared but in no pipeline is configured and never runs: say so."""
    found = []
    for kind, entries in declared.items():
        for component_id, (_, where) in entries.items():
            if component_id in used[kind]:
                continue
            if kind == "receiver" and not kpod.bpf.enabled and _requires_bpf(registry, split_id(component_id)[0]):
                why = "kpod.bpf.enabled is false"
            elif kind == "receiver":
                why = f"not in profile {kpod.profile} nor in service.pipelines.metrics.receivers"
            else:
                why = f"not in service.pipelines.metrics.{kind}s"
            found.append(where.error(f"declared but {why}: it will not run").args[0])
    return found


def _finish_settings(
    kpod: KpodSettings,
    raw_kpod: Any,
    where: Where,
    environ: typing.Mapping[str, str],
    registry: Registry,
    plugins: bool = True,
) -> None:
    """Cross-field checks, defaults that depend on the environment, and the checks that
    components own for settings of the `kpod:` section (the registry's settings checks)."""

    def at(dotted: str) -> Where:
        """Where a key under `kpod:` is: its own line when the file has it."""
        found, container = where, raw_kpod
        for part in dotted.split("."):
            found = found.child(part, container)
            container = container.get(part) if isinstance(container, dict) else None
        return found

    if kpod.profile not in KpodSettings.PROFILES:
        raise at("profile").error(f"must be one of {', '.join(KpodSettings.PROFILES)}")
    if kpod.discovery.mode == "":
        kpod.discovery.mode = default_discovery_mode(environ)
    if kpod.discovery.mode not in kpod.discovery.CHOICES:
        raise at("discovery.mode").error(
            f"must be one of {', '.join(kpod.discovery.CHOICES)}, got {kpod.discovery.mode!r}"
        )
    if kpod.poll_interval.seconds < 0.1:
        raise at("poll_interval").error("must be at least 100ms")
    if not kpod.node_name:
        kpod.node_name = socket.gethostname()
    # The default URL names ${env:NODE_IP}; a default never went through the file's substitution.
    # An EnvText when a variable is not set: kubelet discovery then says which at start.
    url = substitute_env(kpod.discovery.kubelet.url, environ)
    kpod.discovery.kubelet.url = url if isinstance(url, str) else str(url)
    if not 1 <= kpod.bpf.map_max_entries <= 1_048_576:
        raise at("bpf.map_max_entries").error("must be between 1 and 1048576")
    unknown_routes = [r for r in kpod.bpf.force_routes if r not in kpod.bpf.FORCE_ROUTES]
    if unknown_routes:
        raise at("bpf.force_routes").error(
            f"unknown route(s) {', '.join(unknown_routes)}; known: {', '.join(kpod.bpf.FORCE_ROUTES)}"
        )
    try:
        checks = registry.settings_checks(installed=plugins)
    except UnknownComponent as error:
        raise where.error(str(error)) from None
    for key, check in checks:
        value: Any = kpod
        for part in key.split("."):
            value = getattr(value, part)
        try:
            check(value)
        except ValueError as error:
            raise at(key).error(str(error)) from None


def _names_plugins(document: dict[str, Any]) -> bool:
    """Whether the file declares a component whose type is not built in: then the settings
    checks of installed plugins run too (kpod/registry.py reads installed metadata only then)."""
    for kind, section in (("receiver", "receivers"), ("processor", "processors"), ("exporter", "exporters")):
        declared = document.get(section)
        if isinstance(declared, dict) and any(not is_built_in(kind, split_id(str(cid))[0]) for cid in declared):
            return True
    return False


def _requires_bpf(registry: Registry, type_name: str) -> bool:
    try:
        return registry.factory("receiver", type_name).requires_bpf
    except UnknownComponent:
        return False


def _declared(document: dict[str, Any], section: str, root: Where) -> dict[str, tuple[Any, Where]]:
    value = document.get(section)
    where = root.child(section, document)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise where.error(f"expected a mapping of component ids, got {value!r}")
    out: dict[str, tuple[Any, Where]] = {}
    for component_id, raw in value.items():
        child = where.child(component_id, value)
        type_name, name = split_id(component_id)
        if not re.fullmatch(r"[a-z][a-z0-9_]*", type_name) or (name and not re.fullmatch(r"[\w.-]+", name)):
            raise child.error("a component id is type[/name], e.g. otlp or otlp/backup")
        out[component_id] = (raw, child)
    return out


def _pipeline(document: dict[str, Any], root: Where) -> dict[str, list[tuple[str, Where]]]:
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
    out: dict[str, list[tuple[str, Where]]] = {}
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
    registry: Registry, kind: str, component_id: str, raw: Any, where: Where, overrides: dict[str, Any]
) -> ComponentConfig:
    type_name, _ = split_id(component_id)
    try:
        factory = registry.factory(kind, type_name)
    except UnknownComponent as error:
        raise where.error(str(error)) from None
    if raw is not None and not isinstance(raw, dict):
        raise where.error(f"expected a mapping of settings, got {raw!r}")
    merged: dict[str, Any] = LineMap()
    merged.key_lines = dict(getattr(raw, "key_lines", {}))
    merged.line = getattr(raw, "line", where.line)
    merged.update(overrides)
    merged.update(raw or {})
    interval = None
    if kind == "receiver" and "interval" in merged:
        interval = build_value(Duration, merged.pop("interval"), where.child("interval", merged), {"min": 0.1})
    config = build(factory.config_class, merged, where)
    return ComponentConfig(component_id, kind, factory, config, interval)
