"""SigLIP's vision tower (HF ``SiglipVisionModel`` without its pooling head): the image
encoder of Gemma 3 (and PaliGemma).

Patch embedding (a ``patch_size``-stride convolution, computed here as one matmul over
the flattened patches: the same sums), learned position embeddings (one per patch, no
class token), pre-LayerNorm encoder layers with full bidirectional attention and a
non-gated MLP, then ``post_layernorm``. Parameter names are HF's below
``vision_tower.vision_model``.
"""

from __future__ import annotations

from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp

from mrs.models.layers import ACTIVATIONS, LayerNorm, Linear, weight

Array = jax.Array


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    image_size: int
    patch_size: int
    num_channels: int = 3
    norm_eps: float = 1e-6
    hidden_activation: str = "gelu_pytorch_tanh"
    dtype: str = "float32"

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size


def config_from_hf(vision: dict, dtype: str = "float32") -> VisionConfig:
    """VisionConfig from a ``siglip_vision_model`` config dict (a vision_config section)."""
    if vision.get("vision_use_head"):
        raise ValueError("siglip: a vision tower with its pooling head (vision_use_head) is not supported")
    config = VisionConfig(
        hidden_size=vision.get("hidden_size", 768),
        num_layers=vision.get("num_hidden_layers", 12),
        num_heads=vision.get("num_attention_heads", 12),
        intermediate_size=vision.get("intermediate_size", 3072),
        image_size=vision.get("image_size", 224),
        patch_size=vision.get("patch_size", 16),
        num_channels=vision.get("num_channels", 3),
        norm_eps=vision.get("layer_norm_eps", 1e-6),
        hidden_activation=vision.get("hidden_act", "gelu_pytorch_tanh"),
        dtype=dtype,
    )
    if config.hidden_activation not in ACTIVATIONS:
        raise ValueError(f"siglip: unsupported activation {config.hidden_activation!r}")
    if config.hidden_size % config.num_heads or config.image_size % config.patch_size:
        raise ValueError("siglip: hidden_size must divide by the heads and image_size by patch_size")
    return config


def patch_embed(pixels: Array, conv: dict, patch_size: int) -> Array:
    """A ``patch_size``-stride ``Conv2d`` (HF's ``weight [hidden, C, p, p]``, optional ``bias``)
    as one matmul over the flattened patches: ``[N, C, H, W]`` -> ``[N, patches, hidden]``,
    patches in row-major order."""
    n, channels, height, width = pixels.shape
    p = patch_size
    patches = pixels.reshape(n, channels, height // p, p, width // p, p).transpose(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(n, (height // p) * (width // p), channels * p * p)
    w = conv["weight"]
    x = patches @ w.reshape(w.shape[0], -1).T.astype(patches.dtype)
    return x + conv["bias"].astype(x.dtype) if "bias" in conv else x


class PatchEmbeddings(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        x = patch_embed(pixels, weight(self, "patch_embedding"), self.config.patch_size)
        return x + weight(self, "position_embedding")["weight"].astype(x.dtype)[None]


class VisionAttention(nn.Module):
    """Full (unmasked) multi-head attention with biased q/k/v/out projections; ``kv`` (default
    ``x``) supplies the keys and values (Kosmos-2's latent queries attend to image features)."""

    num_heads: int

    @nn.compact
    def __call__(self, x: Array, kv: Array | None = None) -> Array:
        kv = x if kv is None else kv
        n, hidden = x.shape[0], x.shape[-1]
        head_dim = hidden // self.num_heads
        split = lambda y: y.reshape(n, y.shape[1], self.num_heads, head_dim)  # noqa: E731
        q = split(Linear(True, name="q_proj")(x))
        k, v = (split(Linear(True, name=f"{name}_proj")(kv)) for name in ("k", "v"))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k).astype(jnp.float32) * head_dim**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, x.shape[1], hidden)
        return Linear(True, name="out_proj")(out)


class MLP(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.config.hidden_activation]
        return Linear(True, name="fc2")(act(Linear(True, name="fc1")(x)))


class EncoderLayer(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        x = x + VisionAttention(c.num_heads, name="self_attn")(LayerNorm(c.norm_eps, name="layer_norm1")(x))
        return x + MLP(c, name="mlp")(LayerNorm(c.norm_eps, name="layer_norm2")(x))


class Encoder(nn.Module):
    config: VisionConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        for i in range(self.config.num_layers):
            x = EncoderLayer(self.config, name=f"layers_{i}")(x)
        return x


class VisionTransformer(nn.Module):
    """``pixels [N, C, H, W]`` (the processor's normalized values) -> ``[N, patches, hidden]``."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        c = self.config
        x = PatchEmbeddings(c, name="embeddings")(pixels.astype(jnp.dtype(c.dtype)))
        x = Encoder(c, name="encoder")(x)
        return LayerNorm(c.norm_eps, name="post_layernorm")(x)


class SiglipVisionModel(nn.Module):
    """HF's wrapper module: the tower under ``vision_model``."""

    config: VisionConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        return VisionTransformer(self.config, name="vision_model")(pixels)
