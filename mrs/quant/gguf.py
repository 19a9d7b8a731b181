"""GGUF tensors to JAX: float arrays, or QArrays that keep the file's quantization.

``keep_quantized=True`` repacks Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K and Q6_K
tensors losslessly into ``QArray`` (see ``mrs.quant.ggml`` for each layout);
otherwise they expand to ``dtype``. Types we do not repack (other K/IQ quants)
always expand through gguf-py's reference dequantizer.
"""

from __future__ import annotations

from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np
from gguf import GGMLQuantizationType as T

from mrs.quant.ggml import REPACKABLE, repack
from mrs.quant.qarray import QArray


def _float_values(data: np.ndarray, ggml_type: T) -> np.ndarray:
    if ggml_type == T.BF16:  # stored as raw bytes/uint16: bfloat16 is float32's top half
        bits = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << np.uint32(16)
        return bits.view(np.float32)
    return gguf.quants.dequantize(np.asarray(data), ggml_type)


def gguf_tensor_to_jax(
    data: np.ndarray,
    ggml_type: T,
    shape: tuple[int, ...],
    *,
    keep_quantized: bool,
    dtype: Any,
    rows: np.ndarray | None = None,
) -> jax.Array | QArray:
    """One GGUF tensor as a JAX value in numpy order (``[out, in]`` for matrices), its rows
    (axis 0) in the order ``rows`` if given.

    ``data`` and ``shape`` are ``ReaderTensor.data`` / ``ReaderTensor.shape``
    (GGUF order ``ne0, ne1, ...``, the reverse of numpy's). The work before the tensor goes
    to the device is numpy's: an eager JAX op compiles on first use, every start.
    """
    np_shape = tuple(int(d) for d in reversed(shape))
    if ggml_type in REPACKABLE:
        packed = repack(data, ggml_type, np_shape)
        if rows is not None:
            packed = packed.permute_rows(rows)
        if keep_quantized:
            return to_device(packed)
        return to_device(packed).dequantize(dtype)
    return jnp.asarray(gguf_tensor_values(data, ggml_type, shape, rows), dtype=dtype)


def gguf_tensor_values(data: np.ndarray, ggml_type: T, shape: tuple[int, ...],
                       rows: np.ndarray | None = None) -> np.ndarray:
    """A GGUF tensor's float values on the host, in numpy order, rows in the order ``rows``."""
    values = _float_values(data, ggml_type).reshape(tuple(int(d) for d in reversed(shape)))
    return values if rows is None else values[np.asarray(rows)]


def to_device(q: QArray, device: Any = None) -> QArray:
    """A numpy-backed QArray with its leaves placed on ``device`` (default device if None)."""
    return jax.tree.map(lambda a: jax.device_put(a, device), q)
