"""Architecture registry: the ``-a/--arch`` name -> its family's record (``mrs.models.family``).

Loaders meet the models here: ``config_from_hf`` turns a ``config.json`` into a
``ModelConfig``, ``params_from_hf`` turns HF-named tensors into the module's
parameter tree, ``check_params`` proves the tree is complete before serving.
"""

from __future__ import annotations

from typing import Any, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrs.errors import LoadError
from mrs.models import gemma3, gpt2, kosmos2, llama
from mrs.models.config import ModelConfig
from mrs.models.family import Family, GgufTables, Vision
from mrs.models.kv_cache import Stage, init_cache
from mrs.models.layers import ACTIVATIONS
from mrs.models.params import nest
from mrs.models.vision import VisionSpec

# Every family, one record each (mrs.models.family); a new family is a file and a line here.
FAMILIES: tuple[Family, ...] = (llama.FAMILY, gemma3.FAMILY, gpt2.FAMILY, kosmos2.FAMILY)

ARCHS: dict[str, Family] = {arch: family for family in FAMILIES for arch in family.archs}
VISION_ARCHS: dict[str, Vision] = {arch: f.vision for arch, f in ARCHS.items() if f.vision is not None}
GGUF_ARCHS: dict[str, GgufTables] = {arch: tables for f in FAMILIES for arch, tables in f.gguf.items()}
# config.json "model_type" / "architectures" values -> our arch name.
_MODEL_TYPES = {key: arch for f in FAMILIES for key, arch in f.model_types.items()}
_HF_CLASSES = {key: arch for f in FAMILIES for key, arch in f.hf_classes.items()}


# Buffers some older checkpoints saved next to the weights (llama's RoPE table).
NON_WEIGHTS = ("rotary_emb.inv_freq",)


def text_tensor(arch: str, name: str) -> bool:
    """Whether HF tensor ``name`` may belong to the text model (a loader skips the rest unread)."""
    return not name.startswith(get_arch(arch).foreign_prefixes)


def get_arch(name: str) -> Family:
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


def get_vision_arch(name: str) -> Vision:
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


def get_gguf_tables(arch: str, path: Any) -> GgufTables:
    """How llama.cpp stored GGUF architecture ``arch`` (LoadError naming ``path`` if unknown)."""
    try:
        return GGUF_ARCHS[arch]
    except KeyError:
        raise LoadError(f"{path}: unsupported architecture {arch!r} in GGUF; "
                        f"supported: {', '.join(sorted(GGUF_ARCHS))}") from None
