"""The KV cache behind one seam: model code writes and attends through ``cached_attention``
(``mrs.models.layers``), which calls ``write`` and ``gather`` here; only this module and
the native decode kernel know the layout.

The layout is paged. Per layer, a pool of ``P`` pages of ``page`` rows:
``(k [P, Hkv, D, page], v [P, Hkv, page, D])`` (keys transposed, so that a query reads
a page's keys as a plain ``[D, page]`` matrix). One block table ``pages [B, n]`` (int32)
per step, shared by every layer, maps sequence ``b``'s logical page ``p // page`` to its
pool page. The engine owns the pool and fills the tables (``mrs.engine.kv_pages``); a
model never allocates.

Without a table the cache is contiguous: ``init_cache(config, batch, max_seq_len)`` is a
pool of one ``max_seq_len``-row page per sequence, and sequence ``b`` owns page ``b``.
That is the whole-sequence cache tests and one-shot scoring use, with no table to build.

``geometry`` sizes an engine's pool from its config (the estimate before a load uses it too).

A pool on the CPU takes memory as its pages fill: ``discard`` hands free pages' memory back
to the OS (their stale contents are lost), so an idle engine holds only its cached pages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from mrs import host_arrays
from mrs.config.schema import EngineConfig
from mrs.config.units import parse_size
from mrs.heap import discard_zeroed
from mrs.models.config import ModelConfig

Array = jax.Array
LayerCache = tuple[Array, Array]  # (k [P, Hkv, D, page], v [P, Hkv, page, D])
KVCache = tuple[LayerCache, ...]
Stage = tuple[int, int] | None

# A table entry with no page behind it: outside every pool, so writes there drop.
NO_PAGE = np.iinfo(np.int32).max


def pages_for(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


@dataclass(frozen=True)
class KVGeometry:
    """A pool of ``pages`` pages of ``page_size`` rows of ``dtype``; one sequence holds up to
    ``context`` tokens, in at most ``table_width`` pages."""

    pages: int
    page_size: int
    context: int
    dtype: str

    @property
    def tokens(self) -> int:
        return self.pages * self.page_size

    @property
    def table_width(self) -> int:
        return pages_for(self.context, self.page_size)

    @property
    def itemsize(self) -> int:
        return (np.dtype(ml_dtypes.bfloat16) if self.dtype == "bfloat16" else np.dtype(self.dtype)).itemsize


def geometry(engine: EngineConfig, model: ModelConfig) -> KVGeometry:
    """The pool ``engine`` asks for (``kv_memory`` bytes, else ``kv_tokens``) for ``model``,
    never more than ``max_batch`` full contexts can use; the context is capped by the pool."""
    dtype = engine.kv_dtype or model.dtype
    context = min(engine.max_seq_len, model.max_position_embeddings)
    tokens = engine.kv_tokens
    if engine.kv_memory is not None:
        per_token = cache_bytes(model, KVGeometry(1, 1, 1, dtype))
        tokens = parse_size(engine.kv_memory, "engine.kv_memory") // per_token
    pages = pages_for(max(1, min(tokens, engine.max_batch * context)), engine.kv_page_size)
    return KVGeometry(pages, engine.kv_page_size, min(context, pages * engine.kv_page_size), dtype)


def cache_bytes(config: ModelConfig, geometry: KVGeometry) -> int:
    """Bytes of the pool ``geometry`` describes, every layer's keys and values."""
    return geometry.tokens * config.num_layers * 2 * config.num_kv_heads * config.head_dim * geometry.itemsize


def init_cache(config: ModelConfig, pages: int, page_size: int, dtype: Any = None, stage: Stage = None) -> KVCache:
    """A zeroed pool of ``pages`` pages of ``page_size`` rows for each layer (of ``stage``)."""
    k_shape = (pages, config.num_kv_heads, config.head_dim, page_size)
    v_shape = (pages, config.num_kv_heads, page_size, config.head_dim)
    dtype = dtype or config.jnp_dtype
    layers = range(*(stage or (0, config.num_layers)))
    return tuple((host_arrays.zeros(k_shape, dtype), host_arrays.zeros(v_shape, dtype)) for _ in layers)


def discard(cache: KVCache, pages: list[int]) -> int:
    """Hand the memory of ``pages`` (sorted; no step may write them meanwhile) back to the OS
    in every layer's pool held on a CPU; bytes handed back. Their contents are lost: zeros,
    but for the ends of a run that share an OS page with the pages beside it."""
    runs = _runs(pages)
    handed_back = 0
    for pool in jax.tree.leaves(cache):
        for shard in pool.addressable_shards:
            buffer = shard.data
            if shard.device.platform != "cpu" or buffer.shape[0] != pool.shape[0]:
                continue  # device memory, or a pool split by page: neither is ours to unmap
            stride = buffer.nbytes // buffer.shape[0]
            address = buffer.unsafe_buffer_pointer()
            for first, count in runs:
                handed_back += discard_zeroed(address + first * stride, count * stride)
    return handed_back


def _runs(pages: list[int]) -> list[tuple[int, int]]:
    """Sorted page ids as (first, count) runs of consecutive pages."""
    runs: list[tuple[int, int]] = []
    for page in pages:
        if runs and runs[-1][0] + runs[-1][1] == page:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((page, 1))
    return runs


def page_size(layer: LayerCache) -> int:
    return layer[0].shape[3]


def table(pages: Array | None, batch: int) -> Array:
    """The block table ``[batch, n]``: ``pages``, or the contiguous one (sequence b in page b)."""
    return jnp.arange(batch, dtype=jnp.int32)[:, None] if pages is None else pages


def capacity(layer: LayerCache, pages: Array | None) -> int:
    """Rows one sequence can address: its table's pages times the page size."""
    return page_size(layer) * (1 if pages is None else pages.shape[1])


def write(layer: LayerCache, k: Array, v: Array, positions: Array, pages: Array | None) -> LayerCache:
    """Store ``k``/``v`` ``[b, T, Hkv, D]`` at ``positions [b, T]`` through the block table;
    positions past the table and pages it does not assign write nothing."""
    size = page_size(layer)
    block = table(pages, k.shape[0])
    logical = positions // size
    physical = jnp.take_along_axis(block, jnp.minimum(logical, block.shape[1] - 1), axis=1)
    physical = jnp.where(logical < block.shape[1], physical, NO_PAGE)
    row = positions % size
    # Advanced indices around slices: both indexed views are [b, T, Hkv, D], like k and v.
    k_pool = layer[0].at[physical, :, :, row].set(k.astype(layer[0].dtype), mode="drop")
    v_pool = layer[1].at[physical, :, row].set(v.astype(layer[1].dtype), mode="drop")
    return k_pool, v_pool


def gather(layer: LayerCache, pages: Array | None, batch: int, kv_len: int) -> tuple[Array, Array]:
    """The first ``kv_len`` rows of the first ``batch`` sequences as contiguous arrays
    ``(k [b, Hkv, D, kv_len], v [b, Hkv, kv_len, D])``, for XLA's attention. Rows of pages
    the table does not assign hold another page's data: attention masks them by position."""
    if pages is None:
        return layer[0][:batch, ..., :kv_len], layer[1][:batch, :, :kv_len]
    size = page_size(layer)
    ids = pages[:batch, : -(-kv_len // size)]
    n = ids.shape[1]
    k = jnp.take(layer[0], ids, axis=0, mode="clip")  # [b, n, Hkv, D, page]
    v = jnp.take(layer[1], ids, axis=0, mode="clip")  # [b, n, Hkv, page, D]
    heads, dim = k.shape[2], k.shape[3]
    k = k.transpose(0, 2, 3, 1, 4).reshape(batch, heads, dim, n * size)[..., :kv_len]
    v = v.transpose(0, 2, 1, 3, 4).reshape(batch, heads, n * size, dim)[:, :, :kv_len]
    return k, v
