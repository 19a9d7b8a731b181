"""On-device sampling (mrs.engine.sampling) against distributions computed in numpy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrs.engine.sampling import SlotSampling, all_allowed, empty_rows, host_row, keep_threshold, mask_words, sample

V = 12
N = 4096  # draws per distribution; every test uses batch N or 8 so only two shapes compile
sample_jit = jax.jit(sample)


def rows(batch: int, **overrides) -> SlotSampling:
    """``batch`` identical slots with the given parameters."""
    defaults = dict(
        temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence=0.0, frequency=0.0,
        repetition=1.0, seed=7, choice=0, top_logprobs=0, logit_bias={},
    )
    defaults.update(overrides)
    row = host_row(V, **defaults)
    return SlotSampling(*(np.broadcast_to(np.asarray(x), (batch,) + np.shape(x)).copy() for x in row))


def draw(logits: np.ndarray, sp: SlotSampling, n: int, counts=None, seen=None) -> np.ndarray:
    """``n`` independent draws: one slot per draw, each at its own PRNG step."""
    batch_logits = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, V))
    counts = jnp.zeros((n, V), jnp.int32) if counts is None else counts
    seen = jnp.zeros((n, V), bool) if seen is None else seen
    return np.asarray(sample_jit(batch_logits, sp, counts, seen, jnp.arange(n, dtype=jnp.int32)).tokens)


def chi_square_ok(tokens: np.ndarray, probs: np.ndarray) -> None:
    """Pearson chi-square against ``probs``; the bound is far past the 99.9% quantile."""
    n = len(tokens)
    observed = np.bincount(tokens, minlength=V)
    assert observed[probs == 0].sum() == 0, f"sampled excluded tokens: {observed}"
    support = probs > 0
    expected = probs[support] * n
    stat = float(((observed[support] - expected) ** 2 / expected).sum())
    dof = int(support.sum()) - 1
    assert stat < dof + 6 * np.sqrt(2 * dof) + 10, f"chi2={stat:.1f} dof={dof} obs={observed} exp={expected}"


LOGITS = np.log(np.array([30, 20, 15, 10, 8, 6, 4, 3, 2, 1, 0.6, 0.4], np.float64))


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.6])
def test_temperature_frequencies_match_softmax(temperature: float) -> None:
    tokens = draw(LOGITS, rows(N, temperature=temperature), N)
    chi_square_ok(tokens, softmax(LOGITS / temperature))


def test_top_p_frequencies_match_nucleus() -> None:
    probs = softmax(LOGITS)
    # cumulative before each token: 0, .30, .50, .65, .75, ... so top_p=0.7 keeps the first four
    keep = (np.cumsum(probs) - probs) < 0.7
    expected = np.where(keep, probs, 0) / probs[keep].sum()
    chi_square_ok(draw(LOGITS, rows(N, top_p=0.7), N), expected)


def test_top_k_and_min_p_frequencies() -> None:
    probs = softmax(LOGITS)
    top3 = np.where(np.arange(V) < 3, probs, 0) / probs[:3].sum()
    chi_square_ok(draw(LOGITS, rows(N, top_k=3), N), top3)
    keep = probs >= 0.25 * probs[0]
    chi_square_ok(draw(LOGITS, rows(N, min_p=0.25), N), np.where(keep, probs, 0) / probs[keep].sum())


def test_top_k_one_and_temperature_zero_are_greedy() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(N, V)).astype(np.float32)
    zeros = jnp.zeros((N, V), jnp.int32)
    seen = jnp.zeros((N, V), bool)
    step = jnp.arange(N, dtype=jnp.int32)
    greedy = sample_jit(logits, rows(N, temperature=0.0), zeros, seen, step).tokens
    top1 = sample_jit(logits, rows(N, temperature=1.3, top_k=1), zeros, seen, step).tokens
    np.testing.assert_array_equal(np.asarray(greedy), logits.argmax(-1))
    np.testing.assert_array_equal(np.asarray(top1), logits.argmax(-1))


def test_penalties_and_bias_match_reference_formula() -> None:
    logits = np.array([[2.0, -1.0, 0.5, 3.0] + [-5.0] * (V - 4)], np.float32)
    counts = np.zeros((1, V), np.int32)
    counts[0, 3] = 2  # token 3 generated twice
    seen = np.zeros((1, V), bool)
    seen[0, [0, 1, 3]] = True  # token 0 and 1 in the prompt
    sp = rows(8, temperature=0.0, repetition=1.5, presence=0.4, frequency=0.3, logit_bias={2: 0.2})
    # reference: repetition divides positive / multiplies negative seen logits, then
    # presence + frequency * count on output tokens, then the bias
    ref = logits[0].copy()
    ref[[0, 3]] /= 1.5
    ref[1] *= 1.5
    ref[3] -= 0.4 + 0.3 * 2
    ref[2] += 0.2
    out = sample_jit(np.repeat(logits, 8, 0), sp, jnp.asarray(np.repeat(counts, 8, 0)),
                     jnp.asarray(np.repeat(seen, 8, 0)), jnp.zeros(8, jnp.int32))
    # unpenalized, token 3 wins; penalized, 3 drops to 1.0 and token 0 (1.33) wins
    assert logits[0].argmax() == 3 and ref.argmax() == 0
    assert int(out.tokens[0]) == 0
    sampled = draw(logits[0], rows(N, repetition=1.5, presence=0.4, frequency=0.3, logit_bias={2: 0.2}),
                   N, jnp.broadcast_to(counts, (N, V)), jnp.broadcast_to(seen, (N, V)))
    chi_square_ok(sampled, softmax(ref.astype(np.float64)))


def test_seeded_draws_do_not_depend_on_the_batch() -> None:
    rng = np.random.default_rng(1)
    target = rng.normal(size=V).astype(np.float32)
    batch = 8
    # slot 5 (seed 1234, step 0) next to idle greedy slots, then among strangers
    idle = rows(batch, temperature=0.0)
    idle = idle._replace(**{f: getattr(idle, f).copy() for f in ("seed", "temperature", "top_p")})
    idle.seed[5], idle.temperature[5], idle.top_p[5] = 1234, 1.0, 0.9
    zeros = jnp.zeros((batch, V), jnp.int32), jnp.zeros((batch, V), bool), jnp.zeros(batch, jnp.int32)
    alone = int(sample_jit(np.broadcast_to(target, (batch, V)), idle, *zeros).tokens[5])
    logits = rng.normal(size=(batch, V)).astype(np.float32)
    logits[5] = target
    sp = rows(batch, seed=99, temperature=0.5, top_k=4)
    sp = sp._replace(
        seed=sp.seed.copy(), temperature=sp.temperature.copy(), top_k=sp.top_k.copy(), top_p=sp.top_p.copy()
    )
    sp.seed[5], sp.temperature[5], sp.top_k[5], sp.top_p[5] = 1234, 1.0, 0, 0.9
    assert int(sample_jit(logits, sp, *zeros).tokens[5]) == alone


def test_logprobs_are_log_softmax_of_raw_logits() -> None:
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, V)).astype(np.float32) * 3
    sp = empty_rows(8, V)._replace(top_logprobs=jnp.full((8,), 5, jnp.int32))
    out = sample_jit(logits, sp, jnp.zeros((8, V), jnp.int32), jnp.zeros((8, V), bool), jnp.zeros(8, jnp.int32))
    ref = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(out.logprob), ref[np.arange(8), logits.argmax(-1)], atol=1e-5)
    order = np.argsort(-ref, axis=-1)
    np.testing.assert_array_equal(np.asarray(out.top_ids), order)
    np.testing.assert_allclose(np.asarray(out.top_logprobs), np.take_along_axis(ref, order, -1), atol=1e-5)


def test_token_bitmask_renormalizes_over_allowed_tokens() -> None:
    """A grammar's mask: excluded tokens are never drawn (greedy or not), the rest keep their
    relative odds, logprobs stay the raw model's, and an all-ones row changes nothing."""
    allowed = np.array([2, 5, 7, 11])  # not the most likely token (0)
    row = np.zeros(mask_words(V), np.int32)
    for t in allowed:
        row[t // 32] |= np.int32(1 << (t % 32))
    masked = jax.jit(lambda logits, sp, counts, seen, step, mask: sample(logits, sp, counts, seen, step, mask))
    batch_logits = jnp.broadcast_to(jnp.asarray(LOGITS, jnp.float32), (N, V))
    zeros = jnp.zeros((N, V), jnp.int32), jnp.zeros((N, V), bool), jnp.arange(N, dtype=jnp.int32)
    out = masked(batch_logits, rows(N), *zeros, np.broadcast_to(row, (N, row.size)))
    probs = np.zeros(V)
    probs[allowed] = softmax(LOGITS[allowed])
    chi_square_ok(np.asarray(out.tokens), probs)
    np.testing.assert_allclose(np.asarray(out.logprob), np.log(softmax(LOGITS))[np.asarray(out.tokens)], rtol=1e-5)
    greedy = masked(batch_logits, rows(N, temperature=0.0), *zeros, np.broadcast_to(row, (N, row.size)))
    assert set(np.asarray(greedy.tokens).tolist()) == {2}
    everything = masked(batch_logits, rows(N), *zeros, all_allowed(N, V))
    unmasked = sample_jit(batch_logits, rows(N), *zeros)
    np.testing.assert_array_equal(np.asarray(everything.tokens), np.asarray(unmasked.tokens))


def test_keep_threshold_matches_a_sorted_reference() -> None:
    """The candidate path (top_k <= CANDIDATES) and the bisection path (top_p or min_p
    alone, a larger top_k) give the threshold a full sort gives, over a wider vocabulary."""
    vocab, batch = 3000, 8
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(batch, vocab)) * rng.uniform(0.5, 4, size=(batch, 1))).astype(np.float32)
    top_k = np.array([0, 0, 5, 40, 200, 0, 1500, 64], np.int32)
    top_p = np.array([0.9, 1.0, 0.8, 0.95, 0.5, 0.3, 1.0, 1.0], np.float32)
    min_p = np.array([0.0, 0.05, 0.0, 0.1, 0.0, 0.2, 0.01, 0.0], np.float32)
    sp = empty_rows(batch, vocab)._replace(top_k=jnp.asarray(top_k), top_p=jnp.asarray(top_p), min_p=jnp.asarray(min_p))
    got = np.asarray(jax.jit(keep_threshold)(jnp.asarray(logits), sp))[:, 0]
    for b in range(batch):
        ordered = np.sort(logits[b].astype(np.float64))[::-1]
        k = top_k[b] if top_k[b] > 0 else vocab
        probs = np.exp(ordered[:k] - ordered[0])
        probs /= probs.sum()
        keep = ((np.cumsum(probs) - probs) < top_p[b]) & (probs >= min_p[b] * probs[0])
        expected = ordered[max(int(keep.sum()), 1) - 1]
        kept_got, kept_expected = int((logits[b] >= got[b]).sum()), int((logits[b] >= expected).sum())
        assert kept_got == kept_expected, f"row {b}: kept {kept_got}, expected {kept_expected}"
