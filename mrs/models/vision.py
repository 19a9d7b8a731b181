"""What a vision model adds to its text decoder: the ``VisionSpec`` the engine and the
processor need, independent of the family.

A vision model is a graph: image -> the checkpoint's processor (transformers) -> the
family's image encoder (vision tower + projector: ``images [N, C, H, W] -> features
[N, tokens_per_image, text hidden]``, its own jitted step) -> the features injected at
the prompt's image-token positions in the text prefill (``mrs.models.layers.Injected``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class VisionSpec:
    arch: str  # a key of mrs.models.registry.VISION_ARCHS
    encoder: Any  # the family's frozen encoder config (hashable: a static argument of the step)
    # The placeholder the processor repeats tokens_per_image times per image (Gemma 3), or None
    # when an image's span is the tokens_per_image positions after each image_start_id (Kosmos-2
    # fills them with ordinary ids).
    image_token_id: int | None
    tokens_per_image: int
    image_size: int  # pixels per side the processor resizes to
    bidirectional: bool  # an image's tokens attend to each other both ways (Gemma 3)
    channels: int = 3
    max_images: int = 8  # per request
    image_start_id: int | None = None
    dtype: str = "float32"
