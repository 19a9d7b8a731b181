"""The server's memory budget (``max_memory``): bytes, or a fraction of the device's memory."""

from __future__ import annotations

import os
from dataclasses import dataclass

from mrs.config.schema import ServerConfig
from mrs.config.units import parse_size


def device_memory() -> int:
    """The default device's memory: an accelerator's limit, else the host's RAM."""
    import jax

    device = jax.devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass(frozen=True)
class MemoryBudget:
    total: int | None = None  # bytes; None: no limit

    @property
    def limited(self) -> bool:
        return self.total is not None

    @classmethod
    def from_config(cls, server: ServerConfig) -> "MemoryBudget":
        text = server.max_memory
        if text is None:
            return cls()
        try:
            fraction = float(text)
        except ValueError:
            fraction = None
        if fraction is not None and 0 < fraction <= 1:  # "0.8": that share of the device
            return cls(int(fraction * device_memory()))
        return cls(parse_size(text, "max_memory"))
