"""The engine's request and event types: the contract between the engine and its callers."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Literal

_ids = itertools.count()


@dataclass(frozen=True)
class Grammar:
    """A constraint on the output, enforced token by token (llguidance).

    ``kind``: ``json_schema`` (``value`` a schema, as a dict or JSON text), ``regex``, or
    ``lark`` (llguidance's Lark dialect, which embeds schemas with ``%json``). ``param``
    is the request field it came from, named in errors; ``lenient`` ignores schema
    keywords the compiler does not implement (OpenAI's ``strict: false``).
    """

    kind: Literal["json_schema", "regex", "lark"]
    value: Any
    param: str = "grammar"
    lenient: bool = False


@dataclass
class SamplingParams:
    """Per-request sampling, from OpenAI's and mistral.rs's request fields.

    ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` disable those
    filters. All of these become arrays in the jitted step, never static arguments.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None  # None: up to the context limit
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0  # 0..20
    grammar: Grammar | None = None  # constrained decoding; ends the sequence when complete
    prompt_logprobs: int | None = None  # score the prompt tokens too, with this many alternatives (0..20)


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")
    # A vision model's images as its processor left them (float32 [N, C, S, S]); the prompt
    # holds each image's placeholder tokens (VisionSpec.tokens_per_image of them) in order.
    pixel_values: Any = None


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float | None  # None for a prompt's first token (nothing predicts it)
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (id, text, logprob)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV cache came from the prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class TokenDelta:
    """New text for choice ``index`` (one token or several: a decode call's for it); ``text``
    never ends inside a UTF-8 character."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # with the first token, if the request asked for them


@dataclass
class Finish:
    """The last event of choice ``index``. ``reason``: stop, length, cancelled or error."""

    index: int
    reason: str
    usage: Usage
    error: Exception | None = None  # set when reason == "error"


Event = TokenDelta | Finish
