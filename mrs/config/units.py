"""Sizes as people write them in configs and flags: ``8MiB``, ``512KB``, ``1.5GiB``, ``1000``."""

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
