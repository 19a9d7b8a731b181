"""The one record a model family owns (``FAMILY`` in its file): everything the loaders, the
registry, placement and tensor parallel need to know about it, so that adding a family is
adding one file (and naming it in ``mrs.models.registry.FAMILIES``).

A family may serve several ``-a/--arch`` names (llama, mistral and qwen2 share one), may
read GGUF files (``GgufTables``: how llama.cpp renamed and rewrote its tensors and which
config values it left out), and may have an image side (``Vision``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import flax.linen as nn

from mrs.models.config import ModelConfig
from mrs.models.vision import VisionSpec

TensorMapper = Callable[[str, Any], "tuple[str, Any] | None"]


def same_tensor(name: str, value: Any) -> tuple[str, Any] | None:
    return name, value


def renamed(hf_name: Callable[[str], str | None]) -> TensorMapper:
    """A tensor mapper from a name mapper (None: not the text model's tensor)."""
    def tensor(name: str, value: Any) -> tuple[str, Any] | None:
        ours = hf_name(name)
        return None if ours is None else (ours, value)
    return tensor


# llama.cpp's names for the projections every rotary decoder has (blk.N.<name>).
LLAMA_CPP_PROJECTIONS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class GgufTables:
    """How llama.cpp's converter stored one GGUF architecture of this family."""

    # (the GGUF file, the config.json keys every arch shares, rope_scaling included when the
    # file has one) -> the whole config.json dict the converter read. The file answers
    # ``get``, ``require``, ``tensors`` and ``path``; errors are ``mrs.errors.LoadError``.
    hf_config: Callable[[Any, dict[str, Any]], dict[str, Any]]
    block: dict[str, str]  # GGUF name inside blk.N -> HF name inside model.layers.N
    hf_class: str  # config.json "architectures" of an exported Plain copy (mrs convert)
    norms_offset: bool = False  # norms stored as 1 + w (gemma)
    permuted_qk: bool = False  # q/k rows permuted for llama.cpp's rope (llama)


@dataclass(frozen=True)
class Vision:
    """A family's image side (``mrs.models.vision``); its text tower is the family's module."""

    encoder: type[nn.Module]  # called as encoder(spec.encoder): pixels [N, C, S, S] -> features [N, T, hidden]
    spec_from_hf: Callable[..., VisionSpec]  # (hf config dict, processor, dtype=...) -> VisionSpec
    hf_name: Callable[[str], str | None]  # a HF tensor name -> the encoder's, None for the text tower's
    # For a family without a chat template (Kosmos-2): (processor, messages with {"type": "image"}
    # parts, PIL images) -> (prompt ids, float32 pixels [N, C, S, S] or None). None: the chat
    # template renders the prompt and the processor expands its images.
    prompt: Callable[[Any, list[dict[str, Any]], list[Any]], tuple[list[int], Any]] | None = None


@dataclass(frozen=True)
class Family:
    archs: tuple[str, ...]  # the -a/--arch names it serves
    module: type[nn.Module]  # called as module(config, stage)
    config_from_hf: Callable[..., ModelConfig]  # (hf config dict, dtype=...) -> ModelConfig
    # config.json "model_type" and "architectures" values -> one of archs.
    model_types: dict[str, str]
    hf_classes: dict[str, str]
    # One HF tensor -> (our name, array) or None to skip it (renames, layout fixes).
    hf_tensor: TensorMapper = same_tensor
    # Used only when the checkpoint has no chat template and none is configured.
    fallback_chat_template: str | None = None
    # The first stage's modules besides its layers (token embedding first: a tied head reads it).
    embeddings: tuple[str, ...] = ("embed_tokens",)
    # HF tensor-name prefixes that are not the text model's (a vision tower): never read.
    foreign_prefixes: tuple[str, ...] = ()
    # Tensor parallel (Megatron): linear modules whose output rows split, and those whose input
    # columns split; every other parameter is replicated.
    column_parallel: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    row_parallel: tuple[str, ...] = ("o_proj", "down_proj")
    # GGUF general.architecture -> how llama.cpp stored it; empty: no GGUF loading.
    gguf: dict[str, GgufTables] = field(default_factory=dict)
    vision: Vision | None = None
