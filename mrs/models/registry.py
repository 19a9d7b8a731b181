"""Architecture registry: the ``-a/--arch`` name -> Flax module class and HF config mapper.

Loaders meet the models here: ``config_from_hf`` turns a ``config.json`` into a
``ModelConfig``, ``params_from_hf`` turns HF-named tensors into the module's
parameter tree, ``check_params`` proves the tree is complete before serving.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrs.models import gemma3, gemma3_vision, gpt2, kosmos2, llama
from mrs.models.config import ModelConfig
from mrs.models.decoder import DecoderForCausalLM
from mrs.models.layers import ACTIVATIONS, Stage, init_cache
from mrs.models.params import nest
from mrs.models.vision import VisionSpec


def _same_tensor(name: str, value: Any) -> tuple[str, Any] | None:
    return name, value


def _renamed(hf_name: Callable[[str], str | None]) -> Callable[[str, Any], tuple[str, Any] | None]:
    """A tensor mapper from a family's name mapper (None: not the text model's)."""
    def tensor(name: str, value: Any) -> tuple[str, Any] | None:
        ours = hf_name(name)
        return None if ours is None else (ours, value)
    return tensor


@dataclass(frozen=True)
class Arch:
    module: type[nn.Module]  # called as module(config, stage)
    config_from_hf: Callable[..., ModelConfig]  # (hf config dict, dtype=...) -> ModelConfig
    # One HF tensor -> (our name, array) or None to skip it (renames, layout fixes).
    hf_tensor: Callable[[str, Any], tuple[str, Any] | None] = _same_tensor
    # Used only when the checkpoint has no chat template and none is configured.
    fallback_chat_template: str | None = None
    # The first stage's modules besides its layers (token embedding first: a tied head reads it).
    embeddings: tuple[str, ...] = ("embed_tokens",)
    # HF tensor-name prefixes that are not the text model's (a vision tower): never read.
    foreign_prefixes: tuple[str, ...] = ()


ARCHS: dict[str, Arch] = {
    "llama": Arch(DecoderForCausalLM, llama.config_from_hf),
    "mistral": Arch(DecoderForCausalLM, llama.config_from_hf),
    "qwen2": Arch(DecoderForCausalLM, llama.config_from_hf),
    "gemma3": Arch(DecoderForCausalLM, gemma3.config_from_hf, _renamed(gemma3.hf_name),
                   foreign_prefixes=gemma3.SKIPPED_PREFIXES),
    "kosmos2": Arch(kosmos2.Kosmos2TextForCausalLM, kosmos2.config_from_hf, _renamed(kosmos2.hf_name),
                    foreign_prefixes=kosmos2.IMAGE_PREFIXES),
    "gpt2": Arch(gpt2.GPT2LMHeadModel, gpt2.config_from_hf, gpt2.hf_tensor, gpt2.FALLBACK_CHAT_TEMPLATE,
                 embeddings=("wte", "wpe")),
}

# config.json "model_type" / "architectures" values -> our arch name.
_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma3": "gemma3",
                "gemma3_text": "gemma3", "gpt2": "gpt2", "kosmos-2": "kosmos2"}
_HF_CLASSES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3",
               "GPT2LMHeadModel": "gpt2", "Kosmos2ForConditionalGeneration": "kosmos2"}


# Buffers some older checkpoints saved next to the weights (llama's RoPE table).
NON_WEIGHTS = ("rotary_emb.inv_freq",)


def text_tensor(arch: str, name: str) -> bool:
    """Whether HF tensor ``name`` may belong to the text model (a loader skips the rest unread)."""
    return not name.startswith(get_arch(arch).foreign_prefixes)


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(
            f"unsupported architecture {name!r}; supported: {', '.join(sorted(ARCHS))}"
        ) from None


def build_model(config: ModelConfig, stage: Stage = None) -> nn.Module:
    """The causal LM, or one pipeline stage of it (``mrs.models.layers.stage_layers``)."""
    return get_arch(config.arch).module(config, stage)


def _known_arch(hf: dict) -> str | None:
    if hf.get("model_type") in _MODEL_TYPES:
        return _MODEL_TYPES[hf["model_type"]]
    return next((_HF_CLASSES[c] for c in hf.get("architectures") or () if c in _HF_CLASSES), None)


def detect_arch(hf: dict) -> str:
    """Our arch name for a HF ``config.json``, from ``model_type`` then ``architectures``."""
    arch = _known_arch(hf)
    if arch is not None:
        return arch
    model_type = hf.get("model_type")
    raise ValueError(
        f"unsupported architecture (model_type {model_type!r}, architectures {hf.get('architectures')}); "
        f"supported: {', '.join(sorted(ARCHS))} (pass -a/--arch to choose one)"
    )


def config_from_hf(arch: str, hf: dict, dtype: str = "float32") -> ModelConfig:
    """The arch's config mapper, with the checks every family shares."""
    mapper = get_arch(arch).config_from_hf
    described = _known_arch(hf)
    if described is not None and ARCHS[described].config_from_hf is not mapper:
        # e.g. -a gpt2 on a llama directory: say so instead of listing missing tensors
        raise ValueError(f"config.json describes a {described!r} model, which arch {arch!r} cannot load")
    config = mapper(hf, dtype=dtype)
    if config.hidden_activation not in ACTIVATIONS:
        raise ValueError(
            f"{arch}: unsupported activation {config.hidden_activation!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        )
    return config.replace(arch=arch)


def params_from_hf(config: ModelConfig, named: Iterable[tuple[str, Any]]) -> dict:
    """The module's parameter tree from HF-named tensors (a tied head's copy is dropped)."""
    to_ours = get_arch(config.arch).hf_tensor

    def converted():
        for name, value in named:
            if name.endswith(NON_WEIGHTS):
                continue
            mapped = to_ours(name, value)
            if mapped is None or (config.tie_word_embeddings and mapped[0] == "lm_head.weight"):
                continue
            yield mapped

    return nest(converted())


def check_params(config: ModelConfig, params: dict) -> None:
    """Trace the model once (shapes only, no compile) so a missing or misshapen tensor
    fails at load time with its name, not at the first request."""
    model = build_model(config)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)

    def run(p, t):
        return model.apply({"params": p}, t, t, init_cache(config, 1, 1))

    jax.eval_shape(run, params, tokens)


@dataclass(frozen=True)
class VisionArch:
    """A family's image side (``mrs.models.vision``); its text tower is the family's ``Arch``."""

    encoder: type[nn.Module]  # called as encoder(spec.encoder): pixels [N, C, S, S] -> features [N, T, hidden]
    spec_from_hf: Callable[..., VisionSpec]  # (hf config dict, processor, dtype=...) -> VisionSpec
    hf_name: Callable[[str], str | None]  # a HF tensor name -> the encoder's, None for the text tower's
    # For a family without a chat template (Kosmos-2): (processor, messages with {"type": "image"}
    # parts, PIL images) -> (prompt ids, float32 pixels [N, C, S, S] or None). None: the chat
    # template renders the prompt and the processor expands its images.
    prompt: Callable[[Any, list[dict[str, Any]], list[Any]], tuple[list[int], Any]] | None = None


VISION_ARCHS: dict[str, VisionArch] = {
    "gemma3": VisionArch(gemma3_vision.ImageEncoder, gemma3_vision.spec_from_hf, gemma3_vision.hf_name),
    "kosmos2": VisionArch(kosmos2.ImageEncoder, kosmos2.spec_from_hf, kosmos2.encoder_name, kosmos2.prompt),
}


def get_vision_arch(name: str) -> VisionArch:
    try:
        return VISION_ARCHS[name]
    except KeyError:
        raise ValueError(
            f"architecture {name!r} has no vision model; vision architectures: {', '.join(sorted(VISION_ARCHS))}"
        ) from None


def build_encoder(spec: VisionSpec) -> nn.Module:
    return get_vision_arch(spec.arch).encoder(spec.encoder)


def check_encoder_params(spec: VisionSpec, params: dict) -> None:
    """Trace the image encoder once (shapes only) so a missing tensor fails at load time."""
    pixels = jax.ShapeDtypeStruct((1, spec.channels, spec.image_size, spec.image_size), jnp.float32)
    jax.eval_shape(lambda p, x: build_encoder(spec).apply({"params": p}, x), params, pixels)
