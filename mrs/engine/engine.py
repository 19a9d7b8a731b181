"""One engine per model: a thread that batches every in-flight request into one
decode step (continuous batching), with on-device sampling and streaming events.

Which request runs in which slot, with which KV pages, is ``mrs.engine.scheduler``'s call
(plain Python); this module runs the thread, the device steps and the events.

Loop, per iteration: apply cancellations; prefill waiting requests into free slots;
dispatch the decode step for all slots (async); only then copy the *previous*
step's tokens to the host and turn them into events, so the host work overlaps the
device step. A slot's token from a step dispatched after its request finished is
dropped (each step remembers which sequence owned each slot).

Constrained slots (a grammar, ``mrs.engine.grammar``) break that overlap for
themselves only: a slot's next token bitmask depends on the token it just sampled,
so a constrained slot is never dispatched while a step holding its previous token is
in flight (``_dispatch`` checks it). When the previous step had a constrained slot,
the loop waits for that step, consumes the constrained slots' tokens and fills their
masks, dispatches the next step, and only then does the unconstrained slots' host
work (detokenizing, events) while the device runs. So the critical path grows by the
device-to-host sync plus each constrained slot's consume + mask (tens of microseconds
per slot, see README), and an unconstrained request in the batch is not held back
beyond that; with no constrained slot the loop is unchanged.
"""

from __future__ import annotations

import bisect
import logging
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from mrs.compile_cache import enable_persistent_cache
from mrs.config.schema import EngineConfig
from mrs.engine import executable_cache, warm_start
from mrs.engine.at_exit import StopAtExit
from mrs.engine.compiler import StepCompiler, Variant, variant_key
from mrs.engine.detokenizer import IncrementalDetokenizer
from mrs.engine.grammar import GrammarEngine
from mrs.engine.image_plan import check_images, chunk_injection, chunk_plan
from mrs.engine.kv_pages import PagePool, prefix_hashes
from mrs.engine.placed import build_steps
from mrs.engine.sampling import SampleOut, all_allowed, host_row
from mrs.engine.scheduler import Request, Scheduler, Seq
from mrs.engine.steps import EncodeImages, batch_buckets, bucket_for, kv_buckets
from mrs.engine.stream import RequestStream
from mrs.engine.types import Finish, GenerationRequest, TokenDelta, TokenLogprob, Usage
from mrs.engine.validate import validate_request
from mrs.errors import ModelUnavailable
from mrs.loading.checkpoint import Checkpoint
from mrs.models import kv_cache
from mrs.models.config import ModelConfig
from mrs.models.layers import Injected
from mrs.quant.memory import cache_bytes, param_bytes

log = logging.getLogger(__name__)


# Engine threads stop at interpreter exit: one still dropping a step's arrays then aborts the process.
_running: StopAtExit[Engine] = StopAtExit(lambda engine: engine.shutdown(timeout=10.0))


@dataclass
class _Step:
    out: SampleOut  # [decode_steps, rows, ...]
    owners: list[Seq | None]
    steps: np.ndarray  # int32 [max_batch]: how many of its tokens each slot runs
    started: float
    constrained: bool  # some owner has a grammar: the next step needs this one's tokens first


class Engine:
    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None,
                 warm_start_key: str | None = None) -> None:
        self.checkpoint = checkpoint
        self._warm_start_key = warm_start_key  # where to note the executables used before ready
        self.config = config or EngineConfig()
        self.tokenizer = checkpoint.tokenizer
        model_config = checkpoint.config
        self.max_batch = self.config.max_batch
        self._kv = kv_cache.geometry(self.config, model_config)
        self._scheduler = Scheduler(self.max_batch, self.config.max_queue, PagePool(self._kv, self.max_batch))
        self._pages = self._scheduler.pages
        self.context_limit = self._kv.context
        self._prefill_buckets = sorted({b for b in self.config.prefill_buckets if b <= self.context_limit}) or [
            self.context_limit
        ]
        self._vision = checkpoint.vision
        self._encode: EncodeImages | None = None
        if self._vision is not None:
            self._encode = EncodeImages(self._vision.spec)
            self._vision_params = jax.device_put(self._vision.params)
            # An image enters the cache in one chunk (mrs.engine.image_plan): chunks hold one at least.
            per_image = self._vision.spec.tokens_per_image
            if self._prefill_buckets[-1] < per_image:
                self._prefill_buckets.append(min(1 << (per_image - 1).bit_length(), self.context_limit))
        self._kv_buckets = kv_buckets(self.context_limit)
        # A continuation chunk pads to this instead of the largest bucket: the rest of a prompt
        # after a cached prefix (or a long prompt's last chunk) runs in short chunks when they pad
        # fewer tokens (_short_continuations). The second bucket: a chat turn after its cached
        # history is often a few dozen tokens, and a chunk's cost grows with its padded length.
        self._short_chunk = self._prefill_buckets[1] if len(self._prefill_buckets) > 2 else None
        self._batch_buckets = batch_buckets(self.max_batch)
        self._steps = build_steps(model_config, self.max_batch, self._kv, checkpoint.placement,
                                  self.config.decode_steps)
        # A decode kernel that reads each sequence's length costs the same at every kv_len:
        # one attention length per batch bucket then (a third of the decode variants to compile and hold).
        self._decode_kv_buckets = [self.context_limit] if self._steps.decode_reads_lengths else self._kv_buckets
        self._params = self._steps.place_params(checkpoint.params)
        self._compiler = StepCompiler(self._steps, self._params, checkpoint.source, self.config.variant_idle_s)
        # Measured once: the parameters never change, and walking their ~500 device
        # buffers took ~6 ms per stats() call (the status endpoint, load-test pollers).
        self._param_bytes = param_bytes(self._params) + (param_bytes(self._vision_params) if self._vision else 0)
        self._grammars = GrammarEngine(self.tokenizer, model_config.vocab_size, checkpoint.eos_token_ids)
        self._all_allowed = all_allowed(self.max_batch, model_config.vocab_size)
        # On the device once: a batch without a constraint sends no mask per step.
        self._unconstrained = jax.device_put(self._all_allowed)
        self._grammar_seconds = 0.0  # host time in consuming tokens and filling masks
        self._state: Any = None
        self._wake = threading.Event()
        self._ready = threading.Event()
        self._fatal: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._tokens_generated = 0
        self._steps_run = 0
        self._calls_run = 0
        self._step_seconds = 0.0
        self._warmup_seconds = 0.0
        self._kv_cache_bytes = 0  # measured once the engine thread allocates the cache
        self._kv_pages_unmap = False  # whether the pool's free pages give their memory back (a CPU pool)

    @classmethod
    def from_parts(
        cls,
        model_config: ModelConfig,
        params: Any,
        tokenizer: Any,
        eos_token_ids: tuple[int, ...],
        config: EngineConfig | None = None,
    ) -> "Engine":
        """An engine for a model given as config + parameter tree + tokenizer (no loader)."""
        checkpoint = Checkpoint(
            config=model_config, params=params, tokenizer=tokenizer, eos_token_ids=tuple(eos_token_ids),
            bos_token_id=getattr(tokenizer, "bos_token_id", None), add_bos=False, chat_template=None,
            source="in-memory parameters",
        )
        return cls(checkpoint, config)

    # ---- public API -------------------------------------------------------------------

    def start(self, wait: bool = True) -> "Engine":
        """Start the engine thread; with ``wait``, return once it serves: every bucket is
        compiled, or with ``compile_in_background`` the largest ones (see ``wait_compiled``)."""
        if self._thread is None:
            enable_persistent_cache()
            _running.add(self)
            self._thread = threading.Thread(target=self._run, name="mrs-engine", daemon=True)
            self._thread.start()
        if wait:
            self._ready.wait()
            if self._fatal is not None:
                raise ModelUnavailable(f"engine failed to start: {self._fatal}") from self._fatal
        return self

    def wait_compiled(self, timeout: float | None = None) -> bool:
        """Wait (at most ``timeout`` seconds) until the warm-up has compiled every step variant,
        in the background too; whether it has (false if the warm-up failed or stopped)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        left = lambda: None if deadline is None else max(0.0, deadline - time.monotonic())  # noqa: E731
        return self._ready.wait(left()) and self._fatal is None and self._compiler.wait(left())

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._fatal is None

    @property
    def healthy(self) -> bool:
        return self._fatal is None and not self._scheduler.closed

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; returns its event stream (async inside an event loop, else sync).

        Raises ``InvalidRequest``/``ContextLengthExceeded`` for bad input and
        ``Overloaded`` when ``max_queue`` requests already wait; nothing is queued then.
        """
        max_tokens = validate_request(
            request, vocab_size=self.checkpoint.config.vocab_size,
            context_limit=self.context_limit, max_batch=self.max_batch,
        )
        sp = request.sampling
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos:
            stop_ids.update(self.checkpoint.eos_token_ids)
        seed = sp.seed if sp.seed is not None else secrets.randbits(32)
        spans = check_images(request.prompt_ids, request.pixel_values, self._vision and self._vision.spec,
                             self.checkpoint.source)
        constraints = self._grammars.constraints(sp.grammar, sp.n) if sp.grammar else [None] * sp.n
        req = Request(request, RequestStream(request.request_id, sp.n), frozenset(stop_ids), seed, spans,
                       page_names=self._prefix_names(request))
        req.seqs = [
            Seq(req, i, max_tokens, IncrementalDetokenizer(self.tokenizer, request.prompt_ids, sp.stop), constraint)
            for i, constraint in enumerate(constraints)
        ]
        self._scheduler.enqueue(req)
        self._wake.set()
        return req.stream

    def cancel(self, request_id: str) -> None:
        """Stop a request; its choices finish with reason ``cancelled`` and free their slots."""
        self._scheduler.cancel(request_id)
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        return {
            "ready": self.ready,
            "healthy": self.healthy,
            "slots_busy": self._scheduler.busy,
            "slots_total": self.max_batch,
            "queue_depth": self._scheduler.queue_depth,
            "tokens_generated": self._tokens_generated,
            "decode_steps": self._steps_run,  # token steps; a call may run several (decode_steps)
            "decode_calls": self._calls_run,
            "step_time_ms": 1000 * self._step_seconds,
            "warmup_s": self._warmup_seconds,
            "compile_s": self._compiler.seconds,
            "variants_compiled": self._compiler.compiled,
            "variants_total": self._compiler.total,
            "variants_in_memory": self._compiler.in_memory,
            "variants_loaded_again": self._compiler.loaded,
            "compiles": sum(self._steps.traces.values()) + (sum(self._encode.traces.values()) if self._encode else 0),
            "grammar_host_s": self._grammar_seconds,
            "param_bytes": self._param_bytes,
            "kv_cache_bytes": self._kv_cache_bytes,
            # What the pool holds in memory: the pages in use, cached or freed while busy (on a CPU).
            "kv_resident_bytes": self._kv_cache_bytes * self._pages.resident // self._kv.pages
            if self._kv_pages_unmap else self._kv_cache_bytes,
            "kv_pages_total": self._kv.pages,
            "kv_pages_used": self._pages.used,
            "kv_pages_cached": self._pages.cached,
            "kv_page_size": self._kv.page_size,
            "context_limit": self.context_limit,
        }

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the thread; requests still in flight finish with reason ``cancelled``."""
        self._scheduler.close()
        # Without waiting: an unload must not block on a compile; the variant in flight ends alone.
        self._compiler.stop()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._new_state()
            # Measured here, not in stats(): other threads must not read a cache the
            # decode step is donating, and its buffers keep these sizes for the engine's life.
            self._kv_cache_bytes = cache_bytes(self._state.cache)
            log.info("%s: KV cache of %d pages x %d tokens (%d tokens, %s, %.1f MiB%s) shared by %d slots; "
                     "context %d", self.checkpoint.source, self._kv.pages, self._kv.page_size, self._kv.tokens,
                     self._kv.dtype, self._kv_cache_bytes / 2**20, ", in memory as pages fill" if self._kv_pages_unmap
                     else "", self.max_batch, self.context_limit)
            if self.config.warmup:
                self._warmup()
        except BaseException as exc:  # report through start(); callers never hang
            log.exception("engine warm-up failed")
            self._fatal = exc
            self._ready.set()
            return
        self._ready.set()
        pending: _Step | None = None
        while not self._scheduler.closed:
            try:
                self._apply_cancels()
                admitted = self._admit()
                host = None
                if pending is not None and pending.constrained:  # see the module docstring
                    host = self._fetch(pending)
                    self._emit_rows(pending, host, constrained=True)
                step = self._dispatch()
                if pending is not None:
                    self._emit_rows(pending, self._fetch(pending) if host is None else host, constrained=False)
                for seq, out in admitted:
                    self._emit_first(seq, out)
                pending = step
            except Exception as exc:  # a failed step: its requests get an error, the engine goes on
                log.exception("decode step failed")
                pending = None
                self._reset(exc)
                continue
            # Only with no step in flight: a dropped variant's executable must not be running.
            idle_check = self._compiler.drop_idle() if pending is None else None
            # Sleep unless the last step's collection just freed room for a waiting request: no
            # submit is coming to wake the thread then (it used to sleep with a full queue).
            if pending is None and not admitted and not self._scheduler.admissible():
                self._unmap_stale_pages()  # idle: nothing runs, so no step writes the pages meanwhile
                self._wake.wait(idle_check)
                self._wake.clear()
        self._close()

    def _new_state(self, cache: Any = None) -> None:
        """A fresh decode state (every slot empty) around a new zeroed KV pool or ``cache``;
        the pool holds no memory until pages fill."""
        self._state = self._steps.init_state() if cache is None else self._steps.empty_slots(cache)
        jax.block_until_ready(self._state.cache)  # the zeros written before their pages go
        self._kv_pages_unmap = kv_cache.discard(self._state.cache, self._pages.unmap_all()) > 0

    def _unmap_stale_pages(self) -> None:
        """Hand back the memory of the free pages that held tokens (``mrs.engine.kv_pages``)."""
        stale = self._pages.take_stale()
        if stale and self._kv_pages_unmap:
            jax.block_until_ready(self._state.cache)
            kv_cache.discard(self._state.cache, stale)

    def _warmup(self) -> None:
        """Compile the step variants: the largest of each kind before the engine reports ready,
        the rest in the background if ``compile_in_background`` (``mrs.engine.compiler``)."""
        begin = time.perf_counter()
        row = host_row(
            self.checkpoint.config.vocab_size, temperature=1.0, top_k=2, top_p=0.9, min_p=0.0,
            presence=0.0, frequency=0.0, repetition=1.0, seed=0, choice=0, top_logprobs=1, logit_bias={},
        )
        entries: list[str] = []  # the executable cache's, for the next start (mrs.engine.warm_start)
        with executable_cache.recording(entries):
            self._state = self._steps.insert(self._state, np.int32(0), row)
        self._pages.reserve(0, self.context_limit)  # real pages: staged placements run their variants
        self._pages.grow(0, self.context_limit)
        if self._encode is not None:
            self._encode.warm(self._vision_params)
        largest, rest = self._variants()
        self._state = self._compiler.compile(self._state, largest, rest, self.config.compile_in_background)
        warm_start.remember(self._warm_start_key, entries + self._compiler.foreground_entries)
        jax.block_until_ready(self._state)
        self._pages.release(0)
        self._new_state(self._state.cache)  # a new pool would write all its zeros again
        self._warmup_seconds = time.perf_counter() - begin

    def _variants(self) -> tuple[list[Variant], list[Variant]]:
        """The step variants to compile: those that can serve any request (each kind at the
        largest chunk, attention length and batch), then the rest, smallest first."""
        mask, top_kv = self._all_allowed[0], self._kv_buckets[-1]
        chunk = self._prefill_buckets[-1]
        starts = self._continuations(chunk)
        steps = np.zeros(self.max_batch, np.int32)
        steps[0] = 1
        decode = [("decode", (steps, self._unconstrained, self._pages.tables.copy()), {"kv_len": kv_len, "rows": rows})
                  for rows in self._batch_buckets for kv_len in self._decode_kv_buckets]
        largest = [decode.pop()]
        rest: list[Variant] = decode
        # Plain prefill, and the one that scores the prompt: rare (echo, prompt_logprobs), so
        # only its largest variant is compiled (each compiled variant costs start-up time and tens
        # of MiB of memory).
        for targets in (None, [0]):
            largest.append(("prefill", *self._prefill_inputs(0, [0], 0, chunk, True, mask, targets, kv_len=top_kv)))
        rest += [("prefill", *self._prefill_inputs(0, [0], 0, length, True, mask, None))
                 for length in self._prefill_buckets]
        rest += [("prefill", *self._prefill_inputs(0, [0], start, chunk, True, mask, None)) for start in starts]
        if self._short_chunk is not None:
            rest += [("prefill", *self._prefill_inputs(0, [0], start, self._short_chunk, True, mask, None))
                     for start in self._continuations(self._short_chunk)]
        if self._encode is not None:  # each first-chunk bucket that holds an image, each continuation
            largest.append(self._image_variant(0, chunk, mask, kv_len=top_kv))
            rest += [self._image_variant(0, length, mask) for length in self._prefill_buckets
                     if length >= self._vision.spec.tokens_per_image]
            rest += [self._image_variant(start, chunk, mask) for start in starts]
        return largest, [v for v in rest if not self._variant_in(v, largest)]

    @staticmethod
    def _variant_in(variant: Variant, variants: list[Variant]) -> bool:
        key = variant_key(*variant)
        return any(variant_key(*v) == key for v in variants)

    def _image_variant(self, start: int, length: int, mask: np.ndarray, kv_len: int | None = None) -> Variant:
        """A prefill with an image in the chunk ``[start, start + length)``."""
        spec = self._vision.spec
        features = np.zeros((1, spec.tokens_per_image, self.checkpoint.config.hidden_size), np.float32)
        injected = chunk_injection(features, [(start, start + spec.tokens_per_image)], start,
                                   start + spec.tokens_per_image, length, spec.bidirectional)
        return ("prefill", *self._prefill_inputs(0, [0], start, length, True, mask, None, injected, kv_len=kv_len))

    def _continuations(self, length: int) -> list[int]:
        """One start for each attention length a continuation chunk of ``length`` can have: it
        starts after a whole chunk or after cached prefix pages."""
        page, chunk = self._kv.page_size, self._prefill_buckets[-1]
        starts = sorted(set(range(page, self.context_limit, page)) | set(range(chunk, self.context_limit, chunk)))
        return list({self._chunk_kv_len(start, length): start for start in starts}.values())

    def _chunk_kv_len(self, start: int, length: int) -> int:
        return bucket_for(start + length, self._kv_buckets)

    def _prefill_kv_len(self, start: int, length: int) -> int:
        return length if start == 0 else self._chunk_kv_len(start, length)

    def _compiled(self, key: tuple[Any, ...]) -> bool:
        """Whether a step variant may run now: compiled by the warm-up (without one, every
        variant compiles when first run)."""
        return not self.config.warmup or self._compiler.ready(key)

    def _prefill_shape(self, start: int, length: int, scored: bool, image: bool) -> tuple[int, int]:
        """The chunk length and attention length a chunk padded to ``length`` runs with: its
        own, or while the background compile has not reached it (or it loads again after an idle
        spell: ``mrs.engine.compiler``), the largest (compiled first, always in memory)."""
        kv_len = self._prefill_kv_len(start, length)
        key = ("prefill", length, kv_len, scored, image)
        self._compiler.want(key)
        if self._compiled(key):
            return length, kv_len
        return self._prefill_buckets[-1], self._kv_buckets[-1]

    def _decode_shape(self, longest: int, rows: int) -> tuple[int, int]:
        """The attention length and batch rows of a decode step for these sequences: the
        smallest buckets in memory that hold them (the largest are compiled first and stay)."""
        kv_len, rows = bucket_for(longest, self._decode_kv_buckets), bucket_for(rows, self._batch_buckets)
        self._compiler.want(("decode", kv_len, rows))
        kv_len, rows = next((k, r) for r in self._batch_buckets if r >= rows for k in self._decode_kv_buckets
                            if k >= kv_len and self._compiled(("decode", k, r)))
        self._compiler.want(("decode", kv_len, rows))  # the one that serves meanwhile stays too
        return kv_len, rows

    def _chunk_length(self, start: int, tokens: int, plain: bool) -> int:
        """The padded length of a prompt chunk of ``tokens`` tokens at ``start``: the first
        chunk's bucket; a continuation's is the largest bucket, or the short one when it fits
        and the chunk is plain (no image, not scored: those have no short variant)."""
        if start == 0:
            return bucket_for(tokens, self._prefill_buckets)
        if plain and self._short_chunk is not None and tokens <= self._short_chunk:
            return self._short_chunk
        return self._prefill_buckets[-1]

    def _prefill_chunk(self, slot: int, chunk: list[int], start: int, length: int, final: bool,
                       mask: np.ndarray, targets: list[int] | None, injected: Injected | None, kv_len: int,
                       ) -> SampleOut:
        """One prompt chunk; with ``targets`` (each position's next prompt token) it is scored too."""
        args, kwargs = self._prefill_inputs(slot, chunk, start, length, final, mask, targets, injected, kv_len)
        self._state, out = self._steps.prefill(self._params, self._state, *args, **kwargs)
        return out

    def _prefill_inputs(self, slot: int, chunk: list[int], start: int, length: int, final: bool, mask: np.ndarray,
                        targets: list[int] | None, injected: Injected | None = None, kv_len: int | None = None,
                        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The prefill step's arguments after the parameters and state, and its keyword arguments
        (attending over ``kv_len`` rows: by default the chunk's own bucket)."""
        tokens = np.zeros(length, np.int32)
        tokens[: len(chunk)] = chunk
        kv_len = kv_len or self._prefill_kv_len(start, length)
        scored = {} if targets is None else {"targets": np.pad(np.asarray(targets, np.int32), (0, length - len(targets))),
                                             "score": True}
        images = {} if injected is None else {"injected": injected}
        pages = self._pages.tables[slot : slot + 1].copy()  # a fresh array: see _masks
        return (np.int32(slot), tokens, np.int32(start), np.int32(len(chunk)), np.bool_(final), mask, pages), {
            "kv_len": kv_len, **scored, **images}

    def _masks(self, seqs: list[tuple[int, Seq]], rows: int) -> np.ndarray:
        """The token bitmask for ``rows`` slots: each constrained ``(row, seq)``'s grammar, all ones elsewhere.

        A fresh array per step: the device may read a numpy argument in place (zero-copy
        on CPU) while the host prepares the next step.
        """
        mask = self._all_allowed[:rows].copy()
        for row, seq in seqs:
            mask[row] = seq.constraint.mask[0]
        return mask

    def _prefill(self, seq: Seq, slot: int) -> SampleOut:
        """Insert ``seq``'s sampling row into ``slot`` and prefill its prompt (chunked)."""
        request = seq.req.request
        sp = request.sampling
        vocab = self.checkpoint.config.vocab_size
        row = host_row(
            vocab, temperature=sp.temperature, top_k=min(max(sp.top_k, 0), vocab),  # k >= vocab keeps all, as 0 does
            top_p=sp.top_p, min_p=sp.min_p, presence=sp.presence_penalty, frequency=sp.frequency_penalty,
            repetition=sp.repetition_penalty, seed=seq.req.seed, choice=seq.index,
            top_logprobs=sp.top_logprobs if sp.logprobs else 0, logit_bias=sp.logit_bias,
        )
        self._state = self._steps.insert(self._state, np.int32(slot), row)
        self._pages.grow(slot, seq.prompt_len)
        mask = self._masks([(0, seq)] if seq.constraint else [], 1)[0]
        ids, chunk_size = request.prompt_ids, self._prefill_buckets[-1]
        spans, features = seq.req.spans, self._image_features(seq.req)
        scoring = sp.prompt_logprobs is not None
        scores: list[tuple[int, Any]] = []  # (chunk start, its prompt scores)
        plan = chunk_plan(len(ids), chunk_size, spans, seq.cached)
        if not scoring and features is None:
            plan = self._short_continuations(plan)
        for start, stop in plan:
            chunk = ids[start:stop]
            length = self._chunk_length(start, len(chunk), plain=not scoring and features is None)
            length, kv_len = self._prefill_shape(start, length, scoring, features is not None)
            targets = ids[start + 1 : stop + 1] if scoring else None
            injected = None if features is None else chunk_injection(
                features, spans, start, stop, length, self._vision.spec.bidirectional)
            out = self._prefill_chunk(slot, chunk, start, length, stop == len(ids), mask, targets, injected, kv_len)
            if scoring:
                scores.append((start, jax.device_get(out.prompt)))
        if scoring:
            seq.prompt_logprobs = self._prompt_logprobs(ids, scores, sp.prompt_logprobs)
        return out

    def _short_continuations(self, plan: list[tuple[int, int]]) -> list[tuple[int, int]]:
        """A plain prompt's chunks, the last split into short ones when it continues a cached
        prefix or a full chunk and they pad fewer tokens than the largest chunk: a chunk costs
        about its padded length (SmolLM2, timed in-process: 198 ms for 64 tokens, 1,553 ms
        for 512), so a 40-token rest takes a 64-token chunk, not a 512-token one."""
        if self._short_chunk is None or not plan:
            return plan
        start, stop = plan[-1]
        short = self._short_chunk
        if start == 0 or -(-(stop - start) // short) * short >= self._prefill_buckets[-1]:
            return plan
        return plan[:-1] + chunk_plan(stop, short, [], start)

    def _prefix_names(self, request: GenerationRequest) -> list[bytes]:
        """The prompt's page names for the prefix cache; none when it is off, for prompts with
        images (their placeholder tokens do not say which image) and for prompts to score
        (every position's logits are wanted)."""
        if (not self.config.prefix_cache or request.pixel_values is not None
                or request.sampling.prompt_logprobs is not None):
            return []
        return prefix_hashes(request.prompt_ids, self._kv.page_size)

    def _image_features(self, req: Request) -> np.ndarray | None:
        """The request's image features on the host (computed once for all its choices)."""
        pixels = req.request.pixel_values
        if pixels is None or self._encode is None:
            return None
        if req.features is None:
            req.features = np.asarray(jax.device_get(self._encode(self._vision_params, pixels)))
        return req.features

    def _prompt_logprobs(self, ids: list[int], chunks: list[tuple[int, Any]], top: int) -> list[TokenLogprob]:
        """Every prompt token's logprob given the ones before it; the first has none (``None``)."""
        decode = lambda t: self.tokenizer.decode([t])  # noqa: E731
        items = [TokenLogprob(ids[0], decode(ids[0]), None)]
        starts = [start for start, _ in chunks]
        for position, token in enumerate(ids[1:]):  # token ids[position + 1], predicted at `position`
            start, scores = chunks[bisect.bisect_right(starts, position) - 1]
            at = position - start
            alternatives = [(int(t), decode(int(t)), float(lp))
                            for t, lp in zip(scores.top_ids[at][:top], scores.top_logprobs[at][:top])]
            items.append(TokenLogprob(token, decode(token), float(scores.logprob[at]), alternatives))
        return items

    def _admit(self) -> list[tuple[Seq, SampleOut]]:
        admitted = []
        while (next_up := self._scheduler.next_admission()) is not None:
            seq, slot = next_up
            try:
                out = self._prefill(seq, slot)
            except Exception as exc:
                log.exception("prefill of %s failed", seq.req.request.request_id)
                self._scheduler.release_unadmitted(slot)
                self._fail_request(seq.req, exc)
                if any(x.is_deleted() for x in jax.tree.leaves(self._state)):
                    self._reset(exc)  # the donated state went down with it
                continue
            self._scheduler.admitted(seq, slot, seq.req.page_names)
            if seq.constraint is not None:  # its first decode step's mask needs this token
                self._emit_first(seq, out)
            else:
                admitted.append((seq, out))
        return admitted

    def _dispatch(self) -> _Step | None:
        """Launch one decode call for every slot that may still produce a token: several steps
        of it while no slot has a grammar (whose next mask needs each token on the host) and no
        request waits to be admitted (it would wait for all of them)."""
        several = self._steps.decode_steps > 1 and not self._scheduler.admissible()
        plan = self._scheduler.plan_decode(self._steps.decode_steps if several else 1)
        if plan is None:
            return None
        started = time.perf_counter()
        kv_len, rows = self._decode_shape(plan.longest, plan.rows)  # slots fill lowest first
        mask = self._masks(plan.constrained, self.max_batch) if plan.constrained else self._unconstrained
        pages = self._pages.tables.copy()  # a fresh array: see _masks
        self._state, out = self._steps.decode(self._params, self._state, plan.steps, mask, pages, kv_len=kv_len,
                                              rows=rows)
        return _Step(out, plan.owners, plan.steps, started, bool(plan.constrained))

    def _fetch(self, step: _Step) -> SampleOut:
        host = jax.device_get(step.out)  # the one device-to-host copy of this step
        steps = int(step.steps.max())
        self._steps_run += steps
        self._calls_run += 1
        self._step_seconds = (time.perf_counter() - step.started) / steps
        return host

    def _emit_rows(self, step: _Step, host: SampleOut, *, constrained: bool) -> None:
        """Emit the call's tokens of its constrained (or its unconstrained) owners: one delta
        per sequence, its tokens in order until it ends (the call's later ones are dropped)."""
        for i, seq in enumerate(step.owners):
            if seq is not None and not seq.done and (seq.constraint is not None) == constrained:
                self._emit_isolated(seq, host, [(j, i) for j in range(step.steps[i])])

    def _emit_first(self, seq: Seq, out: SampleOut) -> None:
        if not seq.done:
            self._emit_isolated(seq, jax.device_get(out), [(0,)])

    def _emit_isolated(self, seq: Seq, host: SampleOut, at: list[tuple[int, ...]]) -> None:
        """``_emit``, where a failure (a detokenizer that raises, say) ends only ``seq``'s request."""
        try:
            self._emit(seq, host, at)
        except Exception as exc:
            log.exception("turning a token of %s into text failed", seq.req.request.request_id)
            self._fail_request(seq.req, exc)

    def _emit(self, seq: Seq, host: SampleOut, at: list[tuple[int, ...]]) -> None:
        """Turn the tokens sampled for ``seq`` (``host``'s entries at the indices ``at``: (step,
        row) of a decode call, (row,) of a prefill; in order) into one delta, up to the one that
        ends it (then a finish)."""
        sp = seq.req.request.sampling
        tokens: list[int] = []
        texts: list[str] = []
        logprobs: list[TokenLogprob] = []
        reason = None
        for index in at:
            token = int(host.tokens[index])
            seq.generated += 1
            self._tokens_generated += 1
            tokens.append(token)
            if sp.logprobs:
                logprobs.append(self._logprob(token, host, index, sp.top_logprobs))
            if token in seq.req.stop_ids:
                texts.append(seq.detok.flush())
                reason = "stop"
                break
            texts.append(seq.detok.add(token))
            complete = self._advance(seq, token)
            if seq.detok.stopped:
                reason = "stop"
                break
            if complete or seq.generated >= seq.max_tokens:  # a complete grammar ends the text
                texts.append(seq.detok.flush())
                reason = "stop" if complete else "length"
                break
        prompt, seq.prompt_logprobs = seq.prompt_logprobs, None
        seq.req.stream.push(TokenDelta(seq.index, "".join(texts), tokens, logprobs if sp.logprobs else None, prompt))
        if reason is not None:
            self._finish(seq, reason)

    def _advance(self, seq: Seq, token: int) -> bool:
        """Consume ``token`` into ``seq``'s grammar (and fill its next mask); whether it is now
        complete. A grammar at a dead end raises, and ``_emit_isolated`` fails only this request."""
        if seq.constraint is None:
            return False
        begin = time.perf_counter()
        try:
            return seq.constraint.advance(token)
        finally:
            self._grammar_seconds += time.perf_counter() - begin

    def _logprob(self, token: int, host: SampleOut, index: tuple[int, ...], top: int) -> TokenLogprob:
        decode = lambda t: self.tokenizer.decode([t])  # noqa: E731
        alternatives = [
            (int(t), decode(int(t)), float(lp))
            for t, lp in zip(host.top_ids[index][:top], host.top_logprobs[index][:top])
        ]
        return TokenLogprob(token, decode(token), float(host.logprob[index]), alternatives)

    def _finish(self, seq: Seq, reason: str, error: Exception | None = None) -> None:
        self._scheduler.finish(seq)
        seq.req.stream.push(Finish(seq.index, reason, Usage(seq.prompt_len, seq.generated, seq.cached), error))

    def _fail_request(self, req: Request, exc: Exception) -> None:
        for seq in req.seqs:
            if not seq.done:
                self._finish(seq, "error", exc)

    def _apply_cancels(self) -> None:
        for req in self._scheduler.take_cancelled():
            req.cancelled = True
            for seq in req.seqs:
                if not seq.done:
                    self._finish(seq, "cancelled")

    def _reset(self, exc: Exception) -> None:
        """After a failed step: error out the running sequences and rebuild the state."""
        for seq in self._scheduler.running():
            self._fail_request(seq.req, exc)
        self._scheduler.reset()
        try:
            self._new_state()
        except Exception as fatal:  # cannot even allocate: report unhealthy and stop
            log.exception("engine state could not be rebuilt")
            self._fatal = fatal
            self._scheduler.close()

    def _close(self) -> None:
        """Finish whatever is left when the thread stops, so no caller waits forever."""
        for req in self._scheduler.drain():
            for seq in req.seqs:
                if not seq.done:
                    if self._fatal is not None:
                        self._finish(seq, "error", ModelUnavailable(f"engine failed: {self._fatal}"))
                    else:
                        self._finish(seq, "cancelled")
