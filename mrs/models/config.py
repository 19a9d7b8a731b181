"""The architecture-neutral model configuration every loader produces.

A frozen, hashable dataclass: jitted functions take it as a static argument, so it
must never hold arrays or per-request values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import jax.numpy as jnp

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # a key of mrs.models.registry.ARCHS
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # llama3-style scaling: (factor, low_freq_factor, high_freq_factor, original_max_position)
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    # linear scaling factor (gemma3 global layers of the larger models use it)
    rope_linear_factor: float | None = None
    rope_local_theta: float | None = None  # gemma3: base for sliding layers
    attention_bias: bool = False  # q/k/v biases (qwen2)
    output_bias: bool = False  # o_proj bias (gemma3's follows attention_bias)
    # Rotary-decoder flags (mrs.models.decoder): gemma3 sets all four.
    qk_norm: bool = False  # RMSNorm of q and k per head before RoPE
    norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight)
    sandwich_norms: bool = False  # post-attention, pre- and post-feedforward norms
    embed_scale: bool = False  # embeddings times sqrt(hidden_size)
    position_offset: int = 0  # kosmos2: token p takes sinusoidal position p + this (fairseq's pad + 1)
    sliding_window: int | None = None
    layer_types: tuple[str, ...] = ()  # per layer SLIDING or FULL; empty means all FULL
    query_pre_attn_scalar: float | None = None  # softmax scale is this ** -0.5 when set
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    hidden_activation: str = "silu"
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # parameter and activation dtype

    def __post_init__(self) -> None:
        if self.layer_types and len(self.layer_types) != self.num_layers:
            raise ValueError(
                f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
            )

    @property
    def jnp_dtype(self) -> Any:
        return jnp.dtype(self.dtype)

    def layer_type(self, layer: int) -> str:
        return self.layer_types[layer] if self.layer_types else FULL

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
