"""Gemma 3's image encoder (``Gemma3ForConditionalGeneration`` minus its text tower, which is
``mrs.models.gemma3`` on the shared decoder): SigLIP, then the multimodal projector.

The projector average-pools the ``patches_per_side``-square patch grid down to
``sqrt(mm_tokens_per_image)`` per side, RMS-normalizes (Gemma's ``1 + weight``, the
vision tower's eps) and multiplies by ``mm_input_projection_weight [vision hidden, text
hidden]`` (stored as ``x @ W``, not transposed). HF merges the result unscaled into the
scaled token embeddings at the image-token positions, and an image's tokens attend to
each other bidirectionally on every layer (``VisionSpec.bidirectional``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax

from mrs.models import siglip
from mrs.models.layers import RMSNorm, weight
from mrs.models.vision import VisionSpec

Array = jax.Array


@dataclass(frozen=True)
class EncoderConfig:
    tower: siglip.VisionConfig
    tokens_per_image: int
    text_hidden: int


class MultiModalProjector(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        n, _, hidden = x.shape
        side, per_side = c.tower.patches_per_side, int(round(c.tokens_per_image**0.5))
        k = side // per_side
        pooled = x.reshape(n, per_side, k, per_side, k, hidden).mean(axis=(2, 4)).reshape(n, per_side**2, hidden)
        normed = RMSNorm(c.tower.norm_eps, unit_offset=True, name="mm_soft_emb_norm")(pooled)
        return normed @ weight(self, "mm_input_projection_weight").astype(normed.dtype)


class ImageEncoder(nn.Module):
    """``pixels [N, 3, S, S]`` -> ``[N, tokens_per_image, text hidden]``."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        features = siglip.SiglipVisionModel(self.config.tower, name="vision_tower")(pixels)
        return MultiModalProjector(self.config, name="multi_modal_projector")(features)


def spec_from_hf(hf: dict, processor: Any, dtype: str = "float32") -> VisionSpec:
    """The VisionSpec of a ``gemma3`` (multimodal) config.json (its ids are all in it: ``processor``
    is not needed)."""
    if hf.get("model_type") != "gemma3" or "vision_config" not in hf:
        raise ValueError("gemma3 vision: config.json is not a Gemma3ForConditionalGeneration (no vision_config)")
    tower = siglip.config_from_hf(hf["vision_config"], dtype=dtype)
    tokens = int(hf.get("mm_tokens_per_image", 256))
    per_side = int(round(tokens**0.5))
    if per_side**2 != tokens or tower.patches_per_side % per_side:
        raise ValueError(f"gemma3 vision: mm_tokens_per_image {tokens} does not pool a "
                         f"{tower.patches_per_side}x{tower.patches_per_side} patch grid")
    text_hidden = (hf.get("text_config") or {}).get("hidden_size", 2304)
    return VisionSpec(
        arch="gemma3", encoder=EncoderConfig(tower, tokens, text_hidden),
        image_token_id=int(hf.get("image_token_id", hf.get("image_token_index", 262_144))),
        tokens_per_image=tokens, image_size=tower.image_size, bidirectional=True, channels=tower.num_channels,
        dtype=dtype,
    )


# HF tensor prefixes of the encoder (transformers >= 4.52 nests them under "model.").
_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.", "vision_tower.", "multi_modal_projector.")


def hf_name(name: str) -> str | None:
    """Our encoder-tree name for a HF tensor name, or None for the text tower's tensors.

    transformers 5's own ``save_pretrained`` drops the hub's ``vision_model.`` level
    (``vision_tower.encoder...``); both layouts load."""
    if not name.startswith(_PREFIXES):
        return None
    name = name.removeprefix("model.")
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name.removeprefix("vision_tower.")
    return name

