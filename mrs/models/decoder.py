"""The one rotary decoder every RoPE family runs (llama, mistral, qwen2, gemma3).

A family differs only in flags of its ``ModelConfig`` (set by its ``config_from_hf``):
- ``attention_bias`` (q/k/v biases, qwen2) and ``output_bias`` (o_proj bias, gemma3);
- ``qk_norm``: q and k RMS-normalized per head before RoPE (gemma3);
- ``norm_unit_offset``: every RMSNorm scales by ``1 + weight`` (gemma3);
- ``sandwich_norms``: post-attention, pre- and post-feedforward norms around the two
  blocks (gemma3) instead of llama's input and post-attention (pre-MLP) norms;
- ``embed_scale``: embeddings times ``sqrt(hidden)`` cast to the model dtype first
  (in bfloat16 that rounds, e.g. sqrt(640) -> 25.25; HF does the same);
- ``rope_local_theta``: sliding layers use this base, unscaled; the others use
  ``rope_theta`` with the configured llama3 or linear scaling;
- ``query_pre_attn_scalar`` (softmax scale), ``sliding_window`` with ``layer_types``,
  ``final_logit_softcapping``, the gated MLP's activation.

Parameter names are Hugging Face's (``model.layers_N.self_attn.q_proj.weight`` once nested).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrs.models.config import SLIDING, ModelConfig
from mrs.models.layers import (
    Backbone,
    CausalLM,
    Context,
    Embedding,
    GatedMLP,
    Injected,
    LayerCache,
    Linear,
    RMSNorm,
    apply_rope,
    cached_attention,
    inject,
    layer_window,
    project,
    rope_inv_freq,
)

Array = jax.Array


def _norm(config: ModelConfig, name: str) -> RMSNorm:
    return RMSNorm(config.norm_eps, unit_offset=config.norm_unit_offset, name=name)


class Attention(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, cache: LayerCache, context: Context):
        c = self.config
        batch, steps, _ = x.shape
        q, k, v = project(self, x, ("q_proj", "k_proj", "v_proj"), c.attention_bias)
        q = q.reshape(batch, steps, c.num_heads, c.head_dim)
        k, v = (y.reshape(batch, steps, c.num_kv_heads, c.head_dim) for y in (k, v))
        if c.qk_norm:
            q, k = _norm(c, "q_norm")(q), _norm(c, "k_norm")(k)
        if c.rope_local_theta is not None and c.layer_type(self.layer) == SLIDING:
            inv_freq = rope_inv_freq(c, c.rope_local_theta, scaled=False)
        else:
            inv_freq = rope_inv_freq(c, c.rope_theta, scaled=True)
        q, k = apply_rope(q, context.positions, inv_freq), apply_rope(k, context.positions, inv_freq)
        out, cache = cached_attention(
            q, k, v, cache, context, scale=(c.query_pre_attn_scalar or c.head_dim) ** -0.5,
            window=layer_window(c, self.layer), softcap=c.attn_logit_softcapping,
        )
        return Linear(c.output_bias, name="o_proj")(out), cache


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, cache: LayerCache, context: Context):
        c = self.config
        h, cache = Attention(c, self.layer, name="self_attn")(_norm(c, "input_layernorm")(x), cache, context)
        if c.sandwich_norms:
            x = x + _norm(c, "post_attention_layernorm")(h)
            h = GatedMLP(c, name="mlp")(_norm(c, "pre_feedforward_layernorm")(x))
            return x + _norm(c, "post_feedforward_layernorm")(h), cache
        x = x + h
        return x + GatedMLP(c, name="mlp")(_norm(c, "post_attention_layernorm")(x)), cache


class DecoderModel(Backbone):
    layer_module = DecoderLayer

    def embed(self, table: Embedding, tokens: Array, positions: Array, injected: Injected | None) -> Array:
        c = self.config
        x = table(tokens)
        if c.embed_scale:  # HF casts the scale to the weight dtype before multiplying
            x = x * jnp.asarray(math.sqrt(c.hidden_size), c.jnp_dtype)
        return inject(x, injected)  # after the scale: HF merges Gemma 3's image features unscaled

    def final_norm(self) -> nn.Module:
        return _norm(self.config, self.final_norm_name)


class DecoderForCausalLM(CausalLM):
    """Every rotary family (call contract: ``mrs.models.layers.CausalLM``)."""

    backbone_module = DecoderModel
