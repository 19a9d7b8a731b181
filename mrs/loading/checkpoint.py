"""What every loader produces: a model config, its parameters, tokenizer and template."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import PreTrainedTokenizerFast

from mrs.models.config import ModelConfig
from mrs.models.vision import VisionSpec
from mrs.sharding.placement import Placement


@dataclass
class VisionParts:
    """A vision model's image side: its spec, the encoder's parameters (float; in-situ
    quantization applies to the text tower only) and the checkpoint's own processor."""

    spec: VisionSpec
    params: dict[str, Any]
    processor: Any  # a transformers ProcessorMixin (e.g. Gemma3Processor)


@dataclass
class Checkpoint:
    config: ModelConfig
    params: dict[str, Any]  # nested tree for module.apply({"params": ...}); arrays or quantized arrays
    tokenizer: PreTrainedTokenizerFast
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    add_bos: bool  # whether a raw (non-chat) prompt starts with BOS
    chat_template: str | None  # the checkpoint's own; ModelEntry fields can override it
    source: str  # where it was loaded from, for logs
    notes: list[str] = field(default_factory=list)  # e.g. "fallback chat template in use"
    placement: Placement = field(default_factory=Placement)  # the entry's devices; the engine lays params out
    in_situ_quant: str | None = None  # the scheme the linear weights were quantized to at load time
    isq_embeddings: str | None = None  # likewise for the token embedding and LM head
    vision: VisionParts | None = None  # a VisionPlain model's image encoder and processor
