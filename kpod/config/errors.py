"""The one error a config can produce: one line naming the file, the line and the key."""

from __future__ import annotations


class ConfigError(Exception):
    """A config problem, as one line."""


MAX_MESSAGE_PART = 300  # a hostile file must not turn the one-line error into a 100 KB line


def short(text: str) -> str:
    """One line, bounded: a key or message quoting a huge or multi-line value stays readable."""
    text = text.replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= MAX_MESSAGE_PART else text[: MAX_MESSAGE_PART - 3] + "..."
