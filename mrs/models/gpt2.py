"""GPT-2 family (gpt2, gpt2-large, DialoGPT): HF ``GPT2LMHeadModel`` checkpoints.

Learned absolute position embeddings (``wpe``), pre-LayerNorm blocks with bias,
GELU (tanh) MLP, multi-head attention (no GQA), tied LM head. HF stores the
``c_attn``/``c_proj``/``c_fc`` weights as Conv1D ``[in, out]``; ``hf_tensor``
transposes them once at load time to the ``[out, in]`` linear convention, so a
quantizer treats them like any other linear weight. ``c_attn`` stays fused
(one ``[3 * hidden, hidden]`` matmul, split into q/k/v afterwards).

The context limit is ``n_positions`` (``max_position_embeddings``). A position
past it has no embedding; we look it up as NaN instead of clamping or wrapping,
so a caller that skipped the engine's context check gets visibly broken output,
never plausible text.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrs.models.config import ModelConfig
from mrs.models.family import Family
from mrs.models.layers import (
    ACTIVATIONS,
    Backbone,
    CausalLM,
    Context,
    Embedding,
    Injected,
    LayerCache,
    Linear,
    PreNormBlock,
    cached_attention,
    dense_weight,
    inject,
    weight,
)

Array = jax.Array

# DialoGPT's convention, and HF's former default template for GPT-2 tokenizers:
# every turn's text followed by EOS; the reply is whatever the model writes next.
# Used only when a gpt2-family checkpoint has no template and none is configured.
FALLBACK_CHAT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{{ eos_token }}{% endfor %}"

# HF Conv1D modules: their weights are stored [in, out].
_CONV1D = ("c_attn", "c_proj", "c_fc")


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cache: LayerCache, context: Context):
        c = self.config
        batch, steps, _ = x.shape
        qkv = Linear(True, name="c_attn")(x).reshape(batch, steps, 3, c.num_heads, c.head_dim)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        scale = (c.query_pre_attn_scalar or c.head_dim) ** -0.5
        out, cache = cached_attention(q, k, v, cache, context, scale=scale, window=None)
        return Linear(True, name="c_proj")(out), cache


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.config.hidden_activation]
        return Linear(True, name="c_proj")(act(Linear(True, name="c_fc")(x)))


class Block(PreNormBlock):
    attention, mlp, names = Attention, MLP, ("ln_1", "attn", "ln_2", "mlp")


class PositionEmbedding(nn.Module):
    dtype: Any

    @nn.compact
    def __call__(self, positions: Array) -> Array:
        table = dense_weight(weight(self, "weight"), self.dtype)
        return jnp.take(table, positions, axis=0, mode="fill", fill_value=jnp.nan)


class GPT2Model(Backbone):
    layer_module = Block
    layer_prefix = "h"
    embedding_name = "wte"
    final_norm_name = "ln_f"

    def embed(self, table: Embedding, tokens: Array, positions: Array, injected: Injected | None) -> Array:
        return inject(table(tokens), injected) + PositionEmbedding(self.config.jnp_dtype, name="wpe")(positions)


class GPT2LMHeadModel(CausalLM):
    """GPT-2 (call contract: ``mrs.models.layers.CausalLM``)."""

    backbone_module = GPT2Model
    backbone_name = "transformer"


def hf_tensor(name: str, value: Any) -> tuple[str, Any] | None:
    """Map one HF tensor to ours: add the ``transformer.`` prefix where the checkpoint
    has none, drop the causal-mask buffers old checkpoints carry, transpose Conv1D."""
    parts = name.split(".")
    if parts[-2:] in (["attn", "bias"], ["attn", "masked_bias"]):
        return None  # h.N.attn.bias is a [1, 1, n_pos, n_pos] mask buffer, not a weight
    if parts[0] not in ("transformer", "lm_head"):
        name = "transformer." + name
        parts = ["transformer", *parts]
    if len(parts) >= 2 and parts[-2] in _CONV1D and parts[-1] == "weight":
        value = value.T
    return name, value


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a GPT-2 ``config.json`` (``n_embd``, ``n_layer``, ``n_head``, ``n_positions``)."""
    if hf.get("scale_attn_by_inverse_layer_idx"):
        raise ValueError("gpt2: scale_attn_by_inverse_layer_idx is not supported")
    hidden, heads = hf.get("n_embd", 768), hf.get("n_head", 12)
    if hidden % heads:
        raise ValueError(f"gpt2: n_embd {hidden} is not divisible by n_head {heads}")
    return ModelConfig(
        arch="gpt2",
        vocab_size=hf.get("vocab_size", 50257),
        hidden_size=hidden,
        num_layers=hf.get("n_layer", 12),
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=hf.get("n_inner") or 4 * hidden,
        max_position_embeddings=hf.get("n_positions", 1024),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        # scale_attn_weights=False means raw q.k scores: a scale of 1 ** -0.5.
        query_pre_attn_scalar=None if hf.get("scale_attn_weights", True) else 1.0,
        hidden_activation=hf.get("activation_function", "gelu_new"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dtype=dtype,
    )


FAMILY = Family(
    archs=("gpt2",),
    module=GPT2LMHeadModel,
    config_from_hf=config_from_hf,
    model_types={"gpt2": "gpt2"},
    hf_classes={"GPT2LMHeadModel": "gpt2"},
    hf_tensor=hf_tensor,
    fallback_chat_template=FALLBACK_CHAT_TEMPLATE,
    embeddings=("wte", "wpe"),
    column_parallel=("c_attn", "c_fc"),
    row_parallel=("c_proj",),  # both attn.c_proj and mlp.c_proj
)
