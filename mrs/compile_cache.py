"""JAX's compilation caches: the persistent one on by default, the lowering one emptied.

An engine compiles one step per bucket before it reports ready; on a CPU that
warm-up dominates start-up. Persisting compiled steps makes every later start of
the same model and engine shape (and every server process of a test run) cheap.
The engine's own steps go further: ``mrs.engine.executable_cache`` keeps them in a
folder of this cache's directory and loads them without tracing or lowering.

In memory, JAX also keeps every lowered MLIR module, to reuse it if the same traced
step is lowered again. An engine never does (each variant is lowered once, and it calls
the compiled executable directly: ``mrs.engine.executables``), so
``release_lowered_modules`` drops them (about 5 MiB per step variant of the quickstart
models; the executables themselves hold most of the rest).
"""

from __future__ import annotations

import logging
from pathlib import Path

import jax
from jax._src import pjit
from jax._src.interpreters import pxla

log = logging.getLogger(__name__)

DEFAULT_DIR = Path.home() / ".cache" / "mrs" / "jax"


def enable_persistent_cache() -> None:
    """Use ``~/.cache/mrs/jax`` unless JAX already has a cache dir (e.g. ``JAX_COMPILATION_CACHE_DIR``)."""
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", str(DEFAULT_DIR))


# The caches that hold lowered modules: jit's lowerings (each holds its module and, once
# compiled, its executable) and the modules themselves. No public API empties only these.
_LOWERING_CACHES = ((pjit, "_pjit_lower"), (pxla, "_cached_lowering_to_hlo"))


def release_lowered_modules() -> None:
    """Empty JAX's caches of lowered modules. Traced steps stay cached (nothing traces again)
    and so do the executables of steps that have run (jit's dispatch cache holds them); a
    step compiled ahead and never run must be kept as its ``Compiled`` by the caller."""
    for module, name in _LOWERING_CACHES:
        cache = getattr(module, name, None)
        if cache is None or not hasattr(cache, "cache_clear"):  # a JAX that moved it: keep the memory
            log.debug("JAX has no %s.%s cache to empty", module.__name__, name)
            continue
        cache.cache_clear()
