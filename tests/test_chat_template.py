"""Chat templates: parity with ``apply_chat_template`` and the precedence of template sources."""

from __future__ import annotations

from pathlib import Path

import pytest

from mrs.config.schema import ModelEntry
from mrs.errors import ConfigError, InvalidRequest, NoChatTemplate
from mrs.loading.chat_template import render_chat, select_chat_template
from mrs.loading.gguf_reader import open_gguf

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hello!"}],
    [
        {"role": "user", "content": "Write a haiku about code."},
        {"role": "assistant", "content": "Functions call themselves\nrecursion deep as the sea\nstack overflow waits"},
        {"role": "user", "content": "Now one about tea 🍵, with “quotes” and\ttabs."},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "{\"a\": 1}"},
        {"role": "assistant", "content": "{\"b\": 2}"},
        {"role": "user", "content": ""},
    ],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, hf_smollm2_gguf_tokenizer):
    return open_gguf(smollm2_gguf).get("tokenizer.chat_template"), hf_smollm2_gguf_tokenizer


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_smollm2_template_matches_apply_chat_template(smollm2, generation_prompt: bool) -> None:
    template, reference = smollm2
    assert template == reference.chat_template
    for messages in CONVERSATIONS:
        ours = render_chat(template, messages, reference, model_id="smollm2", add_generation_prompt=generation_prompt)
        expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        assert ours == expected


def test_special_tokens_and_exceptions_reach_the_template(smollm2) -> None:
    _, tokenizer = smollm2
    template = "{{ bos_token }}{% if messages|length > 1 %}{{ raise_exception('one message only') }}{% endif %}" \
               "{{ messages[0]['content'] | tojson }}{{ eos_token }}"
    assert render_chat(template, [{"role": "user", "content": "hi"}], tokenizer, model_id="m") \
        == f'{tokenizer.bos_token}"hi"{tokenizer.eos_token}'
    with pytest.raises(InvalidRequest, match="rejected the messages: one message only"):
        render_chat(template, CONVERSATIONS[1], tokenizer, model_id="m")


def test_no_template_is_a_clear_error(smollm2) -> None:
    _, tokenizer = smollm2
    with pytest.raises(NoChatTemplate, match="model 'gemma' has no chat template"):
        render_chat(None, CONVERSATIONS[0], tokenizer, model_id="gemma")


def test_precedence(tmp_path: Path) -> None:
    explicit, field_file = tmp_path / "explicit.jinja", tmp_path / "field.jinja"
    explicit.write_text("EXPLICIT")
    field_file.write_text("FIELD FILE {{ messages }}")
    literal = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def pick(**fields) -> str | None:
        return select_chat_template(ModelEntry(model_id="m", **fields), "CHECKPOINT").template

    assert pick(jinja_explicit=str(explicit), chat_template=literal) == "EXPLICIT"
    assert pick(chat_template=str(field_file)) == "FIELD FILE {{ messages }}"
    assert pick(chat_template=literal) == literal
    assert pick() == "CHECKPOINT"
    assert select_chat_template(ModelEntry(model_id="m"), None).template is None


def test_bad_template_fields(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="chat_template 'nope.jinja' is neither an existing file nor a jinja"):
        select_chat_template(ModelEntry(model_id="m", chat_template="nope.jinja"), None)
    with pytest.raises(ConfigError, match="cannot read jinja_explicit file"):
        select_chat_template(ModelEntry(model_id="m", jinja_explicit=str(tmp_path / "missing.jinja")), None)
