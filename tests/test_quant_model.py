"""Quantized weights in a real model: SmolLM2's GGUF kept packed vs expanded, and ISQ quality."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mrs.config.schema import GGUF, ModelEntry, ModelSource
from mrs.loading.load import load_checkpoint
from mrs.models.kv_cache import init_cache
from mrs.models.registry import build_model
from mrs.quant import QArray, param_bytes, quantize_params
from mrs.quant.quality import teacher_forced

TEXT = Path(__file__).parent / "data" / "pride_and_prejudice_ch1.txt"


def dequantize_tree(params):
    return jax.tree.map(
        lambda leaf: leaf.dequantize(jnp.float32) if isinstance(leaf, QArray) else leaf,
        params,
        is_leaf=lambda leaf: isinstance(leaf, QArray),
    )


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path):
    entry = ModelEntry(model_id="smollm2", model=ModelSource(kind=GGUF, quantized_model_id=str(smollm2_gguf)))
    checkpoint = load_checkpoint(entry)
    return checkpoint, build_model(checkpoint.config)


def greedy(model, params, config, prompt: list[int], steps: int) -> list[int]:
    """Token-by-token greedy decoding with one compiled step and a donated cache."""

    @partial(jax.jit, donate_argnums=1)
    def step(params, cache, token, position):
        logits, cache = model.apply({"params": params}, token[None, None], position[None, None], cache)
        return jnp.argmax(logits[0, -1]).astype(jnp.int32), cache

    cache = init_cache(config, 1, len(prompt) + steps)
    out: list[int] = []
    token = None
    for position in range(len(prompt) + steps - 1):
        feed = prompt[position] if position < len(prompt) else int(token)
        token, cache = step(params, cache, jnp.int32(feed), jnp.int32(position))
        if position >= len(prompt) - 1:
            out.append(int(token))
    return out


def test_packed_gguf_matches_expanded(smollm2) -> None:
    checkpoint, model = smollm2
    params = checkpoint.params
    kinds = {leaf.fmt for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QArray))
             if isinstance(leaf, QArray)}
    assert kinds == {"Q4_1", "Q8_0"}  # the file's types stayed packed
    dense = dequantize_tree(params)
    assert param_bytes(params) < 0.2 * param_bytes(dense)

    prompt = checkpoint.tokenizer.encode("The capital of France is")
    packed_tokens = greedy(model, params, checkpoint.config, prompt, 16)
    dense_tokens = greedy(model, dense, checkpoint.config, prompt, 16)
    assert packed_tokens == dense_tokens
    assert "Paris" in checkpoint.tokenizer.decode(packed_tokens)


def test_isq_quality_on_real_text(smollm2) -> None:
    checkpoint, model = smollm2
    dense = dequantize_tree(checkpoint.params)
    tokens = checkpoint.tokenizer.encode(TEXT.read_text())[:257]
    reference = teacher_forced(model, dense, checkpoint.config, tokens)
    q8 = teacher_forced(model, quantize_params(dense, "Q8_0"), checkpoint.config, tokens)
    assert q8.agreement(reference) >= 0.97
    assert abs(q8.perplexity / reference.perplexity - 1) < 0.02
    assert 0 < q8.kl_from(reference) < 0.01 and reference.kl_from(reference) == 0
    assert reference.perplexity < 40  # the model reads English: a broken forward would not


def test_in_situ_quant_applies_to_gguf_entries(smollm2_gguf: Path) -> None:
    entry = ModelEntry(
        model_id="smollm2", in_situ_quant="Q8_0",
        model=ModelSource(kind=GGUF, quantized_model_id=str(smollm2_gguf)),
    )
    checkpoint = load_checkpoint(entry)
    q_proj = checkpoint.params["model"]["layers_0"]["self_attn"]["q_proj"]["weight"]
    assert isinstance(q_proj, QArray) and (q_proj.fmt, q_proj.bits) == ("Q8_0", 8)
    assert "in-situ quantized to Q8_0" in checkpoint.notes
