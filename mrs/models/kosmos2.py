"""Kosmos-2 (HF ``Kosmos2ForConditionalGeneration``): its text decoder and its image encoder.

Text (``text_model``): a fairseq-style pre-LayerNorm decoder. Token embeddings (the image
features already in place) times ``sqrt(embed_dim)``, plus sinusoidal positions that start
at ``pad_token_id + 1`` (fairseq's offset, ``ModelConfig.position_offset``); each block is
LayerNorm -> attention (biased q/k/v, ``inner_attn_ln`` before ``out_proj``) -> residual,
LayerNorm -> ``fc1`` -> GELU -> ``ffn_layernorm`` -> ``fc2`` -> residual; a final
``layer_norm`` and a head tied to the embeddings.

Image (``vision_model`` + ``image_to_text_projection``): CLIP's tower (``mrs.models.clip``),
``post_layernorm`` over every token, L2-normalized, projected to the text width, then 64
learned latent queries attend to [those features; the queries] and become the image's 64
embeddings. The processor (``Kosmos2Processor``) writes ``<s><image>`` + 64 ordinary ids +
``</image>`` before the text, so an image's span is found from ``<image>``
(``VisionSpec.image_start_id``), not from a placeholder id. Attention stays causal over the
image positions, as in HF. Kosmos-2 has no chat template: the prompt is what the processor
builds from one user message's text (e.g. ``<grounding>An image of``) and its image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrs.errors import InvalidRequest
from mrs.models import clip, layers, siglip
from mrs.models.config import ModelConfig
from mrs.models.family import Family, Vision, renamed
from mrs.models.layers import LayerCache, LayerNorm, Linear
from mrs.models.vision import VisionSpec

Array = jax.Array

# Kosmos2TextConfig's defaults (a config.json may omit them).
_TEXT_DEFAULTS = {"vocab_size": 65037, "max_position_embeddings": 2048, "embed_dim": 2048, "layers": 24,
                  "ffn_dim": 8192, "attention_heads": 32, "activation_function": "gelu", "layer_norm_eps": 1e-5,
                  "scale_embedding": True, "pad_token_id": 1}
_TEXT = ("text_model.model.", "model."), ("text_model.lm_head.", "lm_head.")
IMAGE_PREFIXES = ("vision_model.", "image_to_text_projection.")


def _text_config(hf: dict) -> dict:
    return {**_TEXT_DEFAULTS, **(hf.get("text_config") or {})} if hf.get("model_type") == "kosmos-2" else hf


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """ModelConfig of the text decoder, from a ``kosmos-2`` config.json (or its text_config)."""
    tied = hf.get("tie_word_embeddings", True)
    text = _text_config(hf)
    hidden, heads = text["embed_dim"], text["attention_heads"]
    if hidden % heads:
        raise ValueError(f"kosmos2: embed_dim {hidden} is not divisible by attention_heads {heads}")
    if text.get("add_cross_attention"):
        raise ValueError("kosmos2: add_cross_attention is not supported")
    return ModelConfig(
        arch="kosmos2",
        vocab_size=text["vocab_size"],
        hidden_size=hidden,
        num_layers=text["layers"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=text["ffn_dim"],
        max_position_embeddings=text["max_position_embeddings"],
        norm_eps=text["layer_norm_eps"],
        embed_scale=bool(text["scale_embedding"]),
        position_offset=text["pad_token_id"] + 1,
        hidden_activation=text["activation_function"],
        tie_word_embeddings=bool(tied),
        dtype=dtype,
    )


def hf_name(name: str) -> str | None:
    """Our name for a text-decoder tensor; None for the image encoder's."""
    if name.startswith(IMAGE_PREFIXES):
        return None
    for old, new in _TEXT:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def sinusoidal_positions(positions: Array, dim: int, offset: int) -> Array:
    """fairseq's table row ``positions + offset``: ``[sin(p * f), cos(p * f)]`` with
    ``f = exp(-i * ln(10000) / (dim / 2 - 1))``, float32 as HF builds it (an odd ``dim`` ends in 0)."""
    half = dim // 2
    freq = np.exp(np.arange(half, dtype=np.float32) * np.float32(-math.log(10000) / (half - 1)))
    angles = (positions + offset).astype(jnp.float32)[..., None] * jnp.asarray(freq)
    table = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.pad(table, [(0, 0)] * (table.ndim - 1) + [(0, dim % 2)])


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array, cache: LayerCache, context: layers.Context):
        c = self.config
        heads = (*x.shape[:2], c.num_heads, c.head_dim)
        q, k, v = (Linear(True, name=f"{n}_proj")(x).reshape(heads) for n in "qkv")
        out, cache = layers.cached_attention(q, k, v, cache, context, scale=c.head_dim**-0.5, window=None)
        out = LayerNorm(c.norm_eps, name="inner_attn_ln")(out)
        return Linear(True, name="out_proj")(out), cache


class FFN(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = self.config
        h = layers.ACTIVATIONS[c.hidden_activation](Linear(True, name="fc1")(x))
        return Linear(True, name="fc2")(LayerNorm(c.norm_eps, name="ffn_layernorm")(h))


class Block(layers.PreNormBlock):
    attention, mlp, names = Attention, FFN, ("self_attn_layer_norm", "self_attn", "final_layer_norm", "ffn")


class TextTransformer(layers.Backbone):
    layer_module = Block
    final_norm_name = "layer_norm"

    def embed(self, table: layers.Embedding, tokens: Array, positions: Array, injected: layers.Injected | None) -> Array:
        c = self.config
        x = layers.inject(table(tokens), injected)  # before the scale: HF scales the image features too
        if c.embed_scale:
            x = x * math.sqrt(c.hidden_size)
        return x + sinusoidal_positions(positions, c.hidden_size, c.position_offset).astype(x.dtype)


class Kosmos2TextForCausalLM(layers.CausalLM):
    """Kosmos-2's text decoder (call contract: ``mrs.models.layers.CausalLM``)."""

    backbone_module = TextTransformer


@dataclass(frozen=True)
class EncoderConfig:
    tower: siglip.VisionConfig
    text_heads: int  # the latent queries' attention heads (the text decoder's)


class ImageToTextProjection(nn.Module):
    config: EncoderConfig

    @nn.compact
    def __call__(self, features: Array) -> Array:
        x = Linear(True, name="dense")(features)
        latent = layers.weight(self, "latent_query").astype(x.dtype)  # [queries, text hidden]
        queries = jnp.broadcast_to(latent[None], (x.shape[0], *latent.shape))
        return siglip.VisionAttention(self.config.text_heads, name="x_attn")(
            queries, jnp.concatenate([x, queries], axis=1))


class ImageEncoder(nn.Module):
    """``pixels [N, 3, S, S]`` -> ``[N, latent queries, text hidden]``, unscaled (the text
    decoder scales them with its token embeddings)."""

    config: EncoderConfig

    @nn.compact
    def __call__(self, pixels: Array) -> Array:
        c = self.config
        x = clip.VisionTransformer(c.tower, name="vision_tower")(pixels)
        x = LayerNorm(c.tower.norm_eps, name="post_layernorm")(x).astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # torch's F.normalize
        return ImageToTextProjection(c, name="image_to_text_projection")(x.astype(jnp.dtype(c.tower.dtype)))


def spec_from_hf(hf: dict, processor: Any, dtype: str = "float32") -> VisionSpec:
    """The VisionSpec of a ``kosmos-2`` config.json; ``<image>``'s id from the processor's tokenizer."""
    if hf.get("model_type") != "kosmos-2":
        raise ValueError("kosmos2 vision: config.json is not a Kosmos2ForConditionalGeneration (model_type kosmos-2)")
    tower = clip.config_from_hf(hf.get("vision_config") or {}, dtype=dtype)
    text = config_from_hf(hf, dtype=dtype)
    queries = int(hf.get("latent_query_num", 64))
    return VisionSpec(
        arch="kosmos2", encoder=EncoderConfig(tower, text.num_heads),
        image_token_id=None, image_start_id=processor.tokenizer.convert_tokens_to_ids(processor.boi_token),
        tokens_per_image=queries, image_size=tower.image_size,
        bidirectional=False, channels=tower.num_channels, max_images=1, dtype=dtype,
    )


def encoder_name(name: str) -> str | None:
    """Our encoder-tree name for a HF tensor name, or None for the text decoder's."""
    if name.startswith("vision_model.model.post_layernorm."):
        return name.removeprefix("vision_model.model.")
    if name.startswith("vision_model.model."):
        return "vision_tower." + name.removeprefix("vision_model.model.")
    return name if name.startswith("image_to_text_projection.") else None


def prompt(processor: Any, messages: list[dict[str, Any]], images: list[Any]) -> tuple[list[int], Any]:
    """Prompt ids and pixels exactly as ``Kosmos2Processor(text=..., images=...)`` builds them
    from one user message (its text parts joined; its image, if any, goes first as Kosmos-2 wants)."""
    if len(messages) != 1 or messages[0].get("role") != "user":
        raise InvalidRequest("messages: Kosmos-2 has no chat template; send one user message (its text, e.g. "
                             "'<grounding>An image of', and at most one image)", param="messages")
    content = messages[0].get("content")
    text = content if isinstance(content, str) else "".join(p["text"] for p in content if p["type"] == "text")
    out = processor(text=text, images=images[0] if images else None, return_tensors="np")
    pixels = out["pixel_values"].astype(np.float32) if images else None
    return np.asarray(out["input_ids"]).reshape(-1).tolist(), pixels


FAMILY = Family(
    archs=("kosmos2",),
    module=Kosmos2TextForCausalLM,
    config_from_hf=config_from_hf,
    model_types={"kosmos-2": "kosmos2"},
    hf_classes={"Kosmos2ForConditionalGeneration": "kosmos2"},
    hf_tensor=renamed(hf_name),
    foreign_prefixes=IMAGE_PREFIXES,
    column_parallel=("q_proj", "k_proj", "v_proj", "fc1"),
    row_parallel=("out_proj", "fc2"),
    vision=Vision(ImageEncoder, spec_from_hf, encoder_name, prompt),
)
