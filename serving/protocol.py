"""The OpenAI protocol: request models (pydantic, validated by quart-schema) and response shapes.

Requests carry OpenAI's fields plus the engine's extras (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids), as vLLM and mistral.rs accept them.
Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from mrs.engine.bounds import SAMPLING
from mrs.engine.types import SamplingParams, TokenLogprob, Usage


class _Request(BaseModel):
    # strict: a JSON value of the wrong type (`"n": true`, `"temperature": "1"`) is a 400
    # naming the field, not quietly coerced.
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: bool = False


class _Sampling(_Request):
    """Fields shared by chat and text completions."""

    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, **SAMPLING["n"].field())  # the upper end is the engine's (or the server's) limit
    max_tokens: int | None = Field(None, **SAMPLING["max_tokens"].field())
    temperature: float = Field(1.0, **SAMPLING["temperature"].field())
    top_p: float = Field(1.0, **SAMPLING["top_p"].field())
    top_k: int = Field(0, **SAMPLING["top_k"].field())
    min_p: float = Field(0.0, **SAMPLING["min_p"].field())
    presence_penalty: float = Field(0.0, **SAMPLING["presence_penalty"].field())
    frequency_penalty: float = Field(0.0, **SAMPLING["frequency_penalty"].field())
    repetition_penalty: float = Field(1.0, **SAMPLING["repetition_penalty"].field())
    logit_bias: dict[Annotated[int, Strict(False)], float] | None = None  # JSON object keys are strings
    seed: int | None = Field(None, **SAMPLING["seed"].field())
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    keep_alive: str | float | None = None  # Ollama's: the model's idle time-to-live from now on ("5m", 0, -1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[int, float] | None) -> dict[int, float] | None:
        bound = SAMPLING["logit_bias"]
        for token, bias in (value or {}).items():
            if not bound.holds(bias) or token < 0:
                raise ValueError(f"logit_bias[{token}] must be a token id >= 0 with a bias that {bound.describe()}")
        return value

    def sampling(self, logprobs: bool, top_logprobs: int, max_tokens: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias or {}),
            seed=self.seed, max_tokens=max_tokens, ignore_eos=self.ignore_eos, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), n=self.n, logprobs=logprobs,
            top_logprobs=top_logprobs,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **SAMPLING["max_tokens"].field())
    logprobs: bool = False
    top_logprobs: int | None = Field(None, **SAMPLING["top_logprobs"].field())

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def to_sampling(self) -> SamplingParams:
        return self.sampling(self.logprobs, self.top_logprobs or 0, self.max_completion_tokens or self.max_tokens)

    def template_messages(self) -> list[dict[str, str]]:
        """Messages as chat templates expect them (``developer`` is OpenAI's new ``system``)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, **SAMPLING["max_tokens"].field())  # OpenAI's default for text completions
    logprobs: int | None = Field(None, **SAMPLING["top_logprobs"].field())
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and value and isinstance(value[0], (str, list)):
            if len(value) != 1:
                raise ValueError("batched prompts are not supported; send one prompt per request")
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def single_prompt(self) -> str | list[int]:
        value = self.prompt
        if isinstance(value, list) and isinstance(value[0], (str, list)):
            return value[0]
        return value

    def to_sampling(self) -> SamplingParams:
        return self.sampling(self.logprobs is not None, self.logprobs or 0, self.max_tokens)


class ModelIdRequest(_Request):
    model_id: str


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt only: BOS where the model's raw prompts take one

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses (plain dicts in OpenAI's shapes) ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens}


def chat_logprobs(items: list[TokenLogprob]) -> list[dict[str, Any]]:
    def one(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return [
        {**one(t.token, t.logprob), "top_logprobs": [one(text, lp) for _, text, lp in t.top]}
        for t in items
    ]


def completion_logprobs(items: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """The legacy completions shape; ``offset`` is the text offset of the first token."""
    offsets = []
    for t in items:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{text: lp for _, text, lp in t.top} for t in items],
        "text_offset": offsets,
    }


def model_card(model_id: str, created: int, state: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's model object plus mrs's state fields (status, pinned, last_used, expires_at, memory)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "local", **state}
