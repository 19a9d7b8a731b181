"""Memory accounting measured from the arrays themselves (device buffers), not estimated."""

from __future__ import annotations

from typing import Any

import jax


def _device_bytes(leaf: Any) -> int:
    # A sharded array's addressable shards are what the devices actually hold.
    shards = getattr(leaf, "addressable_shards", None)
    if shards:
        return sum(int(s.data.nbytes) for s in shards)
    return int(getattr(leaf, "nbytes", 0))


def param_bytes(tree: Any) -> int:
    """Bytes held by every array in a params tree (QArray leaves count their packed arrays)."""
    return sum(_device_bytes(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def cache_bytes(cache: Any) -> int:
    """Bytes held by a KV cache (any pytree of arrays: per-layer (k, v) pairs, slot state...)."""
    return param_bytes(cache)
