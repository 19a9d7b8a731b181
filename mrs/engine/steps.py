"""The jitted steps (JetStream-style): insert a request's sampling row, prefill a
chunk of its prompt into its slot, and decode one or a few tokens for every slot at once.

The whole decode state lives on device and is donated to every step, so the KV
cache is updated in place. Shapes are fixed by ``max_batch``, the KV pool's geometry
(``mrs.models.kv_cache.KVGeometry``) and the static bucket arguments; everything per
request is an array: the grammar engine's token bitmask (``mask``: int32 ``[max_batch,
ceil(V/32)]`` for decode, one row for prefill; all ones for a slot without a
constraint) and the KV block tables (``pages``: int32 ``[max_batch, table_width]`` for
decode, the slot's row for prefill; the host's ``mrs.engine.kv_pages`` fills them).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mrs import host_arrays
from mrs.engine.executable_cache import versioned
from mrs.engine.executables import CompiledStep
from mrs.engine.sampling import SampleOut, SlotSampling, empty_rows, sample, score_tokens
from mrs.models.config import ModelConfig
from mrs.models.kv_cache import KVCache, KVGeometry, Stage, init_cache
from mrs.models.layers import PAD_POSITION, Injected, decode_reads_lengths
from mrs.models.registry import build_encoder, build_model
from mrs.models.vision import VisionSpec

Array = jax.Array


class DecodeState(NamedTuple):
    cache: KVCache  # per layer a page pool (k [P, Hkv, D, page], v [P, Hkv, page, D])
    tokens: Array  # int32 [B]: last sampled token, the next decode input
    positions: Array  # int32 [B]: position of that token
    step: Array  # int32 [B]: tokens generated so far (indexes the PRNG stream)
    counts: Array  # int32 [B, V]: output token counts (presence/frequency penalties)
    seen: Array  # bool [B, V]: prompt or output tokens (repetition penalty)
    sampling: SlotSampling


def kv_buckets(max_seq_len: int, smallest: int = 256) -> list[int]:
    """Static attention lengths: ``smallest`` times powers of 4, then ``max_seq_len``.

    Coarse on purpose: each one is a compile per prefill chunk (and per decode batch bucket
    where decode's attention cost follows ``kv_len``), and reading a few hundred extra
    cache rows costs little next to the weights.
    """
    buckets, size = [], smallest
    while size < max_seq_len:
        buckets.append(size)
        size *= 4
    return buckets + [max_seq_len]


def batch_buckets(max_batch: int) -> list[int]:
    """Static decode batch sizes: 1, then 4, 8, 16, ... below ``max_batch``, then ``max_batch``.

    A step costs about linearly in its rows on CPU, so 8 clients get their own bucket
    (``tools/bench_serve.py``, 8 streamed clients: ITL p50 55 ms, 78 ms in the 16-row
    bucket); 2 does not, to keep the warm-up's variant count down.
    """
    buckets, size = [1], 4
    while size < max_batch:
        buckets.append(size)
        size *= 2
    return buckets + [max_batch] if max_batch > 1 else buckets


def bucket_for(length: int, buckets: list[int]) -> int:
    for size in buckets:
        if length <= size:
            return size
    return buckets[-1]


def chunk_positions(length: int, start: Array, n_real: Array) -> tuple[Array, Array]:
    """A prompt chunk's positions ``[1, length]`` (padding at PAD_POSITION) and its real-token mask."""
    offsets = jnp.arange(length)
    real = offsets < n_real
    return jnp.where(real, start + offsets, PAD_POSITION)[None], real


def decode_inputs(tokens: Array, positions: Array, active: Array, rows: int) -> tuple[Array, Array]:
    """The first ``rows`` slots' next inputs ``[rows, 1]`` and positions (idle slots at PAD_POSITION)."""
    return tokens[:rows, None], jnp.where(active[:rows], positions[:rows], PAD_POSITION)[:, None]


def slot_row(tree: Any, slot: Array) -> Any:
    return jax.tree.map(lambda x: jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0), tree)


def set_row(tree: Any, slot: Array, row: Any) -> Any:
    return jax.tree.map(
        lambda x, r: jax.lax.dynamic_update_slice_in_dim(x, jnp.asarray(r, x.dtype).reshape((1,) + x.shape[1:]), slot, axis=0),
        tree,
        row,
    )


def _step(fn: Callable[..., Any], static: tuple[str, ...], fingerprint: str) -> CompiledStep:
    """A step ``(params, state, ...) -> (state, ...)`` that donates its state."""
    jitted = jax.jit(versioned(fn), donate_argnums=(1,), static_argnames=static)
    return CompiledStep(jitted, fixed=2, static=frozenset(static), fingerprint=fingerprint)


class Steps:
    """Owns the model and the compiled step functions for one engine.

    With a ``stage`` it runs only the model's last layers (``mrs.engine.placed``
    runs the earlier ones): the steps take those layers' cache, and prefill and
    decode take the model's ``inputs`` (the previous stage's hidden states) instead
    of the tokens.
    """

    compiles_without_running = True  # ``warm`` lowers from shapes: any thread may call it

    def __init__(self, config: ModelConfig, max_batch: int, kv: KVGeometry, stage: Stage = None,
                 decode_steps: int = 1) -> None:
        self.config = config
        self.max_batch = max_batch
        self.kv = kv
        self.stage = stage
        self.decode_steps = decode_steps  # the most tokens per slot one decode call makes
        self.model = build_model(config, stage)
        # Incremented while tracing: a compile counter for tests and stats.
        self.traces: Counter[str] = Counter()
        # What the steps close over, beyond their inputs (mrs.engine.executable_cache).
        owner = f"{type(self).__qualname__}:{config!r}:{max_batch}:{kv!r}:{stage!r}:{decode_steps}"
        self.insert = CompiledStep(jax.jit(versioned(self._insert), donate_argnums=(0,)), fixed=1,
                                   static=frozenset(), fingerprint=f"{owner}:insert")
        self.prefill = _step(self._prefill, ("kv_len", "score"), f"{owner}:prefill")
        self.decode = _step(self._decode, ("kv_len", "rows"), f"{owner}:decode")

    @property
    def decode_reads_lengths(self) -> bool:
        """Whether decode's attention takes each sequence's length at run time: then one
        attention-length variant of decode serves them all (``layers.decode_reads_lengths``)."""
        return decode_reads_lengths(self.config, self.kv.dtype)

    def init_state(self) -> DecodeState:
        return self.empty_slots(init_cache(self.config, self.kv.pages, self.kv.page_size, self.kv.dtype,
                                           stage=self.stage))

    def empty_slots(self, cache: KVCache) -> DecodeState:
        """A state around ``cache`` with every slot empty (no slot's pages are read until a
        prefill writes them)."""
        b, v = self.max_batch, self.config.vocab_size
        return DecodeState(
            cache=cache,
            tokens=host_arrays.zeros((b,), np.int32),
            positions=host_arrays.full((b,), PAD_POSITION, np.int32),
            step=host_arrays.zeros((b,), np.int32),
            counts=host_arrays.zeros((b, v), np.int32),
            seen=host_arrays.zeros((b, v), bool),
            sampling=empty_rows(b, v),
        )

    def warm(self, step: str, params: Any, state: DecodeState, *args: Any, **kwargs: Any) -> DecodeState:
        """Compile ``step`` ("prefill" or "decode") for these arguments without running it;
        a later call with arguments of the same types and placement reuses the executable
        (running every variant would push some 2,000 dummy prompt tokens through the model).
        Returns ``state``, untouched."""
        getattr(self, step).compile(params, state, *args, **kwargs)
        return state

    def forget(self, step: str, params: Any, state: DecodeState, *args: Any, **kwargs: Any) -> bool:
        """Drop the variant of ``step`` that ``warm`` compiled for these arguments from memory,
        if the executable cache holds it (a later ``warm`` loads it); whether it was dropped."""
        return getattr(self, step).forget(params, state, *args, **kwargs)

    def place_params(self, params: Any) -> Any:
        """The parameters as the steps take them: here, on the default device, uncommitted."""
        return jax.device_put(params)

    def _insert(self, state: DecodeState, slot: Array, row: SlotSampling) -> DecodeState:
        """Give ``slot`` a new request's sampling parameters and clear its history."""
        self.traces["insert"] += 1
        return state._replace(
            step=state.step.at[slot].set(0),
            counts=set_row(state.counts, slot, jnp.zeros((self.config.vocab_size,), jnp.int32)),
            seen=set_row(state.seen, slot, jnp.zeros((self.config.vocab_size,), bool)),
            sampling=set_row(state.sampling, slot, row),
        )

    def _prefill(
        self,
        params: Any,
        state: DecodeState,
        slot: Array,
        tokens: Array,
        start: Array,
        n_real: Array,
        final: Array,
        mask: Array,
        pages: Array,
        inputs: Array | None = None,
        targets: Array | None = None,
        injected: Injected | None = None,
        *,
        kv_len: int,
        score: bool = False,
    ) -> tuple[DecodeState, SampleOut]:
        """Run prompt chunk ``tokens [L]`` (first ``n_real`` real) at ``start`` in ``slot``,
        whose KV pages are ``pages [1, table_width]``.

        On the final chunk, samples the first output token (among ``mask [W]``'s) and arms
        the slot for decode. With ``score`` (a variant compiled beside the plain one), the
        output also scores the chunk: ``targets [L]``, each position's next prompt token.
        ``injected`` (batch of one) puts image features into the chunk (another variant).
        """
        variant = ("/scored" if score else "") + ("/images" if injected is not None else "")
        self.traces[f"prefill/{tokens.shape[0]}/{kv_len}{variant}"] += 1
        positions, real = chunk_positions(tokens.shape[0], start, n_real)
        logits, cache = self.model.apply(
            {"params": params}, tokens[None] if inputs is None else inputs, positions, state.cache,
            logits_at=None if score else (n_real - 1)[None], kv_len=kv_len, injected=injected, pages=pages,
        )
        if score:  # every position's logits [1, L, V]; sampling takes the last real one's
            scores = score_tokens(logits[0], targets)
            logits = jax.lax.dynamic_index_in_dim(logits, n_real - 1, axis=1, keepdims=False)
        vocab = self.config.vocab_size
        seen = state.seen.at[slot, jnp.where(real, tokens, vocab)].set(True, mode="drop")
        row = lambda x: slot_row(x, slot)  # noqa: E731
        out = sample(logits, row(state.sampling), row(state.counts), row(seen), row(state.step), mask[None])
        if score:
            out = out._replace(prompt=scores)
        token = out.tokens[0]
        state = state._replace(
            cache=cache,
            tokens=state.tokens.at[slot].set(jnp.where(final, token, state.tokens[slot])),
            positions=state.positions.at[slot].set(start + n_real),
            step=state.step.at[slot].add(final.astype(jnp.int32)),
            counts=state.counts.at[slot, token].add(final.astype(jnp.int32)),
            seen=seen.at[slot, token].set(seen[slot, token] | final),
        )
        return state, out

    def _decode(
        self, params: Any, state: DecodeState, steps: Array, mask: Array, pages: Array, inputs: Array | None = None,
        *, kv_len: int, rows: int,
    ) -> tuple[DecodeState, SampleOut]:
        """``steps [max_batch]`` tokens (int32, 0 to ``decode_steps``) for each slot among the
        first ``rows`` (static: a batch bucket, so a lightly loaded engine does not pay for all
        its slots), each among its ``mask`` row's allowed tokens, through its ``pages`` row; idle
        slots read and write nothing. The outputs are ``[decode_steps, rows, ...]``: row i's
        first ``steps[i]`` are its tokens.

        Several tokens per call run as a loop on the device, one step after the other exactly
        as separate calls would (the same sampling draws): what they save is the host's part
        of each call (passing some 800 arguments, the engine's and server's per-step work),
        which on a CPU competes with the step for the same cores."""
        self.traces[f"decode/{rows}/{kv_len}"] += 1
        if self.decode_steps == 1:
            state, out = self._decode_one(params, state, steps > 0, mask, pages, inputs, kv_len=kv_len, rows=rows)
            return state, jax.tree.map(lambda x: x[None], out)
        assert inputs is None, "a staged model's last stage decodes one step per call"

        def step(i: Array, carry: tuple[DecodeState, SampleOut]) -> tuple[DecodeState, SampleOut]:
            state, outs = carry
            state, out = self._decode_one(params, state, i < steps, mask, pages, kv_len=kv_len, rows=rows)
            return state, jax.tree.map(lambda buf, x: buf.at[i].set(x), outs, out)

        shapes = jax.eval_shape(lambda: self._decode_one(params, state, steps > 0, mask, pages, kv_len=kv_len,
                                                         rows=rows)[1])
        outs = jax.tree.map(lambda x: jnp.zeros((self.decode_steps, *x.shape), x.dtype), shapes)
        return jax.lax.fori_loop(0, jnp.max(steps), step, (state, outs))

    def _decode_one(
        self, params: Any, state: DecodeState, active: Array, mask: Array, pages: Array, inputs: Array | None = None,
        *, kv_len: int, rows: int,
    ) -> tuple[DecodeState, SampleOut]:
        """One token for every ``active`` slot among the first ``rows``."""
        head = lambda x: x[:rows]  # noqa: E731
        last_tokens, positions = decode_inputs(state.tokens, state.positions, active, rows)
        active = head(active)
        logits, cache = self.model.apply(
            {"params": params}, last_tokens if inputs is None else inputs, positions, state.cache,
            logits_at=jnp.zeros((rows,), jnp.int32), kv_len=kv_len, pages=head(pages),
        )
        sampling = jax.tree.map(head, state.sampling)
        out = sample(logits, sampling, head(state.counts), head(state.seen), head(state.step), head(mask))
        tokens = jnp.where(active, out.tokens, head(state.tokens))
        grow = active.astype(jnp.int32)
        slots = jnp.arange(rows)
        state = state._replace(
            cache=cache,
            tokens=state.tokens.at[:rows].set(tokens),
            positions=state.positions.at[:rows].add(grow),
            step=state.step.at[:rows].add(grow),
            counts=state.counts.at[slots, tokens].add(grow),
            seen=state.seen.at[slots, tokens].set(state.seen[slots, tokens] | active),
        )
        return state, out


def image_buckets(max_images: int) -> list[int]:
    """Static image counts of the encoder step: powers of two up to ``max_images``."""
    buckets, size = [], 1
    while size < max_images:
        buckets.append(size)
        size *= 2
    return buckets + [max_images]


class EncodeImages:
    """A vision model's image encoder as a jitted step, bucketed by image count:
    ``(params, pixels [N, C, S, S]) -> features [N, tokens_per_image, hidden]`` (float32)."""

    def __init__(self, spec: VisionSpec) -> None:
        self.spec = spec
        self.buckets = image_buckets(spec.max_images)
        self.encoder = build_encoder(spec)
        self.traces: Counter[str] = Counter()
        self._step = CompiledStep(jax.jit(versioned(self._encode)), fixed=1, static=frozenset(),
                                  fingerprint=f"encode:{spec!r}")

    def _encode(self, params: Any, pixels: Array) -> Array:
        self.traces[f"encode/{pixels.shape[0]}"] += 1
        return self.encoder.apply({"params": params}, pixels).astype(jnp.float32)

    def __call__(self, params: Any, pixels: Any) -> Array:
        """Features of ``pixels`` (any count up to ``max_images``), padded to its bucket and back."""
        count = len(pixels)
        padded = np.zeros((bucket_for(count, self.buckets),) + tuple(pixels.shape[1:]), np.float32)
        padded[:count] = pixels
        return self._step(params, padded)[:count]

    def warm(self, params: Any) -> None:
        for size in self.buckets:
            shape = (size, self.spec.channels, self.spec.image_size, self.spec.image_size)
            self._step.compile(params, jax.ShapeDtypeStruct(shape, jnp.float32))
