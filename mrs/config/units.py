"""Sizes and durations as people write them in configs and flags: ``8MiB``, ``512KB``,
``1000``; ``5m``, ``30s``, ``1h``, ``90`` (seconds)."""

from __future__ import annotations

import re

from mrs.errors import ConfigError

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")


def parse_size(text: str | int, param: str) -> int:
    """Bytes in ``text``; a ConfigError naming ``param`` when it is not a size."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = _SIZE.fullmatch(str(text))
        if not match or match[2].upper() not in _UNITS:
            raise ConfigError(f"{param}: {text!r} is not a size (e.g. 8MiB, 512KB, 1000000)", param=param)
        value, unit = float(match[1]), match[2].upper()
    size = int(value * _UNITS[unit])
    if size < 1:
        raise ConfigError(f"{param}: {text!r} must be at least 1 byte", param=param)
    return size


_DURATION = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*")
_SECONDS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float, param: str) -> float | None:
    """Seconds in ``text`` (Ollama's keep_alive forms); ``None`` for a negative one (= forever)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.fullmatch(str(text))
        if not match:
            raise ConfigError(f"{param}: {text!r} is not a duration (e.g. 5m, 30s, 1h, 0, -1)", param=param)
        seconds = float(match[1]) * _SECONDS[match[2]]
    return None if seconds < 0 else seconds
