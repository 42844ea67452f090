"""Durations as the config file writes them: "30s", "500ms", "2m", "1h", or integer milliseconds."""

from __future__ import annotations

import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")
_FACTORS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# Longer than any interval or timeout the agent could sensibly use: a day.
MAX_DURATION_S = 86400.0


def _brief(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True, order=True)
class Duration:
    seconds: float

    @classmethod
    def parse(cls, value: object) -> Duration:
        """Parse "30s" / "500ms" / "2m" / "1h", or an integer number of milliseconds.

        Raises ValueError with a message fit for a config error.
        """
        if isinstance(value, bool):
            raise ValueError(f"expected a duration like 30s or 500ms, got {value!r}")
        if isinstance(value, int):
            if abs(value) > MAX_DURATION_S * 1000:  # also keeps value / 1000.0 from overflowing
                raise ValueError(f"duration {_brief(value)} is out of range (0 to 24h)")
            seconds = value / 1000.0
        elif isinstance(value, str):
            match = _DURATION.match(value)
            if not match:
                raise ValueError(f"expected a duration like 30s, 500ms, 2m or 1h, got {value!r}")
            seconds = float(match.group(1)) * _FACTORS[match.group(2)]
        else:
            raise ValueError(f"expected a duration like 30s or 500ms, got {value!r}")
        if seconds < 0 or seconds > MAX_DURATION_S:
            raise ValueError(f"duration {_brief(value)} is out of range (0 to 24h)")
        return cls(seconds)

    def __str__(self) -> str:
        if self.seconds and self.seconds < 1:
            return f"{round(self.seconds * 1000)}ms"
        return f"{self.seconds:g}s"
