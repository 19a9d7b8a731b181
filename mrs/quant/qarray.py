"""The quantized array: packed integer blocks plus per-block scales (and mins).

A ``QArray`` stands for a float matrix ``w`` of ``shape`` (``[out, in]`` for a
linear weight; more leading dims are allowed, they count as rows). Each row is cut
into blocks of ``block`` consecutive values; value ``j`` of block ``b`` in row ``r``
dequantizes to ``(q - zero) * scale[r, b] (+ min[r, b])``.

Three storages, laid out so that unpacking is masks, shifts and concatenations along
rows (XLA fuses those into the matmul; the native kernel, ``mrs.quant.native``, reads
them eight columns at a time):
- ``bits=8``: ``data`` int8 (or uint8) ``[rows, nblocks, block]``, one value per byte
  (Q8_0, the 5-bit formats, and 4- or 6-bit values of tensors whose row count the
  packings below do not divide).
- ``bits=4``: ``data`` uint8 ``[rows / 2, nblocks, block]`` in *row pairs*: byte
  ``[r, b, j]`` holds row ``r``'s value in its low nibble and row ``r + rows/2``'s in
  its high nibble. ggml's in-block nibble order (value ``j`` and ``j + 16`` in one
  byte) needs an interleaving reshape that XLA does not fuse, and ran 2-3x slower.
- ``bits=6``: the low four bits as ``bits=4`` row pairs in ``data``, and the top two in
  ``high`` uint8 ``[rows / 4, nblocks, block]``: byte ``[r, b, j]`` holds rows ``r``,
  ``r + rows/4``, ``r + rows/2`` and ``r + 3 rows/4`` in bits 0-1, 2-3, 4-5 and 6-7.

The model contract (``mrs.models.layers``) uses ``linear``, ``dequantize`` and
``take_rows``; the loader uses ``permute_rows``; memory accounting uses ``nbytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mrs.quant import native

Array = jax.Array
ROW_GROUP = {8: 1, 4: 2, 6: 4}  # rows packed together by each storage: single rows, pairs, quads


@dataclass(frozen=True)
class QArray:
    data: Any  # int8/uint8 [rows, nblocks, block]; 4-bit: uint8 row pairs [rows // 2, nblocks, block]
    scale: Any  # [rows, nblocks], float16 or float32
    min: Any  # [rows, nblocks] or None (symmetric formats)
    high: Any = None  # 6-bit only: the top two bits, uint8 row quads [rows // 4, nblocks, block]
    shape: tuple[int, ...] = ()
    bits: int = 8
    block: int = 32
    zero: int = 0  # subtracted from the stored integer before scaling (8 for Q4_0)
    fmt: str = ""  # the format it came from (Q8_0, Q4_K, ...), for logs and reports

    def __post_init__(self) -> None:
        rows = math.prod(self.shape[:-1])
        group = ROW_GROUP[self.bits]
        if rows % group:
            raise ValueError(f"{self.fmt}: {self.bits}-bit storage needs a row count divisible by {group}, got {rows}")
        blocks = (self.shape[-1] // self.block, self.block)
        expected = {"data": (rows // min(group, 2), *blocks), "high": (rows // 4, *blocks)}
        for name, want in expected.items():
            got = getattr(self, name)
            # Tree transformations (jit, orbax) put tracers, placeholders or None where arrays
            # were: check real arrays only.
            if hasattr(got, "shape") and tuple(got.shape) != want:
                raise ValueError(f"{self.fmt} {name} shape {tuple(got.shape)} != {want} for {self.shape}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> Any:  # what it dequantizes to by default
        return jnp.float32

    @property
    def nbytes(self) -> int:
        return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(self))

    def _float(self, values: Array, scale: Array, min_: Array | None, dtype: Any) -> Array:
        """Stored integers ``[..., nblocks, block]`` to floats ``[..., in]``."""
        w = values.astype(dtype)
        if self.zero:
            w = w - self.zero
        w = w * scale.astype(dtype)[..., None]
        if min_ is not None:
            w = w + min_.astype(dtype)[..., None]
        return w.reshape(*w.shape[:-2], self.shape[-1])

    def dequantize(self, dtype: Any = jnp.float32) -> Array:
        return self._float(unpack(self.data, self.high, self.bits, jnp), self.scale, self.min, dtype).reshape(self.shape)

    def linear(self, x: Array) -> Array:
        """``x @ w.T`` for a 2-D ``[out, in]`` weight (see ``linears``)."""
        return linears(x, [self])[0]

    def take_rows(self, ids: Array, dtype: Any) -> Array:
        """Rows ``ids`` of a 2-D table (embedding lookup) without expanding the whole table."""
        ids = jnp.clip(ids, 0, self.shape[0] - 1)
        values = self.data[ids] if self.bits == 8 else self._packed_rows(ids)
        min_ = None if self.min is None else self.min[ids]
        return self._float(values, self.scale[ids], min_, dtype)

    def _packed_rows(self, ids: Array) -> Array:
        """The stored integers of rows ``ids`` of a 4- or 6-bit table."""
        half = self.shape[0] // 2
        pairs = self.data[ids % half]
        values = jnp.where((ids >= half)[..., None, None], pairs >> 4, pairs & 0xF)
        if self.bits == 6:
            quarter = self.shape[0] // 4
            shift = (2 * (ids // quarter)).astype(jnp.uint8)[..., None, None]
            values = values | (((self.high[ids % quarter] >> shift) & 3) << 4)
        return values

    def permute_rows(self, perm: np.ndarray) -> "QArray":
        """Reorder rows (axis 0 of a 2-D weight), e.g. to undo llama.cpp's Q/K permutation. On
        the host: the result's leaves are numpy arrays (the loader places them afterwards)."""
        perm = np.asarray(perm)
        pick = lambda a: None if a is None else np.asarray(a)[perm]  # noqa: E731
        high = None if self.high is None else np.asarray(self.high)
        values = unpack(np.asarray(self.data), high, self.bits)[perm]  # packed rows re-form after the shuffle
        data, high = pack(values, self.bits)
        return QArray(data, pick(self.scale), pick(self.min), high=high, **self.meta())

    def map_arrays(self, fn: Callable[[Any], Any]) -> "QArray":
        """The same layout with ``fn`` applied to each array (``min`` and ``high`` stay None where they are)."""
        return jax.tree.map(fn, self)

    def meta(self) -> dict[str, Any]:
        return dict(shape=self.shape, bits=self.bits, block=self.block, zero=self.zero, fmt=self.fmt)

    def __repr__(self) -> str:
        return f"QArray({self.fmt}, shape={self.shape}, {self.nbytes / 2**20:.2f} MiB)"


def pack_row_pairs(values: np.ndarray) -> np.ndarray:
    """4-bit values ``[rows, nblocks, block]`` (0..15) -> row-pair bytes ``[rows / 2, nblocks, block]``."""
    half = values.shape[0] // 2
    low, high = values[:half].astype(np.uint8), values[half:].astype(np.uint8)
    return low | (high << np.uint8(4))


def pack_row_quads(values: np.ndarray) -> np.ndarray:
    """2-bit values ``[rows, nblocks, block]`` (0..3) -> row-quad bytes ``[rows / 4, nblocks, block]``."""
    quarter = values.shape[0] // 4
    planes = [values[i * quarter:(i + 1) * quarter].astype(np.uint8) << np.uint8(2 * i) for i in range(4)]
    return planes[0] | planes[1] | planes[2] | planes[3]


def pack(values: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Unsigned ``bits``-bit values ``[rows, nblocks, block]`` as ``(data, high)`` storage."""
    if bits == 8:
        return values, None
    low = pack_row_pairs(values & np.uint8(0xF))
    return (low, None) if bits == 4 else (low, pack_row_quads(values >> np.uint8(4)))


def unpack(data: Any, high: Any, bits: int, xp: Any = np) -> Any:
    """``pack``'s inverse: every row's stored integers ``[rows, nblocks, block]``, in row
    order; ``xp`` is numpy (on the host) or jax.numpy (inside a jit)."""
    if bits == 8:
        return data
    low = xp.concatenate([data & np.uint8(0xF), data >> np.uint8(4)], axis=0)
    if bits == 4:
        return low
    return low | (xp.concatenate([(high >> np.uint8(s)) & np.uint8(3) for s in (0, 2, 4, 6)], axis=0) << np.uint8(4))


# Arrays are children (traced, donated, sharded); the layout description is static.
jax.tree_util.register_dataclass(
    QArray, data_fields=["data", "scale", "min", "high"], meta_fields=["shape", "bits", "block", "zero", "fmt"]
)


def linears(x: Array, ws: list[QArray]) -> list[Array]:
    """``x @ w.T`` for each 2-D ``[out, in]`` weight of ``ws`` (one ``in``).

    ``x`` of up to ``native.MAX_ROWS`` rows on CPU goes to the native kernel (``mrs.quant.native``),
    which reads the packed blocks, one call for all the weights (a layer's q, k and v, say:
    each call has a fixed cost of some microseconds, about a tenth of a one-token decode step
    when paid per weight); otherwise XLA dequantizes inside the caller's jit. A 2-D matmul on
    purpose: with jax 0.10's XLA CPU a 3-D einsum over the expanded weight ran 10x slower in
    isolation (it fuses the dequantization into a strided matrix-vector loop).
    """
    inner = ws[0].shape[1]
    flat = x.reshape(-1, inner)
    xla = lambda a: [a @ w.dequantize(a.dtype).T for w in ws]  # noqa: E731
    if (flat.dtype == jnp.float32 and flat.shape[0] <= native.MAX_ROWS and all(w.block in (16, 32) for w in ws)
            and native.enabled()):
        ys = native.cpu_or_xla(lambda a: native.qmatmul(a, ws), xla, flat)
    else:
        ys = xla(flat)
    return [y.reshape(*x.shape[:-1], w.shape[0]) for y, w in zip(ys, ws)]
