"""Llama family: llama, mistral, qwen2 (and SmolLM, which is llama), on the shared
rotary decoder (``mrs.models.decoder``).

GQA attention with rotate-half RoPE (llama3 scaling optional), optional q/k/v
bias (qwen2), SwiGLU MLP, RMSNorm, tied or untied LM head: the decoder's defaults.
"""

from __future__ import annotations

from typing import Any

from mrs.errors import LoadError
from mrs.models.config import FULL, SLIDING, ModelConfig
from mrs.models.decoder import DecoderForCausalLM
from mrs.models.family import LLAMA_CPP_PROJECTIONS, Family, GgufTables


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


def _gguf_config(g: Any, hf: dict[str, Any]) -> dict[str, Any]:
    hf = hf | {"model_type": "llama", "hidden_act": "silu", "rope_theta": float(g.get("llama.rope.freq_base", 10000.0))}
    rope_dims = g.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != hf["head_dim"]:
        raise LoadError(f"{g.path}: partial rotary (rope.dimension_count {rope_dims} < head_dim) is not supported")
    if "rope_freqs.weight" in g.tensors or "rope_scaling" in hf:
        # Llama 3.1 GGUFs carry llama3 scaling as precomputed factors without its parameters.
        raise LoadError(f"{g.path}: llama rope scaling (rope_freqs / rope.scaling) is not supported for GGUF")
    return hf


FAMILY = Family(
    archs=("llama", "mistral", "qwen2"),
    module=DecoderForCausalLM,
    config_from_hf=config_from_hf,
    model_types={"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"},
    hf_classes={"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2"},
    gguf={"llama": GgufTables(
        _gguf_config,
        block=LLAMA_CPP_PROJECTIONS | {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"},
        hf_class="LlamaForCausalLM", permuted_qk=True)},
)
