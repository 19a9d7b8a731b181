"""The OpenAI protocol: request models (pydantic, validated by quart-schema) and response shapes.

Requests carry OpenAI's fields plus the engine's extras (top_k, min_p,
repetition_penalty, ignore_eos, stop_token_ids, grammar), as vLLM and mistral.rs accept
them. Nothing is silently ignored: every field of OpenAI's chat and completion requests
(``openai.types.chat.completion_create_params``, ``openai.types.completion_create_params``)
is either honoured or, at a value mrs cannot honour, a 400 naming it (``_refused``); and
a field OpenAI does not have either is a 400 too, as OpenAI answers one.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Callable, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, ValidationInfo, field_validator, model_validator

from mrs.engine.bounds import SAMPLING
from mrs.engine.types import Grammar, SamplingParams, TokenLogprob, Usage
from mrs.response_format import GrammarSpec, ResponseFormat, output_grammar
from mrs.tools import Tool, ToolChoice, parse_tools, reply_grammar


class _Request(BaseModel):
    # strict: a JSON value of the wrong type (`"n": true`, `"temperature": "1"`) is a 400
    # naming the field, not quietly coerced; forbid: so is a field OpenAI does not have.
    model_config = ConfigDict(extra="forbid", strict=True)


def _refused(why: str, honoured: Callable[[Any], bool] = lambda value: False) -> Any:
    """An OpenAI field mrs does not implement: null, or a value that asks for nothing
    (``honoured``), passes; anything else is a 400 naming the field and saying why."""

    def check(value: Any) -> Any:
        if value is not None and not honoured(value):
            raise ValueError(f"not supported: {why}")
        return value

    return AfterValidator(check)


class StreamOptions(_Request):
    include_usage: bool = False
    include_obfuscation: Annotated[bool | None, _refused("mrs streams carry no obfuscation padding", lambda v: not v)] = None


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
    response_format: ResponseFormat | None = None
    grammar: GrammarSpec | None = None  # mistral.rs's extension: regex, lark or json_schema

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return value

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

    def sampling(self, logprobs: bool, top_logprobs: int, max_tokens: int | None,
                 grammar: Grammar | None = None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, min_p=self.min_p,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty, logit_bias=dict(self.logit_bias or {}),
            seed=self.seed, max_tokens=max_tokens, ignore_eos=self.ignore_eos, stop=stop,
            stop_token_ids=list(self.stop_token_ids or []), n=self.n, logprobs=logprobs,
            top_logprobs=top_logprobs, grammar=grammar,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str  # data:image/...;base64,..., http(s):// or file:// (mrs.images)
    detail: Literal["auto", "low", "high"] = "auto"  # only auto is honoured: mrs.images refuses the others


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL


class FunctionCall(_Request):
    name: str
    arguments: str  # JSON text


class AssistantToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # assistant turns that called tools
    tool_call_id: str | None = None  # tool turns: the call this is the result of
    refusal: str | None = None  # an assistant turn as OpenAI returns it; not part of the prompt
    audio: Annotated[Any, _refused("audio")] = None
    function_call: Annotated[Any, _refused("function_call is deprecated; use tool_calls")] = None

    def content_value(self) -> str | list[dict[str, Any]]:
        """The text, or the list of parts when there is an image among them (``mrs.images``)."""
        if not isinstance(self.content, list):
            return self.content or ""
        if any(isinstance(part, ImagePart) for part in self.content):
            return [part.model_dump() for part in self.content]
        return "".join(part.text for part in self.content)

    def openai(self) -> dict[str, Any]:
        """The message as ``mrs.tools.prompt_messages`` takes it (``developer`` is OpenAI's new ``system``)."""
        return {
            "role": "system" if self.role == "developer" else self.role, "content": self.content_value(),
            "name": self.name,
            "tool_calls": [c.model_dump() for c in self.tool_calls] if self.tool_calls else None,
            "tool_call_id": self.tool_call_id,
        }


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **SAMPLING["max_tokens"].field())
    logprobs: bool = False
    top_logprobs: int | None = Field(None, **SAMPLING["top_logprobs"].field())
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools
    parallel_tool_calls: bool = True
    # Accepted, and without effect on the output as on OpenAI's side: identifiers for abuse
    # monitoring, and tags for stored completions (which mrs never stores).
    safety_identifier: str | None = None
    metadata: dict[str, str] | None = None
    # OpenAI features mrs does not have (see _refused)
    store: Annotated[bool | None, _refused("mrs does not store completions", lambda v: not v)] = None
    modalities: Annotated[list[str] | None, _refused("mrs generates text only", lambda v: v == ["text"])] = None
    audio: Annotated[Any, _refused("audio output")] = None
    prediction: Annotated[Any, _refused("predicted outputs")] = None
    reasoning_effort: Annotated[Any, _refused("the served models have no reasoning effort setting")] = None
    verbosity: Annotated[Any, _refused("verbosity")] = None
    web_search_options: Annotated[Any, _refused("web search")] = None
    functions: Annotated[Any, _refused("functions is deprecated; use tools")] = None
    function_call: Annotated[Any, _refused("function_call is deprecated; use tool_choice")] = None
    service_tier: Annotated[str | None, _refused("service tiers", lambda v: v in ("auto", "default"))] = None
    prompt_cache_key: Annotated[Any, _refused("mrs has no prompt cache")] = None
    prompt_cache_retention: Annotated[Any, _refused("mrs has no prompt cache")] = None
    prompt_cache_options: Annotated[Any, _refused("mrs has no prompt cache")] = None
    moderation: Annotated[Any, _refused("moderation")] = None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs: true")
        return self

    def tool_setup(self) -> tuple[list[Tool], ToolChoice | None]:
        """The tools and the effective tool_choice (``InvalidRequest`` for a choice without tools)."""
        tools, choice = parse_tools(self.tools, self.tool_choice)
        return tools, choice or ("auto" if tools else None)

    def to_sampling(self) -> SamplingParams:
        tools, choice = self.tool_setup()
        grammar = reply_grammar(tools, choice, self.parallel_tool_calls, self.response_format, self.grammar)
        return self.sampling(self.logprobs, self.top_logprobs or 0, self.max_completion_tokens or self.max_tokens, grammar)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.openai() for m in self.messages]


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, **SAMPLING["max_tokens"].field())  # OpenAI's default for text completions
    logprobs: int | None = Field(None, **SAMPLING["top_logprobs"].field())
    echo: bool = False
    suffix: Annotated[str | None, _refused("suffix (insertion) is not implemented", lambda v: v == "")] = None
    best_of: int | None = Field(None, **SAMPLING["n"].field())

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("not supported: best_of other than n (mrs returns every choice it samples)")
        return value

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        """One prompt (text or token ids), or a list of them."""
        value = self.prompt
        if isinstance(value, list) and isinstance(value[0], (str, list)):
            return list(value)
        return [value]

    def to_sampling(self) -> SamplingParams:
        params = self.sampling(self.logprobs is not None, self.logprobs or 0, self.max_tokens,
                               output_grammar(self.response_format, self.grammar))
        params.prompt_logprobs = self.logprobs if self.echo else None  # echo with logprobs scores the prompt
        return params


class ModelIdRequest(_Request):
    model_id: str


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True  # prompt only: BOS where the model's raw prompts take one
    # messages only: the chat template's switches, and the tools it renders
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[Tool] | None = None
    return_token_strs: bool = False  # also each token's string (vLLM's field)

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        if self.add_generation_prompt and self.continue_final_message and self.messages is not None:
            raise ValueError("add_generation_prompt and continue_final_message exclude each other; set one to false")
        return self


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


# ---- responses (plain dicts in OpenAI's shapes) ----

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.total_tokens, "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


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
        "top_logprobs": [None if t.logprob is None else {text: lp for _, text, lp in t.top} for t in items],
        "text_offset": offsets,
    }


def model_card(model_id: str, created: int, state: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's model object plus mrs's state fields (status, pinned, last_used, expires_at, memory,
    and once loaded the step variants compiled)."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "local", **state}
