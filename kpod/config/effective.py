"""The effective config as YAML: what the agent runs with, for bug reports (`kpod-metrics config
--effective`).

Defaults filled in, `${env:...}` substituted, `KPOD_*` overrides applied, the profile's receivers
and the default pipeline spelled out.  The document loads again as it is (load_config gives the
same AgentConfig back), except that secrets are not printed: header values (OTLP credentials)
show as "<redacted>".
"""

from __future__ import annotations

import dataclasses
from typing import Any

import yaml

from kpod.config.assemble import AgentConfig, ComponentConfig
from kpod.units import Duration

REDACTED = "<redacted>"
# Keys whose values are credentials (OTLP `headers: {authorization: Bearer ...}`).
SECRET_MAPPINGS = ("headers",)


def plain(value: Any, key: str = "") -> Any:
    """A config value as YAML writes it: dataclasses as mappings, durations as "30s"."""
    if isinstance(value, Duration):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name), f.name) for f in dataclasses.fields(value) if f.init}
    if isinstance(value, dict):
        if key in SECRET_MAPPINGS:
            return {str(k): REDACTED for k in value}
        return {str(k): plain(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, str):
        return str(value)  # an EnvText is a plain string here
    return value


def _component(spec: ComponentConfig) -> dict[str, Any]:
    document = plain(spec.config) if spec.config is not None else {}
    if spec.interval is not None:
        document["interval"] = str(spec.interval)
    return document


def effective_document(config: AgentConfig) -> dict[str, Any]:
    def section(specs: list[ComponentConfig]) -> dict[str, Any]:
        return {spec.id: _component(spec) for spec in specs}

    return {
        "kpod": plain(config.kpod),
        "receivers": section(config.receivers),
        "processors": section(config.processors),
        "exporters": section(config.exporters),
        "service": {
            "pipelines": {
                "metrics": {
                    "receivers": [spec.id for spec in config.receivers],
                    "processors": [spec.id for spec in config.processors],
                    "exporters": [spec.id for spec in config.exporters],
                }
            }
        },
    }


def effective_yaml(config: AgentConfig) -> str:
    header = f"# kpod-metrics effective config (from {config.source}; defaults, ${{env:...}} and KPOD_* applied)\n"
    return header + yaml.safe_dump(effective_document(config), sort_keys=False, default_flow_style=False)
