"""Constrained decoding in the engine (llguidance masks in the jitted steps), on the tiny
random Llama with its byte tokenizer: whatever the random model prefers, the output
follows the grammar; unconstrained neighbours are untouched; nothing recompiles."""

from __future__ import annotations

import dataclasses
import json
import re

import jsonschema
import pytest
from test_engine_tiny import CONFIG, prompt, run, run_many
from tiny_llama import tiny_llama

from mrs.config.schema import EngineConfig, ModelEntry
from mrs.engine.engine import Engine
from mrs.engine.types import Finish, GenerationRequest, Grammar, SamplingParams, TokenDelta
from mrs.errors import InvalidRequest
from mrs.pipeline import Pipeline

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99},
        "kind": {"enum": ["cat", "dog"]},
        "tag": {"type": "string", "pattern": "^[a-z]{1,4}$"},
        "ok": {"type": "boolean"},
    },
    "required": ["id", "kind", "tag"],
    "additionalProperties": False,
}
REGEX = r"(yes|no)-[0-9]{3}"


@pytest.fixture(scope="module")
def engine():
    engine = Engine(tiny_llama()[0], CONFIG).start()
    engine.wait_compiled(600)  # the tests count compiles
    yield engine
    engine.shutdown()


def text_of(deltas) -> str:
    return "".join(d.text for d in deltas)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_validates(engine, temperature: float) -> None:
    grammar = Grammar("json_schema", SCHEMA)
    _, deltas, finish = run(engine, prompt(9, seed=1), temperature=temperature, seed=3, max_tokens=80, grammar=grammar)
    assert finish.reason == "stop"  # the grammar completed (the object closed), not max_tokens
    jsonschema.validate(json.loads(text_of(deltas)), SCHEMA)


def test_regex_holds_and_ends_the_sequence(engine) -> None:
    tokens, deltas, finish = run(engine, prompt(7, seed=2), temperature=0.0, max_tokens=40, ignore_eos=True,
                                 grammar=Grammar("regex", REGEX))
    assert re.fullmatch(REGEX, text_of(deltas)), text_of(deltas)
    assert finish.reason == "stop" and len(tokens) == len(text_of(deltas))  # nothing after the match


def test_lark_grammar_and_n_choices(engine) -> None:
    lark = 'start: "(" item ("," item)* ")"\nitem: /[a-c]/ | start'
    events = list(engine.submit(GenerationRequest(prompt(5, seed=4), SamplingParams(
        n=3, temperature=1.0, seed=5, max_tokens=60, grammar=Grammar("lark", lark)))))
    texts = ["".join(e.text for e in events if isinstance(e, TokenDelta) and e.index == i) for i in range(3)]
    finishes = {e.index: e.reason for e in events if isinstance(e, Finish)}
    balanced = re.compile(r"\((?:[a-c]|\(.*\))(?:,(?:[a-c]|\(.*\)))*\)")
    for i, text in enumerate(texts):
        if finishes[i] == "stop":
            assert balanced.fullmatch(text) and text.count("(") == text.count(")"), text
        else:  # a random model may nest until max_tokens: then it is a prefix of the language
            assert finishes[i] == "length" and set(text) <= set("(),abc") and text.startswith("(")


def test_constrained_and_unconstrained_share_a_batch(engine) -> None:
    plain = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = [run(engine, prompt(n, seed=n), **plain)[0] for n in (6, 11)]
    grammar = Grammar("json_schema", SCHEMA)
    requests = [
        GenerationRequest(prompt(6, seed=6), SamplingParams(**plain)),
        GenerationRequest(prompt(9, seed=1), SamplingParams(temperature=0.0, max_tokens=80, grammar=grammar)),
        GenerationRequest(prompt(11, seed=11), SamplingParams(**plain)),
        GenerationRequest(prompt(7, seed=2), SamplingParams(temperature=0.0, max_tokens=40, grammar=Grammar("regex", REGEX))),
    ]
    results = run_many(engine, requests)
    assert [results[0], results[2]] == alone  # greedy parity for the unconstrained neighbours
    tok = engine.tokenizer
    jsonschema.validate(json.loads(tok.decode(results[1], skip_special_tokens=True)), SCHEMA)
    assert re.fullmatch(REGEX, tok.decode(results[3], skip_special_tokens=True))
    # and the constrained ones equal their runs alone
    assert tok.decode(results[1], skip_special_tokens=True) == text_of(
        run(engine, prompt(9, seed=1), temperature=0.0, max_tokens=80, grammar=grammar)[1])


def test_bad_grammars_are_invalid_requests_naming_the_field(engine) -> None:
    cases = [
        Grammar("json_schema", {"type": "bogus"}, param="response_format"),
        Grammar("regex", "a(b"),
        Grammar("lark", "start: undefined_rule"),
        Grammar("json_schema", {"type": "string", "format": "no-such-format"}, param="response_format"),
        Grammar("regex", "[^\\s\\S]"),  # matches nothing
    ]
    for grammar in cases:
        with pytest.raises(InvalidRequest) as err:
            engine.submit(GenerationRequest(prompt(5), SamplingParams(grammar=grammar)))
        assert err.value.param == grammar.param and err.value.message.startswith(grammar.param + ":"), err.value.message
    assert engine.stats()["queue_depth"] == 0
    # strict: false (lenient) ignores the keyword llguidance does not implement
    lenient = Grammar("json_schema", {"type": "string", "format": "no-such-format", "maxLength": 3}, lenient=True)
    _, deltas, finish = run(engine, prompt(5), temperature=0.0, max_tokens=10, grammar=lenient)
    assert isinstance(json.loads(text_of(deltas)), str) and finish.reason == "stop"


def test_no_recompile_with_constraints(engine) -> None:
    run(engine, prompt(5), temperature=0.0, max_tokens=3)  # warm
    before = dict(engine._steps.traces)
    requests = [GenerationRequest(prompt(n, seed=n), SamplingParams(
        temperature=0.7, seed=n, max_tokens=30, grammar=Grammar("regex", REGEX) if n % 2 else None)) for n in (4, 17, 65, 9)]
    run_many(engine, requests)
    assert dict(engine._steps.traces) == before
    assert engine.stats()["grammar_host_s"] > 0


PLAIN_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                  "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TOOL = {"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["id"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def pipe():
    """The tiny model as a Pipeline with a chat template, and room for the tool prompt in bytes."""
    checkpoint = dataclasses.replace(tiny_llama()[0], chat_template=PLAIN_TEMPLATE)
    engine = Engine(checkpoint, EngineConfig(max_batch=2, max_seq_len=512, prefill_buckets=[512], warmup=False))
    yield Pipeline(ModelEntry(model_id="tiny"), checkpoint, engine.start())
    engine.shutdown()


def test_python_api_takes_the_http_fields(pipe: Pipeline) -> None:
    said = pipe.generate("Say:", grammar={"type": "regex", "value": REGEX}, max_tokens=20)
    assert re.fullmatch(REGEX, said.text) and said.finish_reason == "stop"
    messages = [{"role": "user", "content": "Give me a record."}]
    record = pipe.chat(messages, max_tokens=80, temperature=0.7, seed=2, response_format={
        "type": "json_schema", "json_schema": {"name": "record", "schema": SCHEMA, "strict": True}})
    jsonschema.validate(json.loads(record.text), SCHEMA)
    called = pipe.chat(messages, tools=[TOOL], tool_choice="required", parallel_tool_calls=False, max_tokens=70)
    [call] = called.tool_calls
    assert called.finish_reason == "tool_calls" and called.text == "" and call.name == "lookup"
    jsonschema.validate(json.loads(call.arguments), TOOL["function"]["parameters"])
    for kwargs, param in [({"tool_choice": "auto"}, "tool_choice"), ({"response_format": {"type": "xml"}}, "response_format"),
                          ({"grammar": {"type": "regex", "value": "("}}, "grammar")]:
        with pytest.raises(InvalidRequest) as err:
            pipe.chat(messages, **kwargs)
        assert err.value.param == param
    assert re.fullmatch(REGEX, "".join(pipe.stream("Say:", grammar={"type": "regex", "value": REGEX}, max_tokens=20)))
    scored = pipe.generate("Say:", max_tokens=2, prompt_logprobs=1)
    assert [t.token_id for t in scored.prompt_logprobs] == scored.prompt_ids and scored.prompt_logprobs[0].logprob is None
