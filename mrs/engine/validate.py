"""Request checks done at submit, before anything is queued: each error names its field."""

from __future__ import annotations

import math

from mrs.engine.sampling import MAX_TOP_LOGPROBS
from mrs.engine.types import GenerationRequest
from mrs.errors import ContextLengthExceeded, InvalidRequest


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param}: {message}", param=param)


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def validate_request(
    request: GenerationRequest, *, vocab_size: int, context_limit: int, max_batch: int
) -> int:
    """Raise ``InvalidRequest``/``ContextLengthExceeded`` or return the effective max_tokens."""
    ids, sp = request.prompt_ids, request.sampling
    _check(len(ids) > 0, "prompt", "the prompt is empty")
    _check(
        all(isinstance(t, int) and 0 <= t < vocab_size for t in ids),
        "prompt", f"token ids must be integers in [0, {vocab_size})",
    )
    _check(_finite(sp.temperature) and 0 <= sp.temperature <= 100, "temperature", "must be in [0, 100]")
    _check(isinstance(sp.top_k, int) and sp.top_k >= -1, "top_k", "must be an integer >= 0 (-1 or 0: off)")
    _check(_finite(sp.top_p) and 0 < sp.top_p <= 1, "top_p", "must be in (0, 1]")
    _check(_finite(sp.min_p) and 0 <= sp.min_p <= 1, "min_p", "must be in [0, 1]")
    _check(_finite(sp.presence_penalty) and -2 <= sp.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]")
    _check(_finite(sp.frequency_penalty) and -2 <= sp.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]")
    _check(_finite(sp.repetition_penalty) and sp.repetition_penalty > 0, "repetition_penalty", "must be > 0")
    for token, bias in sp.logit_bias.items():
        _check(
            isinstance(token, int) and 0 <= token < vocab_size, "logit_bias",
            f"token id {token!r} is not in [0, {vocab_size})",
        )
        _check(_finite(bias) and -100 <= bias <= 100, "logit_bias", f"bias {bias!r} for token {token} is not in [-100, 100]")
    _check(sp.seed is None or isinstance(sp.seed, int), "seed", "must be an integer")
    _check(isinstance(sp.n, int) and 1 <= sp.n <= max_batch, "n", f"must be in [1, {max_batch}] (the engine's max_batch)")
    _check(
        isinstance(sp.top_logprobs, int) and 0 <= sp.top_logprobs <= MAX_TOP_LOGPROBS,
        "top_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]",
    )
    _check(
        sp.prompt_logprobs is None or (isinstance(sp.prompt_logprobs, int) and 0 <= sp.prompt_logprobs <= MAX_TOP_LOGPROBS),
        "prompt_logprobs", f"must be in [0, {MAX_TOP_LOGPROBS}]",
    )
    _check(all(isinstance(s, str) and s for s in sp.stop), "stop", "stop strings must be non-empty strings")
    _check(
        all(isinstance(t, int) and 0 <= t < vocab_size for t in sp.stop_token_ids),
        "stop_token_ids", f"token ids must be integers in [0, {vocab_size})",
    )
    if sp.max_tokens is not None:
        _check(isinstance(sp.max_tokens, int) and sp.max_tokens >= 1, "max_tokens", "must be an integer >= 1")
        if len(ids) + sp.max_tokens > context_limit:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {context_limit} tokens, but the prompt has "
                f"{len(ids)} tokens and max_tokens is {sp.max_tokens} ({len(ids) + sp.max_tokens} in total)",
                param="max_tokens",
            )
        return sp.max_tokens
    if len(ids) >= context_limit:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {context_limit} tokens, but the prompt has "
            f"{len(ids)} tokens, which leaves no room to generate",
            param="prompt",
        )
    return context_limit - len(ids)
