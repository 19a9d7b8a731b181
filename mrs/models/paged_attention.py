"""Decode attention over the paged KV cache as a Pallas kernel for GPUs (Triton).

The same contract as the native CPU kernel (``mrs.quant.native.decode_attention``): one
query per sequence, ``q [b, Hkv, G, D]`` at ``positions [b]``, over the pool read in place
through the block table ``pages [b, n]`` (``mrs.models.kv_cache``): keys ``[P, Hkv, D,
page]`` (transposed: a page's keys are a plain ``[D, page]`` right-hand side of ``q . k``),
values ``[P, Hkv, page, D]``. Sequence ``b`` attends positions ``s`` with ``s <=
positions[b]``, ``s < kv_len`` and, with a ``window``, ``s > positions[b] - window``; a
sequence whose position lies past its table (an idle slot) gets zeros.

Grid ``(b, Hkv, splits)``: one program per sequence, KV head and split of its pages. A
program loads its group's ``G`` queries once, padded to ``GROUP_BLOCK`` rows (Triton's
dots need at least 16 rows), then walks its pages one at a time, reading the page id from
the table and the page's keys and values straight from the pool, with an online softmax
in float32 (flash attention). It reads only the pages that hold keys it attends to, so
table entries past a sequence's length (``NO_PAGE``, outside the pool) are never used.
Splits let short batches fill the GPU (as JAX's own ``ops/gpu/paged_attention.py``): each
writes its unnormalized output with its running max and sum, and XLA merges them after.

Triton needs power-of-two tiles of at least 16 for its dots: ``supported`` says whether
the head dim and page size fit; callers keep XLA's attention where they do not.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

Array = jax.Array

GROUP_BLOCK = 16  # query rows per program at least: Triton's dot minimum
MIN_TILE, MAX_TILE = 16, 256  # head dim and page size: dot minimum; a [D, page] tile in registers
TARGET_PROGRAMS = 512  # programs that keep a large GPU (132 SMs on an H100) busy
MIN_SPLIT_PAGES = 4  # pages per split at least: fewer make the merge cost more than it saves
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# A finite floor for masked scores and the running max: -inf would make exp(-inf + inf) NaN.
MASK = float(jnp.finfo(jnp.float32).min)


def _power_of_two_in(size: int, low: int, high: int) -> bool:
    return low <= size <= high and size & (size - 1) == 0


def supported(q: Array, k_pool: Array, v_pool: Array) -> bool:
    """Whether the Triton kernel takes these shapes and dtypes (else use XLA's attention)."""
    dim, page = k_pool.shape[2], k_pool.shape[3]
    return (all(a.dtype in DTYPES for a in (q, k_pool, v_pool))
            and _power_of_two_in(dim, MIN_TILE, MAX_TILE) and _power_of_two_in(page, MIN_TILE, MAX_TILE))


def _splits(units: int, table_pages: int) -> int:
    """Splits of each sequence's pages: about ``TARGET_PROGRAMS`` programs for ``units``
    (sequence, head) pairs, each split at least ``MIN_SPLIT_PAGES`` pages."""
    return max(1, min(TARGET_PROGRAMS // units, -(-table_pages // MIN_SPLIT_PAGES)))


def _kernel(positions_ref, pages_ref, q_ref, k_ref, v_ref, acc_ref, top_ref, total_ref, *, kv_len: int,
            capacity: int, window: int | None, scale: float, softcap: float | None, split_pages: int) -> None:
    """One (sequence, KV head, split): ``q_ref [GB, D]``, ``k_ref [P, D, page]``, ``v_ref [P,
    page, D]``, the sequence's ``pages_ref [n]`` and ``positions_ref []``; writes the
    unnormalized output ``acc_ref [GB, D]``, the scores' max ``top_ref [GB]`` and the sum of
    their exponentials (less that max) ``total_ref [GB]``."""
    pool, _, page = k_ref.shape
    position = positions_ref[()]
    # Keys [lo, hi); a position past the table (an idle slot's padding) sees none.
    hi = jnp.where(position < capacity, jnp.minimum(position + 1, kv_len), 0)
    lo = 0 if window is None else jnp.maximum(position - window + 1, 0)
    split = pl.program_id(2)
    first = jnp.maximum(lo // page, split * split_pages)
    stop = jnp.minimum(pl.cdiv(hi, page), (split + 1) * split_pages)
    q = q_ref[...]

    def step(j: Array, carry: tuple[Array, Array, Array]) -> tuple[Array, Array, Array]:
        acc, top, total = carry
        # Inside [first, stop) the table names pool pages; clipped as XLA's gather does, so a
        # bad table reads a wrong page rather than outside the pool.
        block = jnp.clip(pages_ref[j], 0, pool - 1)
        s = plgpu.dot(q, k_ref[block].astype(q.dtype), precision=lax.Precision.HIGHEST) * scale  # [GB, page]
        if softcap is not None:
            s = jnp.tanh(s / softcap) * softcap
        key = j * page + jnp.arange(page)
        valid = ((key >= lo) & (key < hi))[None, :]
        new_top = jnp.maximum(top, jnp.where(valid, s, MASK).max(axis=1))
        p = jnp.where(valid, jnp.exp(s - new_top[:, None]), 0.0)
        correction = jnp.exp(top - new_top)
        v = v_ref[block]
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v, precision=lax.Precision.HIGHEST)
        return acc, new_top, total * correction + p.sum(axis=1)

    rows, dim = q.shape
    init = (jnp.zeros((rows, dim), jnp.float32), jnp.full((rows,), MASK, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, top, total = lax.fori_loop(first, stop, step, init)
    acc_ref[...] = acc
    top_ref[...] = top
    total_ref[...] = total


@functools.partial(jax.jit, static_argnames=("kv_len", "window", "scale", "softcap", "interpret"))
def paged_decode_attention(q: Array, k_pool: Array, v_pool: Array, pages: Array, positions: Array, *, kv_len: int,
                           window: int | None, scale: float, softcap: float | None,
                           interpret: bool = False) -> Array:
    """Attention of ``q [b, Hkv, G, D]`` at ``positions [b]`` over the paged pool through
    ``pages [b, n]`` (see the module docstring); float32 math, ``[b, Hkv, G, D]`` in q's dtype.
    ``interpret`` runs the kernel in Pallas's interpreter (any backend, for tests)."""
    batch, kv_heads, group, dim = q.shape
    pool, _, _, page = k_pool.shape
    capacity = page * pages.shape[1]
    kv_len = min(kv_len, capacity)
    table_pages = -(-kv_len // page)
    splits = _splits(batch * kv_heads, table_pages)
    split_pages = -(-table_pages // splits)
    rows = max(GROUP_BLOCK, pl.next_power_of_2(group))
    q = jnp.pad(q, ((0, 0), (0, 0), (0, rows - group), (0, 0)))
    kernel = functools.partial(_kernel, kv_len=kv_len, capacity=capacity, window=window, scale=scale,
                               softcap=softcap, split_pages=split_pages)
    acc, top, total = pl.pallas_call(
        kernel,
        grid=(batch, kv_heads, splits),
        in_specs=[
            pl.BlockSpec((None,), lambda b, h, s: (b,)),  # positions
            pl.BlockSpec((None, pages.shape[1]), lambda b, h, s: (b, 0)),  # the sequence's table
            pl.BlockSpec((None, None, rows, dim), lambda b, h, s: (b, h, 0, 0)),  # q
            pl.BlockSpec((pool, None, dim, page), lambda b, h, s: (0, h, 0, 0)),  # the head's keys, every page
            pl.BlockSpec((pool, None, page, dim), lambda b, h, s: (0, h, 0, 0)),  # and values
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, rows, dim), lambda b, h, s: (b, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows, dim), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
            jax.ShapeDtypeStruct((batch, kv_heads, splits, rows), jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="mrs_paged_decode_attention",
    )(positions.astype(jnp.int32), pages.astype(jnp.int32), q, k_pool, v_pool)
    # Merge the splits: rescale each to the common max. A split without keys has total 0 (and
    # acc 0), so does a sequence without any: its output is 0.
    weight = jnp.exp(top - top.max(axis=2, keepdims=True))
    norm = (total * weight).sum(axis=2)[..., None]
    out = (acc * weight[..., None]).sum(axis=2) / jnp.where(norm > 0, norm, 1.0)
    return out[:, :, :group].astype(q.dtype)
