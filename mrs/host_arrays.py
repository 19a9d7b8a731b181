"""Arrays built by numpy and handed to JAX.

An eager ``jnp.zeros`` or ``jnp.full`` compiles a small XLA program the first time each
shape is asked for, in every process: tens of milliseconds apiece, paid at every start by
the engine's empty state. numpy builds the same values without compiling; ``device_put``
copies them once (half the time ``jnp.asarray`` took for a KV pool) into an uncommitted
array, as ``jnp.zeros`` makes.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def zeros(shape: tuple[int, ...], dtype: Any) -> jax.Array:
    return jax.device_put(np.zeros(shape, jnp.dtype(dtype)))


def full(shape: tuple[int, ...], value: Any, dtype: Any) -> jax.Array:
    return jax.device_put(np.full(shape, value, jnp.dtype(dtype)))
