"""The quantized array: packed integer blocks plus per-block scales (and mins).

A ``QArray`` stands for a float matrix ``w`` of ``shape`` (``[out, in]`` for a
linear weight; more leading dims are allowed, they count as rows). Each row is cut
into blocks of ``block`` consecutive values; value ``j`` of block ``b`` in row ``r``
dequantizes to ``(q - zero) * scale[r, b] (+ min[r, b])``.

Two storages, chosen for speed of the dequantize-inside-the-jit matmul on XLA CPU
(measured: int8 blocks dequantize and matmul faster than a float32 matmul reads its
weight; nibble unpacking by a broadcast shift fuses into one pass):
- ``bits=8``: ``data`` int8 ``[rows, nblocks, block]``, one value per byte
  (Q8_0, and the 5- and 6-bit formats, which fit a byte losslessly).
- ``bits=4``: ``data`` uint8 ``[rows, nblocks, block // 2]`` in ggml's Q4 layout:
  byte ``j`` holds value ``j`` in its low nibble and value ``j + block/2`` in its
  high nibble.

The model contract (``mrs.models.layers``) uses ``linear``, ``dequantize`` and
``take_rows``; the loader uses ``permute_rows``; memory accounting uses ``nbytes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@dataclass(frozen=True)
class QArray:
    data: Any  # int8 [rows, nblocks, block] or uint8 [rows, nblocks, block // 2]
    scale: Any  # [rows, nblocks], float16 or float32
    min: Any  # [rows, nblocks] or None (symmetric formats)
    shape: tuple[int, ...] = ()
    bits: int = 8
    block: int = 32
    zero: int = 0  # subtracted from the stored integer before scaling (8 for Q4_0)
    fmt: str = ""  # the format it came from (Q8_0, Q4_K, ...), for logs and reports

    def __post_init__(self) -> None:
        rows = math.prod(self.shape[:-1])
        nblocks = self.shape[-1] // self.block
        per_byte = 2 if self.bits == 4 else 1
        expected = (rows, nblocks, self.block // per_byte)
        # Leaves may be tracers or placeholders inside jax transformations; check real arrays only.
        if hasattr(self.data, "shape") and tuple(self.data.shape) != expected:
            raise ValueError(f"{self.fmt} data shape {tuple(self.data.shape)} != {expected} for {self.shape}")

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> Any:  # what it dequantizes to by default
        return jnp.float32

    @property
    def nbytes(self) -> int:
        return sum(int(leaf.nbytes) for leaf in jax.tree_util.tree_leaves(self))

    def _values(self, data: Array, dtype: Any) -> Array:
        """Stored integers as ``dtype`` ``[..., nblocks, block]``, ``zero`` already removed."""
        if self.bits == 4:
            shifts = jnp.array([0, 4], jnp.uint8)[:, None]
            data = (data[..., None, :] >> shifts) & 0xF  # [..., nblocks, 2, block/2]
            data = data.reshape(*data.shape[:-2], self.block)
        values = data.astype(dtype)
        return values - self.zero if self.zero else values

    def _expand(self, data: Array, scale: Array, min_: Array | None, dtype: Any) -> Array:
        w = self._values(data, dtype) * scale.astype(dtype)[..., None]
        if min_ is not None:
            w = w + min_.astype(dtype)[..., None]
        return w.reshape(*w.shape[:-2], self.shape[-1])

    def dequantize(self, dtype: Any = jnp.float32) -> Array:
        return self._expand(self.data, self.scale, self.min, dtype).reshape(self.shape)

    def linear(self, x: Array) -> Array:
        """``x @ w.T`` for a 2-D ``[out, in]`` weight; dequantizes inside the caller's jit.

        A 2-D matmul on purpose: with jax 0.10's XLA CPU a 3-D einsum over the
        expanded weight ran 10x slower in isolation (it fuses the dequantization
        into a strided matrix-vector loop).
        """
        out, inner = self.shape
        y = x.reshape(-1, inner) @ self.dequantize(x.dtype).T
        return y.reshape(*x.shape[:-1], out)

    def take_rows(self, ids: Array, dtype: Any) -> Array:
        """Rows ``ids`` of a 2-D table (embedding lookup) without expanding the whole table."""
        ids = jnp.clip(ids, 0, self.shape[0] - 1)
        min_ = None if self.min is None else self.min[ids]
        return self._expand(self.data[ids], self.scale[ids], min_, dtype)

    def permute_rows(self, perm: np.ndarray) -> "QArray":
        """Reorder rows (axis 0 of a 2-D weight), e.g. to undo llama.cpp's Q/K permutation."""
        perm = np.asarray(perm)
        pick = lambda a: None if a is None else a[perm]  # noqa: E731
        return QArray(pick(self.data), pick(self.scale), pick(self.min), **self.meta())

    def meta(self) -> dict[str, Any]:
        return dict(shape=self.shape, bits=self.bits, block=self.block, zero=self.zero, fmt=self.fmt)

    def __repr__(self) -> str:
        return f"QArray({self.fmt}, shape={self.shape}, {self.nbytes / 2**20:.2f} MiB)"


# Arrays are children (traced, donated, sharded); the layout description is static.
jax.tree_util.register_dataclass(
    QArray, data_fields=["data", "scale", "min"], meta_fields=["shape", "bits", "block", "zero", "fmt"]
)
