"""GGUF tensors to JAX: plain arrays, or quantized arrays kept packed.

First version: every tensor dequantizes through gguf-py's reference; the packed
path (``keep_quantized=True`` returning a QArray) replaces it next.
"""

from __future__ import annotations

from typing import Any

import gguf
import jax
import jax.numpy as jnp
import numpy as np


def gguf_tensor_to_jax(
    data: np.ndarray,
    ggml_type: gguf.GGMLQuantizationType,
    shape: tuple[int, ...],
    *,
    keep_quantized: bool,
    dtype: Any,
) -> Any:
    """One GGUF tensor as a JAX value in numpy order (``[out, in]`` for matrices).

    ``data`` and ``shape`` are ``ReaderTensor.data`` / ``ReaderTensor.shape``
    (GGUF order ``ne0, ne1, ...``, the reverse of numpy's).
    """
    np_shape = tuple(int(d) for d in reversed(shape))
    values = gguf.quants.dequantize(np.asarray(data), ggml_type).reshape(np_shape)
    return jnp.asarray(values, dtype=dtype)


def permute_rows(x: Any, perm: np.ndarray) -> Any:
    """Reorder the rows (output dim, axis 0) of a plain or quantized array."""
    if hasattr(x, "permute_rows"):
        return x.permute_rows(perm)
    return jnp.asarray(x)[np.asarray(perm)]
