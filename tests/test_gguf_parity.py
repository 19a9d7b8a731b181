"""End-to-end parity: GGUF demo checkpoints through ``load_checkpoint`` and ``mrs.models``
against HF transformers loading the same files (dequantized to float32).

Per prompt: logits at every prompt position within float32 tolerance, and the greedy
32-token continuation identical to HF ``generate`` (compared up to an EOS it emits).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hf_checkpoints import mrs_generate
from transformers import AutoModelForCausalLM, AutoTokenizer

from mrs.config.schema import GGUF, ModelEntry, ModelSource
from mrs.fetch import fetch_plain_copy
from mrs.loading.chat_template import render_chat
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.load import load_checkpoint
from mrs.models import registry

STEPS = 32
BUCKET = 64  # every prompt pads to this, so prefill compiles once per model
RAW_PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,"]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
]


def gguf_entry(path: Path) -> ModelEntry:
    return ModelEntry(model_id=path.stem, model=ModelSource(kind=GGUF, quantized_model_id=str(path)))


def load_pair(path: Path) -> tuple[Checkpoint, torch.nn.Module]:
    checkpoint = load_checkpoint(gguf_entry(path))
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    return checkpoint, model.eval()


def hf_greedy(model: torch.nn.Module, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """Prompt logits ``[T, V]`` and HF's own greedy ``generate`` (KV cache, stops at its EOS)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0].float().numpy()
        out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return logits, out[0, len(prompt):].tolist()


def test_config_matches_transformers(smollm2, gemma3) -> None:
    for checkpoint, hf_model in (smollm2, gemma3):
        assert checkpoint.config == registry.config_from_hf(checkpoint.config.arch, hf_model.config.to_dict())


def check_parity(checkpoint: Checkpoint, hf_model, prompt: list[int], steps: int = STEPS) -> list[int]:
    """Prompt logits close and greedy tokens identical (up to an EOS of the reference's); returns ours."""
    ours_logits, ours = mrs_generate(checkpoint.config, checkpoint.params, prompt, steps,
                                     bucket=BUCKET, cache_len=BUCKET + STEPS)
    ref_logits, ref = hf_greedy(hf_model, prompt, steps)
    np.testing.assert_allclose(ours_logits, ref_logits, atol=1e-3, rtol=0)  # measured max: 1.7e-4
    stop = next((i + 1 for i, t in enumerate(ref) if t in checkpoint.eos_token_ids), len(ref))
    assert ours[:stop] == ref[:stop]
    return ours[:stop]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, hf_smollm2_gguf_model):
    return load_checkpoint(gguf_entry(smollm2_gguf)), hf_smollm2_gguf_model


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf: Path):
    return load_pair(gemma3_gguf)


def test_smollm2_raw_prompts(smollm2, hf_smollm2_gguf_tokenizer) -> None:
    checkpoint, hf_model = smollm2
    for i, text in enumerate(RAW_PROMPTS):
        prompt = checkpoint.tokenizer(text).input_ids
        assert prompt == hf_smollm2_gguf_tokenizer(text).input_ids
        check_parity(checkpoint, hf_model, prompt, steps=STEPS if i < 2 else 1)


def test_smollm2_chat_prompts(smollm2, hf_smollm2_gguf_tokenizer) -> None:
    checkpoint, hf_model = smollm2
    hf_tok = hf_smollm2_gguf_tokenizer
    answers = []
    for messages in CHATS:
        text = render_chat(checkpoint.chat_template, messages, checkpoint.tokenizer, model_id="smollm2")
        prompt = checkpoint.tokenizer(text, add_special_tokens=False).input_ids
        reference = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert prompt == list(reference)
        answers.append(checkpoint.tokenizer.decode(check_parity(checkpoint, hf_model, prompt)))
    # HF gives the same tokens (check_parity compared each); the text ends at the end-of-turn token.
    assert answers[0] == "The capital of France is Paris.<|im_end|>"


def test_gemma3_raw_prompts(gemma3) -> None:
    """Token ids equal HF's (test_tokenizer); here, logits on three prompts and one greedy continuation."""
    checkpoint, hf_model = gemma3
    for i, text in enumerate(RAW_PROMPTS):
        prompt = checkpoint.tokenizer(text).input_ids
        assert prompt[0] == checkpoint.bos_token_id
        check_parity(checkpoint, hf_model, prompt, steps=STEPS if i == 0 else 1)


def test_plain_copy_matches_the_gguf(smollm2, hf_smollm2_gguf_tokenizer, demo_models_dir: Path) -> None:
    """transformers loads the Plain copy mrs.fetch writes, with the GGUF's logits, ids and template."""
    checkpoint, hf_gguf = smollm2
    hf_tok = hf_smollm2_gguf_tokenizer
    plain_dir = fetch_plain_copy(demo_models_dir)
    stamp = (plain_dir / "model.safetensors").stat().st_mtime_ns
    assert fetch_plain_copy(demo_models_dir) == plain_dir  # idempotent: nothing rewritten
    assert (plain_dir / "model.safetensors").stat().st_mtime_ns == stamp

    plain = AutoModelForCausalLM.from_pretrained(str(plain_dir), dtype=torch.float32).eval()
    plain_tok = AutoTokenizer.from_pretrained(str(plain_dir))
    for text in RAW_PROMPTS:
        ids = hf_tok(text).input_ids
        assert plain_tok(text).input_ids == ids
        with torch.no_grad():
            got, want = plain(torch.tensor([ids])).logits.numpy(), hf_gguf(torch.tensor([ids])).logits.numpy()
        # Same weights up to float32 rounding of the dequantization (ours vs gguf-py's).
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert (got.argmax(-1) == want.argmax(-1)).all()
    assert plain_tok.chat_template == checkpoint.chat_template
    assert plain_tok.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True) == \
        hf_tok.apply_chat_template(CHATS[1], tokenize=False, add_generation_prompt=True)
    assert plain.generation_config.eos_token_id in (list(checkpoint.eos_token_ids), checkpoint.eos_token_ids[0])
