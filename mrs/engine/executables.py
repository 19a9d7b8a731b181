"""A jitted step with its ahead-of-time compiled executables, called directly.

A step compiled ahead of use (``compile``) is kept here as JAX's ``Compiled`` and called
without going through ``jax.jit``'s caches. That is what lets ``release_lowered_modules``
(``mrs.compile_cache``) empty those caches after each compile: they hold every lowered
module (about 5 MiB per step variant of the quickstart models: ``tools/bench_memory.py``
went from 68 to 63 MiB per compiled variant), and an executable that has never run is
reachable only through them. A call whose arguments no compiled variant takes compiles
that variant first, as ``compile`` does (so it is loaded from the executable cache when
that holds it, and stored there when not).
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any, Callable

import jax
import numpy as np

from mrs.compile_cache import release_lowered_modules
from mrs.engine import executable_cache


def _leaf_type(x: Any) -> tuple[tuple[int, ...], str]:
    """An argument's shape and dtype: arrays, ``jax.ShapeDtypeStruct``s and Python scalars."""
    if hasattr(x, "shape"):
        return tuple(x.shape), str(x.dtype)
    return np.shape(x), str(np.result_type(x))


class CompiledStep:
    """``jitted`` (a ``jax.jit`` of ``(*fixed, *args, **kwargs)``) plus its compiled variants.

    The first ``fixed`` arguments (parameters, state) have one shape per engine; a variant
    is the types of the rest and the values of the ``static`` keywords. Engines of one shape
    share their steps (``mrs.engine.placed``), so a variant leaves memory only when every
    engine that compiled it has let it go (``forget``).
    """

    def __init__(self, jitted: Callable[..., Any], fixed: int, static: frozenset[str],
                 fingerprint: str | None = None) -> None:
        self._jitted = jitted
        self._fixed = fixed
        self._static = static
        self._fingerprint = fingerprint  # what else the step depends on; None: not kept on disk
        self._executables: dict[tuple[Any, ...], Any] = {}
        self._kept: set[tuple[Any, ...]] = set()  # variants the executable cache holds
        self._holders: Counter[tuple[Any, ...]] = Counter()  # compiles of each variant not yet forgotten
        self._lock = threading.Lock()  # engines compile and forget on their own threads

    def _variant(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
        dynamic = {k: v for k, v in kwargs.items() if k not in self._static}
        leaves, tree = jax.tree.flatten((args[self._fixed:], dynamic))
        static = tuple(sorted((k, v) for k, v in kwargs.items() if k in self._static))
        return tree, tuple(map(_leaf_type, leaves)), static

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        variant = self._variant(args, kwargs)
        executable = self._executables.get(variant)
        if executable is None:  # compiled for these arguments (or loaded from disk) on first use
            self.compile(*args, **kwargs)
            executable = self._executables[variant]
        return executable(*args, **{k: v for k, v in kwargs.items() if k not in self._static})

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        return self._jitted.lower(*args, **kwargs)

    def compile(self, *args: Any, **kwargs: Any) -> None:
        """Compile the variant these arguments (arrays or ``jax.ShapeDtypeStruct``) select,
        without running it (or load it from ``mrs.engine.executable_cache``), and let JAX's
        caches forget its lowered module."""
        entry = None if self._fingerprint is None else executable_cache.key(self._fingerprint, args, kwargs,
                                                                             self._static)
        executable, kept = executable_cache.load_or_compile(entry, lambda: self._jitted.lower(*args, **kwargs).compile())
        # Another thread's lowering in flight holds its own module: emptying the caches is safe.
        release_lowered_modules()
        variant = self._variant(args, kwargs)
        with self._lock:
            self._executables[variant] = executable
            self._holders[variant] += 1
            if kept:
                self._kept.add(variant)

    def forget(self, *args: Any, **kwargs: Any) -> bool:
        """Drop the variant these arguments select from memory if the executable cache holds
        it (``compile`` loads it again), once no other engine holds it; whether this caller let
        it go. The caller makes sure that none of its own calls of it is in flight."""
        variant = self._variant(args, kwargs)
        with self._lock:
            if variant not in self._kept or self._holders[variant] == 0:
                return False
            self._holders[variant] -= 1
            if self._holders[variant] == 0:
                del self._executables[variant]
            return True
