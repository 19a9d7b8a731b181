"""Every field of OpenAI's chat and completion requests (the ``openai`` SDK's typed params)
is a declared field of our request models: honoured, or refused with a 400 naming it
(tests/test_server_structured.py sends them). A field the SDK gains fails here first."""

from __future__ import annotations

from openai.types import completion_create_params
from openai.types.chat import completion_create_params as chat_create_params

from serving.protocol import ChatCompletionRequest, CompletionRequest


def openai_fields(params) -> set[str]:
    return set(params.CompletionCreateParamsBase.__annotations__) | {"stream"}


def test_every_openai_chat_field_is_declared() -> None:
    assert openai_fields(chat_create_params) - set(ChatCompletionRequest.model_fields) == set()


def test_every_openai_completion_field_is_declared() -> None:
    assert openai_fields(completion_create_params) - set(CompletionRequest.model_fields) == set()
