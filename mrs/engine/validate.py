"""Request checks done at submit, before anything is queued: each error names its field."""

from __future__ import annotations

from mrs.engine.bounds import SAMPLING
from mrs.engine.types import GenerationRequest
from mrs.errors import ContextLengthExceeded, InvalidRequest


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        raise InvalidRequest(f"{param}: {message}", param=param)


def _bounded(name: str, value: object, integer: bool = False) -> None:
    bound = SAMPLING[name]
    _check(bound.holds(value) and (not integer or isinstance(value, int)), name,
           bound.describe() + (" (an integer)" if integer else ""))


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
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        _bounded(name, getattr(sp, name))
    _bounded("top_k", sp.top_k, integer=True)
    _bounded("top_logprobs", sp.top_logprobs, integer=True)
    for token, bias in sp.logit_bias.items():
        _check(
            isinstance(token, int) and 0 <= token < vocab_size, "logit_bias",
            f"token id {token!r} is not in [0, {vocab_size})",
        )
        _check(SAMPLING["logit_bias"].holds(bias), "logit_bias",
               f"bias {bias!r} for token {token} {SAMPLING['logit_bias'].describe()}")
    if sp.seed is not None:
        _bounded("seed", sp.seed, integer=True)
    _bounded("n", sp.n, integer=True)
    _check(sp.n <= max_batch, "n", f"must be in [1, {max_batch}] (the engine's max_batch)")
    if sp.prompt_logprobs is not None:
        _bounded("prompt_logprobs", sp.prompt_logprobs, integer=True)
    _check(all(isinstance(s, str) and s for s in sp.stop), "stop", "stop strings must be non-empty strings")
    _check(
        all(isinstance(t, int) and 0 <= t < vocab_size for t in sp.stop_token_ids),
        "stop_token_ids", f"token ids must be integers in [0, {vocab_size})",
    )
    if sp.max_tokens is not None:
        _bounded("max_tokens", sp.max_tokens, integer=True)
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
