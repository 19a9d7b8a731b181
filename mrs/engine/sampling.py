"""On-device sampling for every slot at once, each slot with its own parameters.

All per-request parameters are arrays (one row per slot), so a new request never
compiles. Order of operations, per slot:
  raw logits -> repetition penalty (prompt and output tokens) -> presence and
  frequency penalties (output tokens) -> logit_bias -> the grammar's token mask
  (a bitmask row per slot, all ones when unconstrained) -> greedy if temperature == 0,
  else / temperature -> top_k -> top_p and min_p (on the top_k-renormalized
  distribution) -> inverse-CDF draw.
Logprobs are the log-softmax of the raw model logits (what vLLM reports by default).

Randomness: slot ``b`` draws one uniform with key ``fold_in(fold_in(key(seed_b), choice_b),
step_b)`` and inverts its kept distribution's CDF (in token-id order), so a seeded request
gets the same tokens whatever else shares the batch and whichever filtering branch runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mrs import host_arrays
from mrs.engine.bounds import MAX_TOP_LOGPROBS

Array = jax.Array
_BLOCK = 256  # tokens per block of the two-level inverse CDF
CANDIDATES = 64  # a top_k up to this filters among lax.top_k's candidates, not the vocabulary


class SlotSampling(NamedTuple):
    """Sampling parameters, one row per slot (``[B]``, ``logit_bias [B, V]``)."""

    temperature: Array  # float32; 0 = greedy
    top_k: Array  # int32; 0 = off
    top_p: Array  # float32; 1 = off
    min_p: Array  # float32; 0 = off
    presence: Array  # float32
    frequency: Array  # float32
    repetition: Array  # float32; 1 = off
    seed: Array  # uint32
    choice: Array  # int32: index among a request's n samples (separates their streams)
    top_logprobs: Array  # int32: how many alternatives the request wants (0 = none)
    logit_bias: Array  # float32 [B, V]


class PromptScores(NamedTuple):
    """A prompt chunk scored by the model: at each position, the next prompt token's log-probability."""

    logprob: Array  # float32 [L]: log-probability of targets[t] after the tokens up to t
    top_ids: Array  # int32 [L, min(MAX_TOP_LOGPROBS, V)]
    top_logprobs: Array  # float32 [L, min(MAX_TOP_LOGPROBS, V)]


class SampleOut(NamedTuple):
    tokens: Array  # int32 [B]
    logprob: Array  # float32 [B]: raw log-probability of the chosen token
    top_ids: Array  # int32 [B, min(MAX_TOP_LOGPROBS, V)]
    top_logprobs: Array  # float32 [B, min(MAX_TOP_LOGPROBS, V)]
    prompt: PromptScores | None = None  # a scoring prefill's (prompt logprobs)


def host_row(
    vocab_size: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    min_p: float,
    presence: float,
    frequency: float,
    repetition: float,
    seed: int,
    choice: int,
    top_logprobs: int,
    logit_bias: dict[int, float],
) -> SlotSampling:
    """One slot's parameters as numpy scalars (and a dense bias row) ready to insert."""
    bias = np.zeros(vocab_size, np.float32)
    for token, value in logit_bias.items():
        bias[int(token)] = value
    return SlotSampling(
        np.float32(temperature), np.int32(top_k), np.float32(top_p), np.float32(min_p),
        np.float32(presence), np.float32(frequency), np.float32(repetition),
        np.uint32(seed % 2**32), np.int32(choice), np.int32(top_logprobs), bias,
    )


def empty_rows(batch: int, vocab_size: int) -> SlotSampling:
    """Neutral parameters for ``batch`` idle slots (greedy, no penalties)."""
    f = lambda v: host_arrays.full((batch,), v, np.float32)  # noqa: E731
    i = lambda v: host_arrays.full((batch,), v, np.int32)  # noqa: E731
    return SlotSampling(
        f(0.0), i(0), f(1.0), f(0.0), f(0.0), f(0.0), f(1.0),
        host_arrays.zeros((batch,), np.uint32), i(0), i(0), host_arrays.zeros((batch, vocab_size), np.float32),
    )


def penalized_logits(logits: Array, sp: SlotSampling, counts: Array, seen: Array) -> Array:
    """Apply repetition, presence and frequency penalties and logit_bias to ``[B, V]`` logits."""
    rep = sp.repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    counts = counts.astype(jnp.float32)
    logits = logits - sp.presence[:, None] * (counts > 0) - sp.frequency[:, None] * counts
    return logits + sp.logit_bias


def mask_words(vocab_size: int) -> int:
    """int32 words per slot in a token bitmask (llguidance's layout: bit ``t % 32`` of word ``t // 32``)."""
    return (vocab_size + 31) // 32


def all_allowed(batch: int, vocab_size: int) -> np.ndarray:
    """The bitmask of ``batch`` unconstrained slots: every bit set."""
    return np.full((batch, mask_words(vocab_size)), -1, np.int32)


def apply_mask(logits: Array, mask: Array) -> Array:
    """``logits [B, V]`` with the tokens whose bit is clear in ``mask [B, ceil(V/32)]`` at -inf."""
    bits = (mask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1
    allowed = bits.reshape(mask.shape[0], -1)[:, : logits.shape[-1]] != 0
    return jnp.where(allowed, logits, -jnp.inf)


def _ranked_threshold(ordered: Array, sp: SlotSampling) -> Array:
    """The top_k/top_p/min_p threshold from a row's largest logits in descending order,
    exact when its top_k is at most ``ordered``'s width (top_p and min_p act within top_k)."""
    rank = jnp.arange(ordered.shape[-1])[None, :]
    in_top_k = (sp.top_k[:, None] <= 0) | (rank < sp.top_k[:, None])
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = in_top_k & (before < sp.top_p[:, None]) & (probs >= sp.min_p[:, None] * probs[:, :1])
    count = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    return jnp.take_along_axis(ordered, (count - 1)[:, None], axis=-1)


def _sortable(x: Array) -> Array:
    """float32 -> uint32 keys in the same order (so a bisection over keys is exact)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _unsortable(key: Array) -> Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisect(keys: Array, satisfied: Callable[[Array], Array], lowest: bool) -> Array:
    """Per row, the lowest (or highest) uint32 key in the row's range where ``satisfied(t [B])``
    holds, for a predicate monotone in ``t``: 32 halvings of a 32-bit range."""
    lo, hi = keys.min(-1), keys.max(-1)

    def halve(_: int, bounds: tuple[Array, Array]) -> tuple[Array, Array]:
        lo, hi = bounds
        gap = hi - lo
        mid = lo + gap // 2 + (0 if lowest else gap % 2)
        ok = satisfied(mid)
        if lowest:
            return jnp.where(ok, lo, jnp.minimum(mid + 1, hi)), jnp.where(ok, mid, hi)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, jnp.maximum(mid, lo + 1) - 1)

    lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return hi if lowest else lo


def _unbounded(rows: int) -> Array:
    """A threshold ``[rows, 1]`` that keeps every token."""
    return jnp.full((rows, 1), -jnp.inf, jnp.float32)


def _full_threshold(scaled: Array, sp: SlotSampling, width: int) -> Array:
    """The threshold over the whole vocabulary, by bisection instead of a sort: the
    top_k-th largest logit (for a top_k above ``width``), then the lowest logit whose
    higher-ranked mass within top_k stays below top_p, and min_p's bound. Each bisection
    runs only when some slot needs it. (``tools/bench_sampling.py``, 32 slots with top_p
    0.9: 23 ms a call, 575 ms with the sort.)"""
    rows = scaled.shape[0]
    keys = _sortable(scaled)
    k = sp.top_k

    def kth_largest() -> Array:
        kth = _bisect(keys, lambda t: jnp.sum(keys >= t[:, None], -1) >= k, lowest=False)
        return jnp.where(k[:, None] > 0, _unsortable(kth)[:, None], -jnp.inf)

    by_k = jax.lax.cond(jnp.any(k > width), kth_largest, lambda: _unbounded(rows))
    top = jnp.max(scaled, axis=-1, keepdims=True)

    def nucleus() -> Array:
        weights = jnp.where(scaled >= by_k, jnp.exp(scaled - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
        mass = sp.top_p * weights.sum(-1)
        least = _bisect(keys, lambda t: jnp.sum(jnp.where(keys > t[:, None], weights, 0.0), -1) < mass, lowest=True)
        return jnp.where(sp.top_p[:, None] < 1, _unsortable(least)[:, None], -jnp.inf)

    by_p = jax.lax.cond(jnp.any(sp.top_p < 1), nucleus, lambda: _unbounded(rows))
    by_min_p = jnp.where(sp.min_p[:, None] > 0, top + jnp.log(jnp.maximum(sp.min_p[:, None], 1e-30)), -jnp.inf)
    return jnp.maximum(jnp.maximum(by_k, by_p), by_min_p)


def keep_threshold(scaled: Array, sp: SlotSampling) -> Array:
    """Per slot, the smallest (temperature-scaled) logit that top_k/top_p/min_p keep.

    The kept set of each filter is a prefix of the descending order, so their
    intersection is too, and a threshold on the logit describes it. A slot whose top_k is
    at most ``CANDIDATES`` (the usual 20-50) needs only its ``lax.top_k`` candidates;
    the others (top_p or min_p alone, or a larger top_k) bisect over the vocabulary.
    """
    rows, width = scaled.shape[0], min(CANDIDATES, scaled.shape[-1])
    few = (sp.top_k > 0) & (sp.top_k <= width)
    filtering = (sp.top_k > 0) | (sp.top_p < 1) | (sp.min_p > 0)
    within = jax.lax.cond(jnp.any(few), lambda: _ranked_threshold(jax.lax.top_k(scaled, width)[0], sp),
                          lambda: _unbounded(rows))
    wide = jax.lax.cond(jnp.any(filtering & ~few), lambda: _full_threshold(scaled, sp, width), lambda: _unbounded(rows))
    return jnp.where(few[:, None], within, wide)


def _uniform(sp: SlotSampling, step: Array) -> Array:
    """One U[0, 1) per slot, from that slot's key alone."""
    def one(seed: Array, choice: Array, step: Array) -> Array:
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), choice), step)
        return jax.random.uniform(key, (), jnp.float32)

    return jax.vmap(one)(sp.seed, sp.choice, step)


def _last_positive(x: Array) -> Array:
    """Per row of ``x [B, N]``, the index of its last positive entry (0 if none)."""
    return jnp.max(jnp.where(x > 0, jnp.arange(x.shape[-1]), 0), axis=-1)


def inverse_cdf(weights: Array, u: Array) -> Array:
    """Per row of ``weights [B, V]`` (>= 0, some positive), the index where the running sum
    first passes ``u [B]`` times the row's total: a draw from the weights' distribution.

    Found block by block (sums of ``_BLOCK`` tokens, then one block), since XLA CPU's
    cumulative sum over a whole vocabulary is much slower than a plain sum. Never lands
    on a zero weight, whatever the rounding.
    """
    batch, vocab = weights.shape
    blocks = -(-vocab // _BLOCK)
    grid = jnp.pad(weights, ((0, 0), (0, blocks * _BLOCK - vocab))).reshape(batch, blocks, _BLOCK)
    sums = grid.sum(-1)
    running = jnp.cumsum(sums, -1)
    target = u * running[:, -1]
    block = jnp.minimum(jnp.sum(running <= target[:, None], -1), _last_positive(sums))
    at = lambda x: jnp.take_along_axis(x, block[:, None], axis=-1)[:, 0]  # noqa: E731
    inside = target - (at(running) - at(sums))
    row = jnp.take_along_axis(grid, block[:, None, None], axis=1)[:, 0]
    index = jnp.minimum(jnp.sum(jnp.cumsum(row, -1) <= inside[:, None], -1), _last_positive(row))
    return block * _BLOCK + index


def _draw(logits: Array, sp: SlotSampling, step: Array) -> Array:
    """Random tokens for slots with temperature > 0, greedy for the others.

    Inverse-CDF sampling with one uniform per slot costs a few reductions over the
    vocabulary; Gumbel-max drew a noise value per token (``tools/bench_sampling.py``, 32
    slots at temperature 0.8: 7.6 ms a call, 54 ms with Gumbel-max).
    """
    temperature = jnp.where(sp.temperature > 0, sp.temperature, 1.0)[:, None]
    scaled = logits / temperature
    filtering = (sp.temperature > 0) & ((sp.top_k > 0) | (sp.top_p < 1) | (sp.min_p > 0))
    threshold = jax.lax.cond(jnp.any(filtering), lambda: keep_threshold(scaled, sp), lambda: _unbounded(logits.shape[0]))
    # A slot without filters keeps every token whichever branch ran, so its draw never
    # depends on its neighbours' parameters.
    threshold = jnp.where(filtering[:, None], threshold, -jnp.inf)
    top = jnp.max(scaled, axis=-1, keepdims=True)
    weights = jnp.where(scaled >= threshold, jnp.exp(scaled - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
    sampled = inverse_cdf(weights, _uniform(sp, step))
    return jnp.where(sp.temperature > 0, sampled, jnp.argmax(logits, axis=-1))


def score_tokens(logits: Array, targets: Array) -> PromptScores:
    """Raw log-probabilities of ``targets [L]`` under ``logits [L, V]``, with the top alternatives."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    chosen = jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
    return PromptScores(chosen, top_ids.astype(jnp.int32), top_lp)


def sample(
    logits: Array, sp: SlotSampling, counts: Array, seen: Array, step: Array, mask: Array | None = None
) -> SampleOut:
    """Sample one token per slot from float32 ``logits [B, V]``, only among ``mask``'s allowed tokens."""
    processed = penalized_logits(logits, sp, counts, seen)
    if mask is not None:
        processed = apply_mask(processed, mask)
    tokens = jax.lax.cond(
        jnp.any(sp.temperature > 0),
        lambda: _draw(processed, sp, step),
        lambda: jnp.argmax(processed, axis=-1),
    ).astype(jnp.int32)
    normalizer = jax.nn.logsumexp(logits, axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0] - normalizer
    shape = (logits.shape[0], min(MAX_TOP_LOGPROBS, logits.shape[-1]))
    top_lp, top_ids = jax.lax.cond(
        jnp.any(sp.top_logprobs > 0),
        lambda: tuple(jax.lax.top_k(logits - normalizer[:, None], shape[1])),
        lambda: (jnp.zeros(shape, jnp.float32), jnp.zeros(shape, jnp.int32)),
    )
    return SampleOut(tokens, chosen, top_ids.astype(jnp.int32), top_lp)
