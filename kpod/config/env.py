"""`${env:VAR}` and `${env:VAR:-default}` in the string values of the config file."""

from __future__ import annotations

import re
import typing
from typing import Any

import yaml

_ENV_REF = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class EnvText(str):
    """A string made by `${env:...}` substitution with variables that are not set (and have no
    default): an error that quotes it (with !r) says which, instead of showing only ''."""

    unset: tuple[str, ...] = ()

    def __repr__(self) -> str:
        names = ", ".join(self.unset)
        verb = "is" if len(self.unset) == 1 else "are"
        return f"{str.__repr__(self)} (environment variable {names} {verb} not set)"


def substitute_env(value: str, environ: typing.Mapping[str, str]) -> Any:
    """Replace ${env:VAR} / ${env:VAR:-default}.  A value that is exactly one reference is
    re-read as a YAML scalar, so `${env:POLL_MS}` can be an integer.  A reference to a variable
    that is not set, without a default, becomes '' and the result an EnvText naming it."""
    unset: list[str] = []

    def replace(match: re.Match[str]) -> str:
        found = environ.get(match.group(1))
        if found is None and match.group(2) is None:
            unset.append(match.group(1))
        if found is None or (found == "" and match.group(2) is not None):
            return match.group(2) or ""
        return found

    whole = _ENV_REF.fullmatch(value)
    substituted = _ENV_REF.sub(replace, value)
    if unset:
        text = EnvText(substituted)
        text.unset = tuple(dict.fromkeys(unset))
        return text
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
