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

Each variant holds tens of MiB, so with ``idle_seconds`` a variant that has not run for
that long leaves memory when the executable cache (``mrs.engine.executable_cache``) holds
it (``drop_idle``, on the engine's thread), and the worker thread loads it again from
disk, with no tracing, once the engine wants it (``want``); a larger variant serves meanwhile.
The largest ones always stay.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from mrs.engine import executable_cache
from mrs.engine.at_exit import StopAtExit
from mrs.heap import release_free_heap

log = logging.getLogger(__name__)

PROGRESS_LOG_SECONDS = 10.0  # at most one progress line per this many seconds of compiling
Variant = tuple[str, tuple[Any, ...], dict[str, Any]]  # (step, its arguments after params and state, keywords)


# The worker stops at interpreter exit, after the variant in hand: one still compiling when
# the interpreter tears XLA down aborts the process (a one-shot ``mrs generate``).
_compiling: StopAtExit[StepCompiler] = StopAtExit(lambda compiler: compiler.stop(timeout=None))


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
    """Compiles an engine's step variants, first in the foreground, then in the background,
    and keeps in memory those in use (see the module docstring)."""

    def __init__(self, steps: Any, params: Any, source: str, idle_seconds: float | None = None) -> None:
        self._steps = steps
        self._params = params
        self._source = source
        self._idle_seconds = idle_seconds
        self._ready: dict[tuple[Any, ...], float] = {}  # variants in memory -> when last wanted
        self._variants: dict[tuple[Any, ...], Variant] = {}  # every compiled one, to drop or load it again
        self._pinned: set[tuple[Any, ...]] = set()  # never dropped: the largest, and those not on disk
        self._dropped: set[tuple[Any, ...]] = set()  # on disk only; each wanted one is queued once
        self._loads: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._spec: Any = None  # the state's shapes: the worker compiles and loads from them
        self._next_drop = 0.0
        self._lock = threading.Lock()  # the worker adds to _ready while the engine's thread drops
        self._finished = threading.Event()
        self._finished.set()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._counting = threading.Lock()  # foreground variants compile on several threads
        self._logged = 0.0  # when the last progress line went out
        self.total = 0
        self.compiled = 0
        self.loaded = 0  # variants loaded again after being dropped
        self.seconds = 0.0  # compiling, summed over variants (those compiled at once overlap)
        self.foreground_entries: list[str] = []  # the executable cache's entries the foreground used

    def ready(self, key: tuple[Any, ...]) -> bool:
        return key in self._ready

    @property
    def in_memory(self) -> int:
        return len(self._ready)

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def compile(self, state: Any, largest: list[Variant], rest: list[Variant], background: bool = True) -> Any:
        """Compile ``largest`` now, on this thread, and ``rest`` on a worker thread if
        ``background`` and the steps can compile without running (else now too). Returns
        the state (steps that compile by running leave it changed)."""
        self.total = len(largest) + len(rest)
        off_thread = getattr(self._steps, "compiles_without_running", False)
        foreground, rest = (largest, rest) if background and off_thread else (largest + rest, [])
        # Several at once where they compile from shapes: loading one from the executable cache,
        # and XLA's compile, let go of the GIL, and the cores are otherwise idle until ready.
        workers = min(len(foreground), os.cpu_count() or 1) if off_thread else 1
        self._logged = time.perf_counter()
        state = self._compile_all(state, foreground, threading.Event(), workers, self.foreground_entries)
        self._pinned.update(variant_key(*variant) for variant in largest)
        self._touch_all()
        if not off_thread or self._idle_seconds is None:
            self._pinned.update(self._ready)  # nothing to load them again with
        release_free_heap()  # what compiling freed (each compile's scratch stays in the C heap)
        if off_thread and (rest or self._idle_seconds is not None) and not self._stopping.is_set():
            self._spec = jax.tree.map(_spec, state)
            thread = threading.Thread(target=self._work, args=(rest,), daemon=True, name="mrs-compile")
            self._finished.clear()
            thread.start()
            self._thread = thread
            _compiling.add(self)
        return state

    def want(self, key: tuple[Any, ...]) -> None:
        """The engine would run this variant now: keep it in memory, or load it again if it was dropped."""
        if key in self._ready:
            self._ready[key] = time.monotonic()
        elif key in self._dropped:
            self._dropped.discard(key)
            self._loads.put(key)

    def drop_idle(self) -> float | None:
        """Drop from memory the variants not wanted for ``idle_seconds`` (on the engine's thread,
        with no step in flight). Returns how long until the next may be due (None: never)."""
        if self._idle_seconds is None:
            return None
        now = time.monotonic()
        if now < self._next_drop:
            return self._next_drop - now
        dropped, due = 0, now + self._idle_seconds
        with self._lock:
            for key, wanted in list(self._ready.items()):
                if key in self._pinned:
                    continue
                if wanted + self._idle_seconds > now:
                    due = min(due, wanted + self._idle_seconds)
                elif self._forget(key):
                    del self._ready[key]
                    self._dropped.add(key)
                    dropped += 1
                else:  # not in the executable cache: it could not come back without a compile
                    self._pinned.add(key)
        if dropped:
            release_free_heap()
            log.debug("%s: %d idle step variants dropped from memory, %d kept", self._source, dropped,
                      len(self._ready))
        self._next_drop = due
        return due - now

    def _forget(self, key: tuple[Any, ...]) -> bool:
        step, args, kwargs = self._variants[key]
        return self._steps.forget(step, self._params, self._spec, *args, **kwargs)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the background compile ends; whether every variant is compiled."""
        return self._finished.wait(timeout) and self.compiled == self.total

    def stop(self, timeout: float | None = 0.0) -> None:
        """Compile or load nothing more; wait up to ``timeout`` seconds (None: as long as it
        takes) for the variant in hand."""
        self._stopping.set()
        self._loads.put(None)  # wakes the worker
        if not self._finished.is_set():
            log.info("%s: a step variant is still compiling; it stops after this one", self._source)
        if self._thread is not None:
            self._thread.join(timeout)

    def _work(self, variants: list[Variant]) -> None:
        """The worker thread: compile ``variants``, then load dropped ones as they are wanted."""
        try:
            self._logged = time.perf_counter()
            self._compile_all(self._spec, variants, self._stopping)
        except Exception:  # the engine keeps serving with the variants it has
            log.exception("background compile of %s failed", self._source)
        finally:
            release_free_heap()
            self._finished.set()
        self._touch_all()
        while (key := self._loads.get()) is not None and not self._stopping.is_set():
            try:
                self._warm(self._spec, self._variants[key])
                self.loaded += 1
            except Exception:  # larger variants keep serving; this one stays out
                log.exception("loading a step variant of %s failed", self._source)

    def _touch_all(self) -> None:
        """Idle from now on: the first variants compiled must not leave before the last is ready."""
        with self._lock:
            self._ready.update(dict.fromkeys(self._ready, time.monotonic()))

    def _warm(self, state: Any, variant: Variant) -> Any:
        step, args, kwargs = variant
        state = self._steps.warm(step, self._params, state, *args, **kwargs)
        key = variant_key(*variant)
        self._variants[key] = variant
        with self._lock:
            self._ready[key] = time.monotonic()
        return state

    def _compile_all(self, state: Any, variants: list[Variant], stop: threading.Event, workers: int = 1,
                     entries: list[str] | None = None) -> Any:
        """Compile ``variants`` (in order on one thread; on ``workers`` threads only for steps
        that compile without running, which leave the state as it is), noting in ``entries``
        the executable cache's entries they used."""
        if workers > 1:
            with ThreadPoolExecutor(workers, thread_name_prefix="mrs-warm-up") as pool:
                list(pool.map(lambda variant: stop.is_set() or self._compile_one(state, variant, entries), variants))
            return state
        for variant in variants:
            if stop.is_set():
                break
            state = self._compile_one(state, variant, entries)
        return state

    def _compile_one(self, state: Any, variant: Variant, entries: list[str] | None) -> Any:
        started = time.perf_counter()
        with contextlib.nullcontext() if entries is None else executable_cache.recording(entries):
            state = self._warm(state, variant)
        now = time.perf_counter()
        with self._counting:
            self.compiled += 1
            self.seconds += now - started
            if now - self._logged >= PROGRESS_LOG_SECONDS or self.compiled == self.total:  # a sign of life
                log.info("warm-up of %s: %d/%d step variants compiled (%.1f s of compiling)", self._source, self.compiled,
                         self.total, self.seconds)
                self._logged = now
        return state
