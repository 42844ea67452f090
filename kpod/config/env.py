"""`${env:VAR}` and `${env:VAR:-default}` in the string values of the config file."""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml

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
        return scalar(substituted)
    return substituted


def scalar(text: str) -> Any:
    """Read text as YAML reads a plain scalar: '30000' -> 30000, 'true' -> True."""
    if text == "":
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, str | int | float | bool) else text
