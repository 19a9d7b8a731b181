"""GGUF metadata -> a Hugging Face style config dict -> ``ModelConfig``.

We rebuild the ``config.json`` that llama.cpp's converter read, then reuse the
arch's own ``config_from_hf``, so GGUF and safetensors checkpoints meet in one
mapping. Values llama.cpp does not store but hard-codes per arch are filled in
with llama.cpp's rule (cited where used).
"""

from __future__ import annotations

from typing import Any, Callable

from mrs.errors import LoadError
from mrs.loading.gguf_reader import GGUFFile
from mrs.models import registry
from mrs.models.config import ModelConfig


def _common(g: GGUFFile) -> dict[str, Any]:
    """Keys every decoder-only arch stores under ``{arch}.*``."""
    a = g.architecture
    heads = int(g.require(f"{a}.attention.head_count"))
    kv_heads = g.get(f"{a}.attention.head_count_kv", heads)
    if isinstance(kv_heads, list):
        raise LoadError(f"{g.path}: per-layer attention.head_count_kv is not supported")
    hidden = int(g.require(f"{a}.embedding_length"))
    embed = g.tensors.get("token_embd.weight")
    if embed is None:
        raise LoadError(f"{g.path}: no token_embd.weight tensor")
    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(g.require(f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(g.get(f"{a}.attention.key_length", hidden // heads)),
        "intermediate_size": int(g.require(f"{a}.feed_forward_length")),
        "max_position_embeddings": int(g.require(f"{a}.context_length")),
        "rms_norm_eps": float(g.require(f"{a}.attention.layer_norm_rms_epsilon")),
        # The embedding's row count, not the tokenizer's: that is what the weights hold.
        "vocab_size": int(embed.shape[1]),
        # llama.cpp writes output.weight only when the head is not the embedding.
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }


def _rope_scaling(g: GGUFFile) -> dict[str, Any] | None:
    a = g.architecture
    kind = g.get(f"{a}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    if kind != "linear":
        raise LoadError(f"{g.path}: rope scaling type {kind!r} is not supported")
    return {"rope_type": "linear", "factor": float(g.require(f"{a}.rope.scaling.factor"))}


def _llama(g: GGUFFile) -> dict[str, Any]:
    hf = _common(g) | {"model_type": "llama", "hidden_act": "silu"}
    hf["rope_theta"] = float(g.get("llama.rope.freq_base", 10000.0))
    rope_dims = g.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != hf["head_dim"]:
        raise LoadError(f"{g.path}: partial rotary (rope.dimension_count {rope_dims} < head_dim) is not supported")
    if "rope_freqs.weight" in g.tensors or _rope_scaling(g) is not None:
        # Llama 3.1 GGUFs carry llama3 scaling as precomputed factors without its parameters.
        raise LoadError(f"{g.path}: llama rope scaling (rope_freqs / rope.scaling) is not supported for GGUF")
    return hf


def _gemma3(g: GGUFFile) -> dict[str, Any]:
    hf = _common(g) | {"model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh"}
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    hf["rope_theta"] = float(g.get("gemma3.rope.freq_base", 1_000_000.0))
    # llama.cpp hard-codes these for gemma3 (llama-model.cpp, LLM_ARCH_GEMMA3): sliding
    # layers use base 10000, every 6th layer is global, and the attention scale is
    # 1/sqrt(hidden/heads) for the 27B model (62 layers), else 1/sqrt(head_dim).
    hf["rope_local_base_freq"] = 10_000.0
    hf["sliding_window_pattern"] = 6
    hf["query_pre_attn_scalar"] = hf["hidden_size"] // heads if layers == 62 else hf["head_dim"]
    hf["sliding_window"] = int(g.require("gemma3.attention.sliding_window"))
    if (scaling := _rope_scaling(g)) is not None:
        hf["rope_scaling"] = scaling
    return hf


HF_CONFIG_BUILDERS: dict[str, Callable[[GGUFFile], dict[str, Any]]] = {
    "llama": _llama,
    "gemma3": _gemma3,
}


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The ``config.json`` dict this GGUF was converted from (as far as it can be known)."""
    arch = g.architecture
    builder = HF_CONFIG_BUILDERS.get(arch)
    if builder is None:
        raise LoadError(
            f"{g.path}: unsupported architecture {arch!r} in GGUF; supported: {', '.join(sorted(HF_CONFIG_BUILDERS))}"
        )
    return builder(g)


def model_config_from_gguf(g: GGUFFile, dtype: str = "float32") -> ModelConfig:
    hf = hf_config_from_gguf(g)
    try:
        return registry.config_from_hf(g.architecture, hf, dtype=dtype)
    except ValueError as err:
        raise LoadError(f"{g.path}: {err}") from None
