"""Response shapes for the published OpenAPI schema (``/openapi.json``).

The handlers build plain dicts in OpenAI's shapes (serving.protocol, serving.completions);
these models only document them, and the fuzz test (tests/test_fuzz.py) checks every
real response against them. Objects allow extra keys, as OpenAI's own responses grow.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from quart_schema import document_response
from quart_schema.openapi import OpenAPIProvider


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorBody(_Open):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(_Open):
    """OpenAI's error envelope, for every status >= 400."""

    error: ErrorBody


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    status: str


class ModelDeleted(_Open):
    id: str
    object: Literal["model"]
    deleted: bool


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelCard]


class PromptTokensDetails(_Open):
    cached_tokens: int  # prompt tokens whose KV cache was reused (the prefix cache)


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None  # {"id", "type": "function", "function": {"name", "arguments"}}


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str


class ChatCompletion(_Open):
    """The non-streaming reply; with ``stream: true`` the body is SSE ``chat.completion.chunk`` events."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str


class Completion(_Open):
    """The non-streaming reply; with ``stream: true`` the body is SSE ``text_completion`` events."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TokenizeResponse(_Open):
    model: str
    tokens: list[int]
    count: int
    max_model_len: int
    token_strs: list[str] | None = None  # with return_token_strs


class DetokenizeResponse(_Open):
    model: str
    prompt: str


class Health(_Open):
    status: Literal["ok", "loading"]
    models: dict[str, str]


class ModelStatus(_Open):
    model_id: str
    status: str
    error: str | None = None
    memory: dict[str, int] | None = None


ERROR_STATUSES = (400, 401, 403, 404, 413, 429, 500, 503, 504)


def documented(model: type[BaseModel], status: int = 200, errors: tuple[int, ...] = ERROR_STATUSES):
    """Document ``model`` for ``status`` and the error envelope for ``errors``."""

    def decorator(func):
        for code in errors:
            func = document_response(ErrorResponse, code)(func)
        return document_response(model, status)(func)

    return decorator


STREAMING_PATHS = ("/v1/chat/completions", "/v1/completions")


class OpenAPIWithStreams(OpenAPIProvider):
    """quart-schema's schema plus the SSE body that ``stream: true`` gets: a ``text/event-stream``
    of ``data:`` lines (the chunks as JSON, then ``[DONE]``), which quart-schema cannot express."""

    def schema(self) -> dict[str, Any]:
        doc = super().schema()
        for path in STREAMING_PATHS:
            ok = doc["paths"][path]["post"]["responses"][200]  # still int keys here; JSON makes them strings
            # OpenAPI before 3.2: the schema describes one event
            ok["content"]["text/event-stream"] = {"schema": {
                "type": "object", "required": ["data"],
                "properties": {"data": {"type": "string", "description": "a JSON chunk, an error envelope, or [DONE]"}},
            }}
            ok["description"] = "JSON, or with stream: true server-sent events"
        return doc
