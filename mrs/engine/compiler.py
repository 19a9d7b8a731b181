"""Step variants compiled ahead of use, and which of them are ready.

An engine's steps come in variants (a prefill per chunk length and attention length, a
decode per attention length and batch rows, ...), each its own XLA executable. Compiling
all of them takes minutes on a small CPU, so the engine compiles first the few that can
serve any request (the largest of each kind: a step may always run in a larger bucket,
whose padding is masked) and reports ready; this module compiles the rest on a
background thread while the engine serves, and the engine runs each step in the smallest
variant that is ready (``ready``). Steps that can only compile by running
(``mrs.engine.placed``: a stage's inputs are the previous stage's outputs) compile
everything before the engine reports ready.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import weakref
from typing import Any

import jax

from mrs.heap import release_free_heap

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 10.0  # at most one progress line per this many seconds of compiling
Variant = tuple[str, tuple[Any, ...], dict[str, Any]]  # (step, its arguments after params and state, keywords)


_compiling: weakref.WeakSet[StepCompiler] = weakref.WeakSet()  # those with a background thread
_exit_hook_registered = False


def _stop_at_exit() -> None:
    """Stop every background compile and wait for the variant in flight: one still compiling
    when the interpreter tears XLA down aborts the process (a one-shot ``mrs generate``)."""
    for compiler in list(_compiling):
        compiler.stop(timeout=None)


def _register_exit_hook() -> None:
    # Registered once JAX's backend exists: atexit runs last-registered first, so this runs
    # before JAX's own clean-up.
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_stop_at_exit)
        _exit_hook_registered = True


def variant_key(step: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What makes a variant its own executable: the static arguments and the optional inputs
    (a prefill's length is its tokens' length, the second argument)."""
    if step == "decode":
        return ("decode", kwargs["kv_len"], kwargs["rows"])
    return ("prefill", len(args[1]), kwargs["kv_len"], "targets" in kwargs, "injected" in kwargs)


def _spec(x: Any) -> Any:
    """An argument's shape, dtype and (if committed) placement: lowering needs no data, and
    the state's buffers are donated to the engine's steps meanwhile."""
    sharding = x.sharding if getattr(x, "committed", False) else None
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)


class StepCompiler:
    """Compiles an engine's step variants, first in the foreground, then in the background."""

    def __init__(self, steps: Any, params: Any, source: str) -> None:
        self._steps = steps
        self._params = params
        self._source = source
        self._ready: set[tuple[Any, ...]] = set()
        self._finished = threading.Event()
        self._finished.set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.total = 0
        self.compiled = 0
        self.seconds = 0.0  # compiling, foreground and background together

    def ready(self, key: tuple[Any, ...]) -> bool:
        return key in self._ready

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def compile(self, state: Any, foreground: list[Variant], background: list[Variant]) -> Any:
        """Compile ``foreground`` now, on this thread, then start ``background`` on its own
        thread if the steps can compile without running (else compile them now too).
        Returns the state (steps that compile by running leave it changed)."""
        self.total = len(foreground) + len(background)
        off_thread = getattr(self._steps, "compiles_without_running", False)
        if not off_thread:
            foreground, background = foreground + background, []
        begin = time.perf_counter()
        state = self._compile_all(state, foreground, begin, threading.Event())
        release_free_heap()  # what compiling freed (each compile's scratch stays in the C heap)
        if background and not self._stopping.is_set():
            spec = jax.tree.map(_spec, state)
            thread = threading.Thread(target=self._background, args=(spec, background), daemon=True,
                                      name="mrs-compile")
            _register_exit_hook()
            self._finished.clear()
            thread.start()
            self._thread = thread
            _compiling.add(self)
        return state

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the background compile ends; whether every variant is compiled."""
        return self._finished.wait(timeout) and self.compiled == self.total

    def stop(self, timeout: float | None = 0.0) -> None:
        """Compile nothing more in the background; wait up to ``timeout`` seconds (None: as
        long as it takes) for the variant being compiled."""
        self._stopping.set()
        if not self._finished.wait(timeout):
            log.info("%s: a step variant is still compiling; it stops after this one", self._source)

    def _background(self, spec: Any, variants: list[Variant]) -> None:
        try:
            self._compile_all(spec, variants, time.perf_counter(), self._stopping)
        except Exception:  # the engine keeps serving with the variants it has
            log.exception("background compile of %s failed", self._source)
        finally:
            release_free_heap()
            self._finished.set()

    def _compile_all(self, state: Any, variants: list[Variant], begin: float, stop: threading.Event) -> Any:
        logged = begin
        for step, args, kwargs in variants:
            if stop.is_set():
                break
            started = time.perf_counter()
            state = self._steps.warm(step, self._params, state, *args, **kwargs)
            self._ready.add(variant_key(step, args, kwargs))
            self.compiled += 1
            now = time.perf_counter()
            self.seconds += now - started
            if now - logged >= PROGRESS_LOG_SECONDS or self.compiled == self.total:  # a sign of life
                log.info("warm-up of %s: %d/%d step variants compiled (%.1f s)", self._source, self.compiled,
                         self.total, self.seconds)
                logged = now
        return state
