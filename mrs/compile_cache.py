"""JAX's persistent compilation cache, on by default.

An engine compiles one step per bucket before it reports ready; on a CPU that
warm-up dominates start-up. Persisting compiled steps makes every later start of
the same model and engine shape (and every server process of a test run) cheap.
"""

from __future__ import annotations

from pathlib import Path

import jax

DEFAULT_DIR = Path.home() / ".cache" / "mrs" / "jax"


def enable_persistent_cache() -> None:
    """Use ``~/.cache/mrs/jax`` unless JAX already has a cache dir (e.g. ``JAX_COMPILATION_CACHE_DIR``)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(DEFAULT_DIR))
