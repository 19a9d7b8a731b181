"""Llama family: llama, mistral, qwen2 (and SmolLM, which is llama).

GQA attention with rotate-half RoPE (llama3 scaling optional), optional q/k/v
bias (qwen2), SwiGLU MLP, RMSNorm, tied or untied LM head. Parameter names are
Hugging Face's (``model.layers_N.self_attn.q_proj.weight`` once nested).
"""

from __future__ import annotations

import flax.linen as nn
import jax

from mrs.models.config import FULL, SLIDING, ModelConfig
from mrs.models.layers import (
    CausalLM,
    Embedding,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
    Stage,
    apply_rope,
    cached_attention,
    layer_window,
    rope_inv_freq,
    run_stage,
    stage_layers,
)

Array = jax.Array


class Attention(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: tuple[Array, Array], kv_len: int | None):
        c = self.config
        batch, steps, _ = x.shape
        q = Linear(c.attention_bias, name="q_proj")(x).reshape(batch, steps, c.num_heads, c.head_dim)
        k = Linear(c.attention_bias, name="k_proj")(x).reshape(batch, steps, c.num_kv_heads, c.head_dim)
        v = Linear(c.attention_bias, name="v_proj")(x).reshape(batch, steps, c.num_kv_heads, c.head_dim)
        inv_freq = rope_inv_freq(c, c.rope_theta, scaled=True)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        out, cache = cached_attention(
            q, k, v, cache, positions, scale=c.head_dim**-0.5, window=layer_window(c, self.layer), kv_len=kv_len
        )
        return Linear(name="o_proj")(out), cache


class DecoderLayer(nn.Module):
    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, positions: Array, cache: tuple[Array, Array], kv_len: int | None):
        c = self.config
        h, cache = Attention(c, self.layer, name="self_attn")(
            RMSNorm(c.norm_eps, name="input_layernorm")(x), positions, cache, kv_len
        )
        x = x + h
        x = x + GatedMLP(c, name="mlp")(RMSNorm(c.norm_eps, name="post_attention_layernorm")(x))
        return x, cache


class LlamaModel(nn.Module):
    config: ModelConfig
    stage: Stage = None

    @nn.compact
    def __call__(self, inputs: Array, positions: Array, cache: KVCache, kv_len: int | None):
        c = self.config
        layers = stage_layers(c, self.stage)
        embed = Embedding(c.jnp_dtype, name="embed_tokens")
        x = embed(inputs) if layers.start == 0 else inputs
        x, new_cache = run_stage(lambda i: DecoderLayer(c, i, name=f"layers_{i}"), layers, x, positions, cache, kv_len)
        if layers.stop == c.num_layers:
            x = RMSNorm(c.norm_eps, name="norm")(x)
        return x, embed, new_cache


class LlamaForCausalLM(CausalLM):
    """Llama, Mistral, Qwen2 (call contract: ``mrs.models.layers.CausalLM``)."""

    def backbone(self) -> nn.Module:
        return LlamaModel(self.config, self.stage, name="model")


def _layer_types(hf: dict, arch: str, layers: int) -> tuple[str, ...]:
    """Which layers slide: config.json's list when saved, else qwen2's ``max_window_layers``
    rule (layers from that index on), else all (mistral)."""
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    first = hf.get("max_window_layers", 28) if arch == "qwen2" else 0
    return tuple(SLIDING if i >= first else FULL for i in range(layers))


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a Hugging Face ``config.json`` of llama, mistral or qwen2."""
    arch = hf.get("model_type", "llama")
    heads = hf["num_attention_heads"]
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type", scaling.get("type"))
    llama3 = None
    if rope_type == "llama3":
        llama3 = (
            float(scaling["factor"]),
            float(scaling["low_freq_factor"]),
            float(scaling["high_freq_factor"]),
            int(scaling["original_max_position_embeddings"]),
        )
    rope_theta = hf.get("rope_theta", scaling.get("rope_theta", 10000.0))
    layers = hf["num_hidden_layers"]
    window = hf.get("sliding_window") if arch == "mistral" or hf.get("use_sliding_window") else None
    return ModelConfig(
        arch=arch,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        intermediate_size=hf["intermediate_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        rope_llama3_scaling=llama3,
        attention_bias=bool(hf.get("attention_bias", arch == "qwen2")),
        sliding_window=window,
        layer_types=_layer_types(hf, arch, layers) if window else (),
        hidden_activation=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=dtype,
    )
