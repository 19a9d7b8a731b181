"""Quality of a quantized model against its float original: teacher-forced top-1 agreement,
perplexity, and the mean KL divergence of its next-token distributions from the original's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mrs.models.config import ModelConfig
from mrs.models.kv_cache import init_cache


@dataclass(frozen=True)
class TeacherForced:
    top1: np.ndarray  # [N] the model's argmax after each prefix
    nll: np.ndarray  # [N] negative log-likelihood of the actual next token
    logprobs: np.ndarray  # [N, vocab] float32 next-token log-probabilities

    @property
    def perplexity(self) -> float:
        return float(np.exp(self.nll.mean()))

    def agreement(self, other: "TeacherForced") -> float:
        """Fraction of positions where both models predict the same next token."""
        return float(np.mean(self.top1 == other.top1))

    def kl_from(self, reference: "TeacherForced") -> float:
        """Mean KL(reference || self) in nats: far less noisy than agreement over a few hundred tokens."""
        p = np.exp(reference.logprobs)
        return float(np.mean(np.sum(p * (reference.logprobs - self.logprobs), axis=-1)))


def teacher_forced(model: Any, params: Any, config: ModelConfig, tokens: list[int]) -> TeacherForced:
    """Run ``tokens`` through the model in one pass; score each next-token prediction."""
    ids = jnp.asarray([tokens[:-1]], jnp.int32)
    targets = jnp.asarray(tokens[1:], jnp.int32)
    positions = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]

    @jax.jit
    def score(params: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
        cache = init_cache(config, 1, ids.shape[1])
        logits, _ = model.apply({"params": params}, ids, positions, cache)
        logprobs = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logprobs, targets[:, None], axis=-1)[:, 0]
        return jnp.argmax(logits[0], axis=-1), nll, logprobs

    top1, nll, logprobs = score(params)
    return TeacherForced(np.asarray(top1), np.asarray(nll), np.asarray(logprobs))
