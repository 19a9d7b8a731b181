"""GGUF metadata -> a Hugging Face style config dict -> ``ModelConfig``.

We rebuild the ``config.json`` that llama.cpp's converter read, then reuse the
arch's own ``config_from_hf``, so GGUF and safetensors checkpoints meet in one
mapping. Values llama.cpp does not store but hard-codes per arch are filled in by
the family's ``GgufTables.hf_config`` with llama.cpp's rule (cited there).
"""

from __future__ import annotations

from typing import Any

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


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """The ``config.json`` dict this GGUF was converted from (as far as it can be known):
    the keys every arch stores, then the family's own rules (``GgufTables.hf_config``)."""
    tables = registry.get_gguf_tables(g.architecture, g.path)
    hf = _common(g)
    if (scaling := _rope_scaling(g)) is not None:
        hf["rope_scaling"] = scaling
    return tables.hf_config(g, hf)


def model_config_from_gguf(g: GGUFFile, dtype: str = "float32") -> ModelConfig:
    hf = hf_config_from_gguf(g)
    try:
        return registry.config_from_hf(g.architecture, hf, dtype=dtype)
    except ValueError as err:
        raise LoadError(f"{g.path}: {err}") from None
