"""GPT-2 family (issue 6): checkpoint layouts, the DialoGPT-medium shape, the fallback chat
template, the context limit and in-situ quantization, against HF transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_checkpoints import (
    PROMPTS,
    dialogpt_medium_shaped,
    hf_generate,
    hf_model,
    jitted_apply,
    mrs_generate,
    save_checkpoint,
)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from mrs.config.schema import ModelEntry, ModelSource
from mrs.loading.load import load_checkpoint
from mrs.loading.safetensors_reader import load_plain
from mrs.models.gpt2 import FALLBACK_CHAT_TEMPLATE
from mrs.models.kv_cache import init_cache
from mrs.quant import QArray


def entry(path, **fields) -> ModelEntry:
    return ModelEntry(model_id="gpt2", model=ModelSource(model_id=str(path)), **fields)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    model = hf_model("gpt2")
    return model, save_checkpoint(model, tmp_path_factory.mktemp("gpt2"))


def test_unprefixed_names_with_mask_buffers(tiny, tmp_path):
    """The original gpt2 hub layout: no ``transformer.`` prefix, causal-mask buffers stored."""
    model, path = tiny
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(path / "model.safetensors").items()}
    positions = model.config.n_positions
    for layer in range(model.config.n_layer):
        tensors[f"h.{layer}.attn.bias"] = torch.tril(torch.ones(positions, positions)).view(1, 1, positions, positions)
        tensors[f"h.{layer}.attn.masked_bias"] = torch.tensor(-1e4)
    assert not any(k.startswith("transformer.") for k in tensors)
    plain = save_checkpoint(model, tmp_path / "unprefixed")
    save_file(tensors, plain / "model.safetensors", metadata={"format": "pt"})
    reference = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    checkpoint = load_plain(entry(plain))
    ids = checkpoint.tokenizer(PROMPTS[1])["input_ids"]
    ours_logits, ours = mrs_generate(checkpoint.config, checkpoint.params, ids, 32)
    ref_logits, ref = hf_generate(reference, ids, 32)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=2e-5, rtol=1e-5)
    assert ours == ref


def test_dialogpt_medium_shape(tmp_path):
    model = dialogpt_medium_shaped()
    checkpoint = load_plain(entry(save_checkpoint(model, tmp_path / "DialoGPT-medium")))
    config = checkpoint.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.max_position_embeddings,
            config.vocab_size) == (24, 1024, 16, 1024, 50257)
    assert checkpoint.eos_token_ids == (50256,)
    ids = checkpoint.tokenizer("Hello, how are you?")["input_ids"]
    ours_logits, ours = mrs_generate(config, checkpoint.params, ids, 4, cache_len=32, decode_width=16)
    ref_logits, ref = hf_generate(model, ids, 4)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=1e-4, rtol=1e-5)
    assert ours == ref


def test_fallback_chat_template(tiny, tmp_path):
    _, path = tiny
    checkpoint = load_checkpoint(entry(path))
    assert checkpoint.chat_template == FALLBACK_CHAT_TEMPLATE
    assert any("fallback chat template in use" in note for note in checkpoint.notes)
    messages = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "How are you?"}]
    text = checkpoint.tokenizer.apply_chat_template(messages, chat_template=checkpoint.chat_template,
                                                     tokenize=False, add_generation_prompt=True)
    assert text == "Hi there<|endoftext|>Hello<|endoftext|>How are you?<|endoftext|>"


def test_configured_or_own_template_wins_over_fallback(tiny, tmp_path):
    model, path = tiny
    configured = load_checkpoint(entry(path, chat_template="{{ messages[0]['content'] }}"))
    assert configured.chat_template == "{{ messages[0]['content'] }}"
    assert not any("fallback" in note for note in configured.notes)
    own = save_checkpoint(model, tmp_path / "own")
    (own / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    checkpoint = load_plain(entry(own))
    assert checkpoint.chat_template.startswith("{% for m in messages %}[")
    assert checkpoint.notes == []


def test_positions_past_n_positions_do_not_wrap(tiny):
    """The last position works; one past n_positions yields NaN, never wpe[0] or wpe[-1]."""
    _, path = tiny
    checkpoint = load_plain(entry(path))
    config = checkpoint.config
    apply = jitted_apply(config)  # the decode step's shapes: compiled already by the tests above
    cache = init_cache(config, 1, 64)
    tokens = np.array([[5]], np.int32)
    last, _ = apply({"params": checkpoint.params}, tokens, np.array([[config.max_position_embeddings - 1]], np.int32), cache)
    beyond, _ = apply({"params": checkpoint.params}, tokens, np.array([[config.max_position_embeddings]], np.int32), cache)
    assert np.isfinite(np.asarray(last)).all()
    assert np.isnan(np.asarray(beyond)).all()


def test_in_situ_quantization(tiny):
    model, path = tiny
    checkpoint = load_checkpoint(entry(path, in_situ_quant="Q8_0"))
    block = checkpoint.params["transformer"]["h_0"]
    assert isinstance(block["attn"]["c_attn"]["weight"], QArray)
    assert isinstance(block["mlp"]["c_fc"]["weight"], QArray)
    assert not isinstance(checkpoint.params["transformer"]["wpe"]["weight"], QArray)
    ids = checkpoint.tokenizer(PROMPTS[0])["input_ids"]
    ours, _ = mrs_generate(checkpoint.config, checkpoint.params, ids, 1)
    ref, _ = hf_generate(model, ids, 1)
    assert np.corrcoef(ours.ravel(), ref.ravel())[0, 1] > 0.999
