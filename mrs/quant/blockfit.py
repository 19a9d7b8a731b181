"""Least-squares block quantization into ggml's formats (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), and 6-bit blocks.

ggml's reference quantizers (and gguf-py's port of them) take a block's scale from
its largest magnitude (Q4_1: from max - min), so one outlier stretches the grid for
all 32 values and rounding is never accounted for. As llama.cpp's ``make_qx_quants``
and ``make_qkx2_quants`` do for its k-quants, we try candidate scales around that
one, refit the scale (and min) of each candidate's integers by weighted least
squares, keep per block the candidate with the smallest error, and polish it by
alternating re-rounding and refitting (neither step can increase the error).

The error weights are llama.cpp's own for k-quants without an importance matrix,
``rms(block) + |x|``: on SmolLM2 plain least squares cut the weights' squared error
by 20% but not the model's divergence from float (larger weights matter more); the
weighted fit cuts both (README, "Quantization and placement").

The result is an ordinary ggml block: integers in the format's range and a float16
scale (and min), decoded by ggml's formula ``d * q`` (``d * q + m``), so gguf-py's
dequantizer and llama.cpp read it unchanged (``mrs.quant.ggml.encode`` lays out the
bytes). The search is a jitted JAX function over fixed-size chunks of blocks: XLA
fuses each candidate into one pass over the weights, several times faster than numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from mrs.quant.ggml import encode, packed
from mrs.quant.qarray import QArray

Array = jax.Array


@dataclass(frozen=True)
class Grid:
    """The integers a format stores, as ggml decodes them (``d * q`` or ``d * q + m``)."""

    lo: int
    hi: int
    affine: bool  # with a per-block min (Q4_1, Q5_1)


GRIDS: dict[T, Grid] = {
    T.Q4_0: Grid(-8, 7, affine=False),
    T.Q5_0: Grid(-16, 15, affine=False),
    T.Q8_0: Grid(-127, 127, affine=False),  # ggml's Q8_0 never stores -128
    T.Q4_1: Grid(0, 15, affine=True),
    T.Q5_1: Grid(0, 31, affine=True),
}

# Where the block's extreme value may land, in grid steps around the reference's choice.
# 11 steps found the same fits as llama.cpp's 19-21 on SmolLM2, in half the time.
OFFSETS = tuple(np.linspace(-1.0, 1.0, 11, dtype=np.float32).tolist())
POLISH = 2  # re-round / refit rounds after the search
CHUNK = 1 << 12  # blocks per jitted call: one compilation per format; temporaries stay in cache


@dataclass(frozen=True)
class Blocks:
    q: np.ndarray  # int16 [n, block], in [grid.lo, grid.hi]
    d: np.ndarray  # float16 [n]
    m: np.ndarray | None  # float16 [n], affine formats only


# ISQ's Q6K: signed 6-bit integers in blocks of 32 with a float16 scale (6.5 bits per weight).
# Not ggml's Q6_K, whose 16-value sub-blocks would cost 8 bits per weight in QArray storage.
SIX_BIT = Grid(-32, 31, affine=False)


def quantize_six_bit(values: np.ndarray, fmt: str = "Q6K") -> QArray:
    """A float ``[..., in]`` array as a numpy-backed 6-bit QArray (blocks of 32, ``zero`` 32)."""
    rows, cols = int(np.prod(values.shape[:-1])), values.shape[-1]
    fit = fit_blocks(np.reshape(values, (-1, 32)), SIX_BIT)
    unsigned = (fit.q + 32).reshape(rows, cols // 32, 32)
    shape = tuple(int(d) for d in values.shape)
    return packed(unsigned, fit.d.reshape(rows, -1), None, 6, shape=shape, block=32, zero=32, fmt=fmt)


def quantize(values: np.ndarray, ggml_type: T) -> np.ndarray:
    """A float ``[..., in]`` array as ggml blocks, ``[rows, in / block * type_size]`` uint8 like gguf-py's."""
    block = GGML_QUANT_SIZES[ggml_type][0]
    rows = int(np.prod(values.shape[:-1]))
    fit = fit_blocks(np.reshape(values, (-1, block)), GRIDS[ggml_type])
    return encode(fit.q, fit.d, fit.m, ggml_type).reshape(rows, -1)


def fit_blocks(x: np.ndarray, grid: Grid) -> Blocks:
    """Quantize blocks ``x`` (``[n, block]``) to ``grid``, each with the least weighted squared error found."""
    x = np.asarray(x, np.float32)
    n = len(x)
    # Zero blocks pad the last chunk (they quantize to zeros) so every call has one shape.
    padded = np.concatenate([x, np.zeros(((-n) % CHUNK, x.shape[1]), np.float32)])
    parts = [jax.device_get(_fit(padded[i:i + CHUNK], grid)) for i in range(0, len(padded), CHUNK)]
    q, d, m = (None if parts[0][k] is None else np.concatenate([p[k] for p in parts])[:n] for k in range(3))
    return Blocks(q, d, m)


@partial(jax.jit, static_argnames="grid")
def _fit(x: Array, grid: Grid) -> tuple[Array, Array, Array | None]:
    w = _importance(x)
    q = _search(x, w, grid)
    for _ in range(POLISH):
        q = _round(x, *_least_squares(x, w, q, grid)[:2], grid)
    # Store float16 parameters, then give each value the integer nearest under them.
    d, m, _ = _least_squares(x, w, q, grid)
    d16 = d.astype(jnp.float16)
    m16 = None if m is None else m.astype(jnp.float16)
    q = _round(x, d16.astype(jnp.float32), None if m16 is None else m16.astype(jnp.float32), grid)
    return q.astype(jnp.int16), d16, m16


def _importance(x: Array) -> Array:
    """Per-value error weights: llama.cpp's ``rms(block) + |x|`` (see the module doc); 1 in zero blocks."""
    rms = jnp.sqrt(jnp.mean(x * x, axis=1, keepdims=True))
    return jnp.where(rms > 0, rms + jnp.abs(x), 1)


def _search(x: Array, w: Array, grid: Grid) -> Array:
    """Integers of the best candidate scale per block."""
    if grid.affine:  # the block's range spans about grid.hi steps
        low = x.min(axis=1)
        span = _nonzero(x.max(axis=1) - low)  # a constant block rounds to zeros whatever the scale
        base = x - low[:, None]
        scales = [(grid.hi + offset) / span for offset in OFFSETS]
    else:  # the block's largest magnitude lands near either end of the grid
        base = x
        peak = _nonzero(jnp.take_along_axis(x, jnp.abs(x).argmax(axis=1)[:, None], axis=1)[:, 0])
        ends = (grid.lo,) if grid.lo == -grid.hi else (grid.lo, grid.hi)  # mirror images add nothing
        scales = [(end + np.sign(end) * offset) / peak for end in ends for offset in OFFSETS]

    def keep_better(best: tuple[Array, Array], scale: Array) -> tuple[tuple[Array, Array], None]:
        q = jnp.clip(jnp.rint(base * scale[:, None]), grid.lo, grid.hi)
        score = _least_squares(x, w, q, grid)[2]
        better = score > best[1]
        return (jnp.where(better[:, None], q, best[0]), jnp.where(better, score, best[1])), None

    start = (jnp.zeros_like(x), jnp.full(x.shape[:1], -jnp.inf, x.dtype))
    (q, _), _ = jax.lax.scan(keep_better, start, jnp.stack(scales))
    return q


def _least_squares(x: Array, w: Array, q: Array, grid: Grid) -> tuple[Array, Array | None, Array]:
    """Weighted least-squares ``d`` (and ``m``) for fixed integers ``q``, per block, and the
    weighted square it explains (``sum(w x^2)`` minus the error left: larger is better)."""
    wq = w * q
    sqq = jnp.sum(wq * q, axis=1)
    sxq = jnp.sum(wq * x, axis=1)
    if not grid.affine:
        d = jnp.where(sqq > 0, sxq / _nonzero(sqq), 0)
        return d, None, d * sxq
    n = w.sum(axis=1)
    sq, sx = wq.sum(axis=1), (w * x).sum(axis=1)
    det = n * sqq - sq * sq
    flat = det <= 0  # all integers equal: the best fit is the block's mean
    d = jnp.where(flat, 0, (n * sxq - sq * sx) / _nonzero(det))
    m = jnp.where(flat, sx / _nonzero(n), (sqq * sx - sq * sxq) / _nonzero(det))
    return d, m, d * sxq + m * sx


def _round(x: Array, d: Array, m: Array | None, grid: Grid) -> Array:
    """The nearest grid integer to each value for per-block ``d`` (and ``m``); 0 where d is 0."""
    shifted = x if m is None else x - m[:, None]
    inverse = jnp.where(d == 0, 0, 1 / _nonzero(d))
    return jnp.clip(jnp.rint(shifted * inverse[:, None]), grid.lo, grid.hi)


def _nonzero(a: Array) -> Array:
    return jnp.where(a == 0, 1, a)
