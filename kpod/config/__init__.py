"""Load and validate the agent's YAML config.

One validator for everything: the `kpod:` section and every component's config are
dataclasses, and `build()` checks YAML against their type hints.  Every problem becomes a
`ConfigError` whose message is one line naming the file, the line where known, and the key:

    config.yaml:12: kpod.poll_interval: expected a duration like 30s, 500ms, 2m or 1h, got 'soon'

Order of precedence: dataclass defaults < the file < `KPOD_*` environment variables.
`${env:VAR}` and `${env:VAR:-default}` are substituted in every string value of the file.

    errors.py     ConfigError: one line, file:line: key: message
    yamlfile.py   the YAML loader that keeps the line of every key
    env.py        ${env:...} substitution
    build.py      typed building and validation against the config dataclasses
    overrides.py  KPOD_* environment variables
    assemble.py   load_config: settings, profile and pipeline into an AgentConfig
    effective.py  the AgentConfig back as YAML (`kpod-metrics config --effective`)
"""

from kpod.config.assemble import AgentConfig, ComponentConfig, load_config
from kpod.config.errors import ConfigError

__all__ = ["AgentConfig", "ComponentConfig", "ConfigError", "load_config"]
