"""Plugin lookup: component types by name, through entry points.

Built-in components are entry points of this package, so they are found exactly like a
third-party package's.  A type's entry point is imported only when a config names it.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from kpod.component import KIND_GROUPS, Factory

# Checks of `kpod:` settings whose rules belong to a component (the label-selector grammar of
# k8sattributes, the syscall table of the kernel package): entry point name = the dotted key
# under `kpod`, value = a callable that takes the setting and raises ValueError (one line).
# Found like the components, so that the config loader never imports component code itself.
SETTINGS_CHECKS_GROUP = "kpod.settings_checks"


class UnknownComponent(LookupError):
    pass


class Registry:
    def __init__(self) -> None:
        self._cache: dict[tuple[str, str], Factory] = {}

    def types(self, kind: str) -> list[str]:
        return sorted(ep.name for ep in entry_points(group=KIND_GROUPS[kind]))

    def factory(self, kind: str, type_name: str) -> Factory:
        key = (kind, type_name)
        if key in self._cache:
            return self._cache[key]
        found = [ep for ep in entry_points(group=KIND_GROUPS[kind]) if ep.name == type_name]
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

    def settings_checks(self) -> list[tuple[str, Callable[[Any], object]]]:
        """(dotted key under kpod, check) for every installed settings check, by key."""
        checks = []
        for ep in sorted(entry_points(group=SETTINGS_CHECKS_GROUP), key=lambda ep: ep.name):
            try:
                checks.append((ep.name, ep.load()))
            except Exception as error:  # a broken plugin: one line, not a traceback
                raise UnknownComponent(f"settings check {ep.name!r} failed to load: {error}") from error
        return checks


def split_id(component_id: str) -> tuple[str, str]:
    """'otlp/backup' -> ('otlp', 'backup'); 'prometheus' -> ('prometheus', '')."""
    type_name, _, name = component_id.partition("/")
    return type_name, name
