"""Structured outputs and tool calling end to end: a real ``mrs-server`` with SmolLM2 (GGUF),
driven by the official ``openai`` client. The 135M model does not know the schemas; the
grammar engine makes its output valid anyway, and these tests check it with ``jsonschema``.

One module-scoped server serves every test here (the small engine shape, so the
compilation cache from the other server tests applies).
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest
from server_process import BIN, SMALL_ENGINE, Server, jax_cache_env, start

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY_ANSWER = "The capital of France is Paris."  # test_server's reference (HF transformers' greedy answer)

NAME = {"type": "string", "minLength": 1, "maxLength": 12}
SCHEMAS: list[dict] = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]}}, "required": ["answer"],
     "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                               "minItems": 1, "maxItems": 3}},
     "required": ["tags"], "additionalProperties": False},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "number", "minimum": -10, "maximum": 10}, "y": {"type": "number", "minimum": -10, "maximum": 10}},
        "required": ["x", "y"], "additionalProperties": False}}, "required": ["point"], "additionalProperties": False},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}},
     "required": ["code"], "additionalProperties": False},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 10}},
     "required": ["ok", "note"], "additionalProperties": False},
    {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 9}, "minItems": 2, "maxItems": 4},
    {"type": "object", "properties": {"score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.01}},
     "required": ["score"], "additionalProperties": False},
    {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "name": NAME, "address": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                                  "required": ["zip"], "additionalProperties": False}},
        "required": ["name", "address"], "additionalProperties": False}}, "required": ["user"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"const": "red"}, "shade": {"enum": [1, 2, 3]}},
     "required": ["color", "shade"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99}, "label": NAME},
        "required": ["id", "label"], "additionalProperties": False}}}, "required": ["items"], "additionalProperties": False},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                                          {"type": "string", "maxLength": 5}]}},
     "required": ["value"], "additionalProperties": False},
    {"type": "object", "properties": {"first": NAME, "middle": NAME, "last": NAME}, "required": ["first", "last"],
     "additionalProperties": False},
    {"type": "string", "enum": ["north", "south", "east", "west"]},
    {"type": "object", "$defs": {"pair": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 5},
                                          "minItems": 2, "maxItems": 2}},
     "properties": {"a": {"$ref": "#/$defs/pair"}, "b": {"$ref": "#/$defs/pair"}}, "required": ["a", "b"],
     "additionalProperties": False},
    {"type": "integer", "minimum": 10, "maximum": 20},
]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "Local time in a city.",
    "parameters": {"type": "object", "properties": {"city": NAME}, "required": ["city"], "additionalProperties": False}}}
WEATHER_Q = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Server:
    log = tmp_path_factory.mktemp("structured") / "server.log"
    srv = start([str(BIN / "mrs-server"), *SMALL_ENGINE, "gguf", "-m", str(smollm2_gguf.parent), "-f", smollm2_gguf.name],
                log, jax_cache_env())
    srv.wait_ready()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", _strict_response_validation=True,
                         max_retries=0, timeout=300)


def async_client(server: Server) -> openai.AsyncOpenAI:
    """One per asyncio.run: its connections belong to that event loop."""
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", _strict_response_validation=True,
                              max_retries=0, timeout=600)


def schema_format(schema: dict, name: str = "answer") -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def test_every_schema_validates_greedy_and_sampled(server: Server) -> None:
    aclient = async_client(server)

    async def one(i: int, schema: dict, sampled: bool):
        r = await aclient.chat.completions.create(
            model="default", max_tokens=96, response_format=schema_format(schema, f"s{i}"),
            messages=[{"role": "user", "content": "Reply in JSON."}],
            **({"temperature": 1.0, "seed": i} if sampled else {"temperature": 0}))
        return r.choices[0]

    async def every():
        return await asyncio.gather(*(one(i, s, sampled) for sampled in (False, True) for i, s in enumerate(SCHEMAS)))

    choices = asyncio.run(every())
    unfinished = [(k, c.message.content) for k, c in enumerate(choices) if c.finish_reason != "stop"]
    assert not unfinished, unfinished
    for k, choice in enumerate(choices):
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[k % len(SCHEMAS)])


def test_json_object_parses(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Describe Paris in JSON."}],
                                       max_tokens=64, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still a prefix of an object
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    text = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0,
                                          response_format={"type": "text"})
    assert text.choices[0].message.content == GREEDY_ANSWER


def test_regex_and_lark_grammars_hold(client: openai.OpenAI) -> None:
    regex = r"Paris|London|[A-Z][a-z]{2,8}"
    r = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0,
                                       extra_body={"grammar": {"type": "regex", "value": regex}})
    assert re.fullmatch(regex, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    lark = 'start: "The answer is " ANSWER "."\nANSWER: "yes" | "no"'
    r = client.completions.create(model="default", prompt="Is Paris in France?", max_tokens=12, temperature=0.8, seed=3,
                                  extra_body={"grammar": {"type": "lark", "value": lark}})
    assert r.choices[0].text in ("The answer is yes.", "The answer is no.")
    r = client.completions.create(model="default", prompt="Numbers:", max_tokens=24, temperature=0,
                                  extra_body={"grammar": {"type": "json_schema", "value": SCHEMAS[7]}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[7])


def test_constrained_and_unconstrained_in_one_batch(server: Server) -> None:
    aclient = async_client(server)

    async def plain():
        r = await aclient.chat.completions.create(model="default", messages=QUESTION, max_tokens=12, temperature=0)
        return r.choices[0].message.content

    async def constrained(i: int):
        r = await aclient.chat.completions.create(model="default", messages=QUESTION, max_tokens=64, temperature=0,
                                                  response_format=schema_format(SCHEMAS[i]))
        return json.loads(r.choices[0].message.content)

    async def mixed():
        return await asyncio.gather(plain(), constrained(0), plain(), constrained(9))

    first, obj0, second, obj9 = asyncio.run(mixed())
    assert first == second == GREEDY_ANSWER
    jsonschema.validate(obj0, SCHEMAS[0])
    jsonschema.validate(obj9, SCHEMAS[9])


def test_bad_schemas_and_grammars_are_400_naming_the_field(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    cases = [
        ({"response_format": schema_format({"type": "bogus"})}, "response_format", "bogus"),
        ({"response_format": schema_format({"type": "string", "format": "no-such-format"})}, "response_format", "format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"grammar": {"type": "regex", "value": "a(b"}}, "grammar", "unclosed group"),
        ({"grammar": {"type": "lark", "value": "start: nothing_here"}}, "grammar", "nothing_here"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]}, "tools", "bogus"),
        # found by tools/fuzz.py: a number where a boolean belongs was read as false
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": 0.0}}]}, "tools", "boolean"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "n", "strict": "yes"}}}, "response_format",
         "boolean"),
    ]
    for extra, param, word in cases:
        reply = httpx.post(url, timeout=60, json={"model": "default", "messages": QUESTION, **extra})
        assert reply.status_code == 400, (extra, reply.text)
        error = reply.json()["error"]
        assert error["param"].startswith(param) and word in error["message"], (extra, error)


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    country: str = pydantic.Field(max_length=12)
    population_millions: float = pydantic.Field(ge=0, le=40)


def test_openai_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    r = client.chat.completions.parse(model="default", messages=[{"role": "user", "content": "Tell me about Paris."}],
                                      response_format=City, max_tokens=64, temperature=0)
    city = r.choices[0].message.parsed
    assert isinstance(city, City) and city.name


def check_call(call, tool: dict) -> dict:
    assert call.type == "function" and call.id and call.function.name == tool["function"]["name"]
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, tool["function"]["parameters"])
    return arguments


def test_required_and_named_tool_choice_give_calls(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="default", messages=WEATHER_Q, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=64, temperature=0)
    choice = r.choices[0]
    # parallel calls: the greedy 135M model may repeat its call until max_tokens ("length")
    assert choice.finish_reason in ("tool_calls", "length") and choice.message.tool_calls
    for call in choice.message.tool_calls:
        check_call(call, WEATHER if call.function.name == "get_weather" else TIME)
    named = client.chat.completions.create(
        model="default", messages=WEATHER_Q, tools=[WEATHER, TIME], parallel_tool_calls=False, max_tokens=64,
        tool_choice={"type": "function", "function": {"name": "get_time"}}, temperature=0.9, seed=7)
    [call] = named.choices[0].message.tool_calls
    check_call(call, TIME)
    assert named.choices[0].finish_reason == "tool_calls" and named.choices[0].message.content is None


def test_auto_reply_is_text_or_parsed_calls(client: openai.OpenAI) -> None:
    """The 135M model's choice is not tested, only that either branch comes back well-formed."""
    for seed in range(3):
        r = client.chat.completions.create(model="default", messages=WEATHER_Q, tools=[WEATHER], max_tokens=48,
                                           temperature=1.0, seed=seed)
        message = r.choices[0].message
        if message.tool_calls:
            assert r.choices[0].finish_reason == "tool_calls"
            for call in message.tool_calls:
                check_call(call, WEATHER)
        else:
            assert message.content and not message.content.startswith("<")
    none = client.chat.completions.create(model="default", messages=QUESTION, tools=[WEATHER], tool_choice="none",
                                          max_tokens=12, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason in ("stop", "length")


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="default", messages=WEATHER_Q, tools=[WEATHER], tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=64, temperature=0, stream=True)
    calls: dict[int, dict] = {}
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            reasons.append(choice.finish_reason)
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": delta.id, "name": "", "arguments": ""})
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert reasons[-1] == "tool_calls" and calls
    for call in calls.values():
        assert call["id"] and call["name"] == "get_weather"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER["function"]["parameters"])


def test_two_turn_tool_conversation(client: openai.OpenAI, server: Server) -> None:
    """An agent loop: the model calls the tool, we answer it, the model replies in text;
    the second turn's prompt carries the call and the result in the default tool format."""
    first = client.chat.completions.create(model="default", messages=WEATHER_Q, tools=[WEATHER], tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=64, temperature=0)
    assert first.choices[0].finish_reason == "tool_calls"
    [call] = first.choices[0].message.tool_calls
    arguments = check_call(call, WEATHER)
    history = [*WEATHER_Q, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "22 degrees, sunny"}]
    second = client.chat.completions.create(model="default", messages=history, tools=[WEATHER], tool_choice="none",
                                            max_tokens=16, temperature=0)
    assert second.choices[0].message.content and second.choices[0].message.tool_calls is None
    rendered = httpx.post(f"{server.url}/tokenize", json={"model": "default", "messages": history, "tools": [WEATHER],
                                                          "return_token_strs": True}).json()
    text = httpx.post(f"{server.url}/detokenize", json={"model": "default", "tokens": rendered["tokens"]}).json()["prompt"]
    block = ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": '
             f'{json.dumps(arguments)}}}\n</tool_call><|im_end|>\n'
             '<|im_start|>user\n<tool_response>\n22 degrees, sunny\n</tool_response><|im_end|>\n<|im_start|>assistant\n')
    assert text.endswith(block), text
    assert '"name": "get_weather"' in text.split("<|im_start|>user")[0]  # the tools in the system prompt


def test_openai_fields_honoured_or_refused_by_name(server: Server) -> None:
    chat, text = f"{server.url}/v1/chat/completions", f"{server.url}/v1/completions"
    base_chat = {"model": "default", "messages": QUESTION, "max_tokens": 2}
    base_text = {"model": "default", "prompt": "Hello", "max_tokens": 2}
    refused = [
        (chat, {"modalities": ["text", "audio"]}, "modalities"), (chat, {"audio": {"voice": "alloy"}}, "audio"),
        (chat, {"store": True}, "store"), (chat, {"prediction": {"type": "content", "content": "x"}}, "prediction"),
        (chat, {"reasoning_effort": "high"}, "reasoning_effort"), (chat, {"service_tier": "priority"}, "service_tier"),
        (chat, {"functions": [{"name": "f"}]}, "functions"), (chat, {"web_search_options": {}}, "web_search_options"),
        (chat, {"prompt_cache_key": "k"}, "prompt_cache_key"), (chat, {"verbosity": "low"}, "verbosity"),
        (chat, {"stream_options": {"include_usage": True}}, "stream_options"),
        (chat, {"seed": 2**64}, "seed"), (chat, {"frobnicate": 1}, "frobnicate"),
        (text, {"suffix": " world"}, "suffix"), (text, {"best_of": 3}, "best_of"),
        (text, {"seed": -(2**63) - 1}, "seed"),
    ]
    for url, extra, param in refused:
        reply = httpx.post(url, timeout=60, json={**(base_chat if url == chat else base_text), **extra})
        assert reply.status_code == 400, (extra, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"] == param, (extra, error)
    honoured = [
        (chat, {"store": False, "modalities": ["text"], "service_tier": "auto", "metadata": {"k": "v"}, "user": "u",
                "safety_identifier": "s", "seed": 2**63 - 1}),
        (text, {"suffix": "", "best_of": 2, "n": 2, "user": "u", "seed": -(2**63)}),
    ]
    for url, extra in honoured:
        reply = httpx.post(url, timeout=60, json={**(base_chat if url == chat else base_text), **extra})
        assert reply.status_code == 200, (extra, reply.text)


def test_list_of_prompts_gets_a_choice_set_each(client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "One, two, three,"]
    alone = [client.completions.create(model="default", prompt=p, max_tokens=6, temperature=0).choices[0].text
             for p in prompts]
    both = client.completions.create(model="default", prompt=prompts, max_tokens=6, temperature=0, n=2)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]
    assert [c.text for c in both.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert both.usage.completion_tokens == 4 * 6
    ids = client.completions.create(model="default", prompt=[[1, 2, 3], [4, 5]], max_tokens=1, temperature=0)
    assert len(ids.choices) == 2 and ids.usage.prompt_tokens == 5
    loose = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=300)
    streamed = {0: "", 1: ""}
    for chunk in loose.completions.create(model="default", prompt=prompts, max_tokens=6, temperature=0, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.text
    assert list(streamed.values()) == alone


def test_logprobs_zero_returns_the_sampled_tokens_logprob(client: openai.OpenAI) -> None:
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert "".join(lp.tokens) == r.choices[0].text


def test_tokenize_template_switches_and_token_strings(server: Server) -> None:
    def render(**body) -> tuple[str, dict]:
        reply = httpx.post(f"{server.url}/tokenize", json={"model": "default", **body}).json()
        text = httpx.post(f"{server.url}/detokenize", json={"model": "default", "tokens": reply["tokens"]}).json()
        return text["prompt"], reply

    prompted, _ = render(messages=QUESTION)
    bare, _ = render(messages=QUESTION, add_generation_prompt=False)
    assert prompted == bare + "<|im_start|>assistant\n" and bare.endswith("<|im_end|>\n")
    partial = [*QUESTION, {"role": "assistant", "content": "The capital is"}]
    continued, reply = render(messages=partial, add_generation_prompt=False, continue_final_message=True,
                              return_token_strs=True)
    assert continued.endswith("<|im_start|>assistant\nThe capital is")
    assert len(reply["token_strs"]) == reply["count"] and reply["token_strs"][-1] == "Ġis"
    both = httpx.post(f"{server.url}/tokenize", json={"model": "default", "messages": partial, "continue_final_message": True})
    assert both.status_code == 400


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI) -> None:
    prompt = "The capital of France is"
    kwargs = dict(model="default", prompt=prompt, max_tokens=3, temperature=0, logprobs=2)
    plain = client.completions.create(**kwargs)
    # The SDK types token_logprobs as floats, but OpenAI's echo answers null for the first token (as we do).
    loose = openai.OpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=300)
    r = loose.completions.create(**kwargs, echo=True)
    lp, n_prompt = r.choices[0].logprobs, r.usage.prompt_tokens
    assert r.choices[0].text == prompt + plain.choices[0].text
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(len(t) == 2 for t in lp.top_logprobs[1:])
    assert lp.tokens[n_prompt:] == plain.choices[0].logprobs.tokens  # then the generated tokens, as without echo
    # the scoring prefill computes the head for every position: float summation order differs slightly
    assert lp.token_logprobs[n_prompt:] == pytest.approx(plain.choices[0].logprobs.token_logprobs, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    chunks = list(loose.completions.create(**kwargs, echo=True, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs for t in ch.logprobs.token_logprobs]
    assert streamed == lp.token_logprobs and "".join(ch.text for c in chunks for ch in c.choices) == r.choices[0].text
