"""Tool calling without a model: the grammars llguidance compiles from tools (checked by
feeding it token sequences), the reply parser (whole and streamed in every split), and
the prompt for templates with and without tool support."""

from __future__ import annotations

import json

import llguidance
import llguidance.hf
import pytest
from tiny_llama import EOS, VOCAB, byte_tokenizer

from mrs.engine.grammar import grammar_text
from mrs.errors import InvalidRequest
from mrs.loading.chat_template import render_chat
from mrs.tools import ToolCallParser, parse_reply, parse_tools, prompt_messages, tool_grammar

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME_CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def accepts(tokenizer, tool_choice, text: str, parallel: bool = True) -> bool:
    tools, choice = parse_tools([WEATHER, TIME], tool_choice)
    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=VOCAB, eos_token=[EOS])
    matcher = llguidance.LLMatcher(lltok, grammar_text(tool_grammar(tools, choice, parallel)), log_level=0)
    return matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and matcher.is_accepting()


def test_grammars_by_tool_choice(tokenizer) -> None:
    assert accepts(tokenizer, "required", CALL) and accepts(tokenizer, "required", f"{CALL}\n{TIME_CALL}")
    assert not accepts(tokenizer, "required", f"{CALL}\n{TIME_CALL}", parallel=False)
    assert not accepts(tokenizer, "required", "Sunny in Paris.")
    assert not accepts(tokenizer, "required", CALL.replace('"Paris"', "3"))  # arguments follow the schema
    named = {"type": "function", "function": {"name": "get_time"}}
    assert accepts(tokenizer, named, TIME_CALL) and not accepts(tokenizer, named, CALL)
    assert accepts(tokenizer, "auto", CALL) and accepts(tokenizer, "auto", "Sunny in Paris.")
    assert not accepts(tokenizer, "auto", "<tool_call>\nnot json")  # a started block must be a call
    assert tool_grammar(*parse_tools([WEATHER], "none")) is None


def test_tool_fields_checked(tokenizer) -> None:
    for tools, choice, param in [([], "auto", "tool_choice"), ([WEATHER, WEATHER], None, "tools"),
                                 ([WEATHER], {"type": "function", "function": {"name": "x"}}, "tool_choice"),
                                 ([{"type": "function"}], None, "tools"), ([WEATHER], "sometimes", "tool_choice"),
                                 ([{"type": "function", "function": {"name": "f", "strict": 0.0}}], None, "tools")]:
        with pytest.raises(InvalidRequest) as err:
            parse_tools(tools, choice)
        assert err.value.param == param, (tools, choice, err.value.message)


def test_reply_parser_whole_and_streamed_in_every_split() -> None:
    reply = f"{CALL}\n{TIME_CALL}"
    content, calls = parse_reply(reply)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    for cut in range(1, len(reply)):
        parser = ToolCallParser()
        pieces = [parser.feed(reply[:cut]), parser.feed(reply[cut:])]
        assert "".join(p[0] for p in pieces) + parser.finish() == ""
        assert [c.name for p in pieces for c in p[1]] == ["get_weather", "get_time"]
    assert parse_reply("It is <b>sunny</b>.") == ("It is <b>sunny</b>.", [])
    broken = "<tool_call>\n{\"name\": \"get_weather\", \"argu"  # cut by max_tokens: stays text
    assert parse_reply(broken) == (broken, [])


HISTORY = [
    {"role": "user", "content": "Weather in Paris and Rome?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    {"role": "tool", "tool_call_id": "c2", "content": "rain"},
]
PLAIN = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
# A template that reads tools and tool calls itself (the shape HF tool-calling templates have).
NATIVE = ("{% if tools %}TOOLS:{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
          "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
          "{% for c in m.get('tool_calls', []) %}CALL {{ c['function']['name'] }} {{ c['function']['arguments']['city'] }}"
          "{% endfor %}{% if m['role'] == 'tool' %} for {{ m['tool_call_id'] }}{% endif %}\n{% endfor %}")


def test_default_tool_prompt_round_trips_calls_and_results(tokenizer) -> None:
    tools, _ = parse_tools([WEATHER], None)
    messages, template_tools = prompt_messages(HISTORY, tools, PLAIN)
    assert template_tools is None
    text = render_chat(PLAIN, messages, tokenizer, model_id="t")
    first = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert text.startswith("<|system|>You can call functions.") and '"name": "get_weather"' in text.split("<|user|>")[0]
    assert f"<|assistant|>{first}\n{first.replace('Paris', 'Rome')}\n" in text
    assert text.endswith("<|user|><tool_response>\nsunny\n</tool_response>\n<tool_response>\nrain\n</tool_response>\n"
                         "<|assistant|>")
    assert parse_reply(messages[2]["content"])[1][1].arguments == '{"city": "Rome"}'  # what the model wrote, parsed back


def test_templates_that_read_tools_get_them_natively(tokenizer) -> None:
    tools, _ = parse_tools([WEATHER, TIME], None)
    messages, template_tools = prompt_messages(HISTORY, tools, NATIVE)
    text = render_chat(NATIVE, messages, tokenizer, model_id="t", tools=template_tools, add_generation_prompt=False)
    # (HF's jinja environment trims the newline after a block tag)
    assert text == ("TOOLS:get_weather;get_time;<|user|>Weather in Paris and Rome?"
                    "<|assistant|>CALL get_weather ParisCALL get_weather Rome"  # arguments as objects
                    "<|tool|>sunny for c1<|tool|>rain for c2")
