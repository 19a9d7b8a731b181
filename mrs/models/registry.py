"""Architecture registry: the ``-a/--arch`` name -> Flax module class and HF config mapper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import flax.linen as nn

from mrs.models import llama
from mrs.models.config import ModelConfig


@dataclass(frozen=True)
class Arch:
    module: type[nn.Module]  # called as module(config)
    config_from_hf: Callable[..., ModelConfig]  # (hf config dict, dtype=...) -> ModelConfig


ARCHS: dict[str, Arch] = {
    "llama": Arch(llama.LlamaForCausalLM, llama.config_from_hf),
    "mistral": Arch(llama.LlamaForCausalLM, llama.config_from_hf),
    "qwen2": Arch(llama.LlamaForCausalLM, llama.config_from_hf),
}


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHS))}"
        ) from None


def build_model(config: ModelConfig) -> nn.Module:
    return get_arch(config.arch).module(config)
