"""Plugin lookup: component types by name.

Built-in components are entry points of this package (pyproject.toml), and a third-party
package's components are entry points of that package.  The built-in ones are also listed in
BUILT_IN, so that the agent finds them without reading any installed distribution's metadata:
importlib.metadata and what it imports (zipfile, csv, importlib.resources ...) are about 1 MiB
of the agent's resident memory (tracemalloc, at start) that a node running only built-in
components would carry for its whole life.  The installed entry points are read the
first time a config names a type that is not built in (and for the list of known types in an
error message).  tests/test_registry.py checks that BUILT_IN and pyproject.toml's entry points
are the same.  A type's module is imported only when a config names it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from importlib import import_module
from typing import Any

from kpod.component import KIND_GROUPS, Factory

# Checks of `kpod:` settings whose rules belong to a component (the label-selector grammar of
# k8sattributes, the syscall table of the kernel package): entry point name = the dotted key
# under `kpod`, value = a callable that takes the setting and raises ValueError (one line).
# Found like the components, so that the config loader never imports component code itself.
SETTINGS_CHECKS_GROUP = "kpod.settings_checks"

# Entry point group -> name -> "module:attribute": this package's own entry points.
BUILT_IN: dict[str, dict[str, str]] = {
    "kpod.receivers": {
        "cpu_sched": "kpod.receivers.cpu_sched:factory",
        "memory": "kpod.receivers.memory:factory",
        "bpf_maps": "kpod.receivers.bpf_maps:factory",
        "cgroup_cpu": "kpod.receivers.cgroup_cpu:factory",
        "disk": "kpod.receivers.disk:factory",
        "net_iface": "kpod.receivers.net_iface:factory",
        "filesystem": "kpod.receivers.filesystem:factory",
        "cgroup_memory": "kpod.receivers.cgroup_memory:factory",
        "pressure": "kpod.receivers.pressure:factory",
        "net_tcp": "kpod.receivers.net_tcp:factory",
        "syscall": "kpod.receivers.syscall:factory",
    },
    "kpod.processors": {
        "filter": "kpod.processors.filter:factory",
        "k8sattributes": "kpod.processors.k8sattributes:factory",
    },
    "kpod.exporters": {
        "prometheus": "kpod.exporters.prometheus:factory",
        "otlp": "kpod.exporters.otlp:factory",
    },
    SETTINGS_CHECKS_GROUP: {
        "filter.label_selector": "kpod.processors.k8sattributes.selector:parse_selector",
        "syscall.tracked_syscalls": "kpod.kernel.syscalls:resolve_syscalls",
    },
}


class UnknownComponent(LookupError):
    pass


class _EntryPoint:
    """A built-in entry point: its name and "module:attribute" value, loaded as
    importlib.metadata.EntryPoint.load() does."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value

    def load(self) -> Any:
        module, _, attribute = self.value.partition(":")
        found: Any = import_module(module)
        for part in attribute.split("."):
            found = getattr(found, part)
        return found


def installed_entry_points(group: str) -> list[Any]:
    """The entry points of `group` of every installed distribution (this package's included)."""
    from importlib.metadata import entry_points  # only here: see the module's docstring

    return list(entry_points(group=group))


def is_built_in(kind: str, type_name: str) -> bool:
    return type_name in BUILT_IN[KIND_GROUPS[kind]]


class Registry:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], Factory] = {}

    def types(self, kind: str) -> list[str]:
        group = KIND_GROUPS[kind]
        return sorted(set(BUILT_IN[group]) | {ep.name for ep in installed_entry_points(group)})

    def factory(self, kind: str, type_name: str) -> Factory:
        key = (kind, type_name)
        if key in self._cache:
            return self._cache[key]
        group = KIND_GROUPS[kind]
        built_in = BUILT_IN[group].get(type_name)
        if built_in is not None:
            found: list[Any] = [_EntryPoint(type_name, built_in)]
        else:
            found = [ep for ep in installed_entry_points(group) if ep.name == type_name]
        if not found:
            known = ", ".join(self.types(kind)) or "none"
            raise UnknownComponent(f"unknown {kind} type {type_name!r} (known: {known})")
        try:
            factory = found[0].load()
        except Exception as error:  # a broken plugin must not take the agent down with a traceback
            raise UnknownComponent(f"{kind} type {type_name!r} failed to load: {error}") from error
        if not isinstance(factory, Factory) or factory.kind != kind:
            raise UnknownComponent(f"{kind} type {type_name!r}: entry point {found[0].value} is not a {kind} Factory")
        self._cache[key] = factory
        return factory

    def settings_checks(self, installed: bool = True) -> list[tuple[str, Callable[[Any], object]]]:
        """(dotted key under kpod, check) for every settings check, by key: the built-in ones,
        and with `installed` those of every installed distribution (read from their metadata)."""
        built_in = BUILT_IN[SETTINGS_CHECKS_GROUP]
        entry_points: Iterable[Any] = [_EntryPoint(name, value) for name, value in built_in.items()]
        if installed:
            others = [ep for ep in installed_entry_points(SETTINGS_CHECKS_GROUP) if ep.name not in built_in]
            entry_points = [*entry_points, *others]
        checks = []
        for ep in sorted(entry_points, key=lambda ep: ep.name):
            try:
                checks.append((ep.name, ep.load()))
            except Exception as error:  # a broken plugin: one line, not a traceback
                raise UnknownComponent(f"settings check {ep.name!r} failed to load: {error}") from error
        return checks


def split_id(component_id: str) -> tuple[str, str]:
    """'otlp/backup' -> ('otlp', 'backup'); 'prometheus' -> ('prometheus', '')."""
    type_name, _, name = component_id.partition("/")
    return type_name, name
