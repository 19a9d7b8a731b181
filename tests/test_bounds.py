"""One table of sampling bounds (mrs.engine.bounds) behind every door: the HTTP protocol
models and the engine's submit check (which the Python API goes through) accept and
refuse exactly the same values, naming the same field."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from mrs.engine.bounds import SAMPLING, SEED_MAX, SEED_MIN
from mrs.engine.types import GenerationRequest, SamplingParams
from mrs.engine.validate import validate_request
from mrs.errors import InvalidRequest
from serving.protocol import ChatCompletionRequest, CompletionRequest

# (field, a value just inside, a value just outside); logprobs pairs top_logprobs with logprobs
EDGES = [
    ("temperature", 2.0, 2.01), ("temperature", 0.0, -0.01),
    ("top_p", 1.0, 1.01), ("top_p", 1e-6, 0.0),
    ("top_k", -1, -2), ("min_p", 1.0, 1.5), ("min_p", 0.0, -0.1),
    ("presence_penalty", -2.0, -2.1), ("frequency_penalty", 2.0, 2.1),
    ("repetition_penalty", 0.01, 0.0), ("repetition_penalty", 100.0, 100.5), ("top_logprobs", 20, 21), ("max_tokens", 1, 0),
    ("seed", SEED_MAX, SEED_MAX + 1), ("seed", SEED_MIN, SEED_MIN - 1), ("n", 1, 0),
    ("temperature", 1.0, float("nan")), ("temperature", 1.0, float("inf")),
]


def _chat(field: str, value: object) -> ChatCompletionRequest:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **{field: value}, **extra)


def _engine(field: str, value: object) -> None:
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    request = GenerationRequest([1, 2, 3], SamplingParams(**{field: value}, **extra))
    validate_request(request, vocab_size=100, context_limit=64, max_batch=4)


@pytest.mark.parametrize(("field", "inside", "outside"), EDGES)
def test_every_door_draws_the_same_line(field: str, inside: object, outside: object) -> None:
    _chat(field, inside)
    _engine(field, inside)
    with pytest.raises(ValidationError) as protocol_error:
        _chat(field, outside)
    assert protocol_error.value.errors()[0]["loc"] == (field,)
    with pytest.raises(InvalidRequest) as engine_error:
        _engine(field, outside)
    assert engine_error.value.param == field
    assert SAMPLING[field].describe() in engine_error.value.message


def test_logit_bias_values_and_completions_logprobs_use_the_table() -> None:
    ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logit_bias={5: -100})
    with pytest.raises(ValidationError, match="logit_bias"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logit_bias={5: 100.5})
    with pytest.raises(InvalidRequest) as err:
        validate_request(GenerationRequest([1], SamplingParams(logit_bias={5: 100.5})),
                         vocab_size=100, context_limit=64, max_batch=4)
    assert err.value.param == "logit_bias"
    CompletionRequest(prompt="x", logprobs=20)
    with pytest.raises(ValidationError):
        CompletionRequest(prompt="x", logprobs=21)
