"""The one duration syntax of the product, for config files, environment variables and CLI flags alike:
``500ms``, ``30s``, ``10m``, ``2h``, ``1d``, ``1w``, combined forms such as ``1h30m``, or a plain number of seconds.

Bounded on both sides: a duration is more than zero and at most :data:`MAX_SECONDS` (ten years), so that ``inf``,
``1e12`` or a typo never reaches a kernel timestamp (u64 ns) or a sleep as a number nobody meant.
"""

from __future__ import annotations

import math
import re

from .errors import ConfigError

MAX_SECONDS = 10 * 365 * 86400
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
EXAMPLES = "500ms, 30s, 10m, 2h, 1h30m, 1d, 1w"


class DurationError(ConfigError):
    """A duration that cannot be used: ``str()`` names the value, where it came from and what is accepted."""


def parse_duration(text: str | float | int, what: str = "duration") -> float:
    """A duration as seconds (float, > 0). ``what`` names where the value came from, for the error line."""
    if isinstance(text, bool):
        raise DurationError(f"bad duration for {what}: {text!r} is not a duration; use e.g. {EXAMPLES}")
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        raw = str(text).strip().lower()
        try:
            seconds = float(raw) if re.fullmatch(r"\d+(?:\.\d+)?", raw) else math.nan
        except ValueError:
            seconds = math.nan
        if math.isnan(seconds):
            parts = _PART.findall(raw)
            if not parts or "".join(n + u for n, u in parts) != raw:
                raise DurationError(f"bad duration for {what}: {text!r} is not a duration; use e.g. {EXAMPLES}")
            seconds = sum(float(n) * UNIT_SECONDS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds > MAX_SECONDS:
        raise DurationError(f"bad duration for {what}: {text!r} is longer than ten years; use e.g. {EXAMPLES}")
    if not seconds > 0:
        raise DurationError(f"bad duration for {what}: {text!r} must be greater than zero")
    return seconds


def format_duration(seconds: float) -> str:
    """The two largest units, e.g. ``1h30m``, ``1d1h``; below a minute plain seconds."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{max(seconds, 0)}s"
    out = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            out.append(f"{seconds // size}{unit}")
            seconds %= size
        if len(out) == 2:
            break
    return "".join(out)
