"""CLIP's vision tower (HF ``CLIPVisionTransformer``, as Kosmos-2 embeds it): the image
encoder of Kosmos-2.

It is SigLIP's encoder (``mrs.models.siglip``: the same pre-LayerNorm layers and names)
with CLIP's input side: a bias-free patch convolution, a learned class embedding
prepended to the patches, one position embedding per token (class included) and
``pre_layrnorm`` (HF's spelling) before the layers. The output is the last hidden state,
class token first; ``post_layernorm``'s weights are left to the caller, which Kosmos-2
applies to every token rather than to the pooled class token alone.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrs.models import siglip
from mrs.models.layers import LayerNorm, weight

Array = jax.Array

# CLIPVisionConfig's defaults where they differ from SigLIP's (a config.json may omit them).
_DEFAULTS = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
             "image_size": 224, "patch_size": 14, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"}


def config_from_hf(vision: dict, dtype: str = "float32") -> siglip.VisionConfig:
    """The tower's config from a CLIP-style ``vision_config`` section (Kosmos-2's defaults)."""
    return siglip.config_from_hf({**_DEFAULTS, **vision}, dtype=dtype)


class Embeddings(nn.Module):
    config: siglip.VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        """``pixels [N, C, S, S]`` -> ``[N, 1 + patches, hidden]``: the class token, then the patches."""
        x = siglip.patch_embed(pixels, weight(self, "patch_embedding"), self.config.patch_size)
        cls = jnp.broadcast_to(weight(self, "class_embedding").astype(x.dtype), (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + weight(self, "position_embedding")["weight"].astype(x.dtype)[None]


class VisionTransformer(nn.Module):
    """``pixels [N, C, S, S]`` (the processor's normalized values) -> ``[N, 1 + patches, hidden]``
    before ``post_layernorm``."""

    config: siglip.VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        c = self.config
        x = Embeddings(c, name="embeddings")(pixels.astype(jnp.dtype(c.dtype)))
        x = LayerNorm(c.norm_eps, name="pre_layrnorm")(x)
        return siglip.Encoder(c, name="encoder")(x)
