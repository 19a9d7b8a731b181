"""Building blocks shared by the model families.

Conventions (every family follows them):
- Parameters use Hugging Face names and layouts: a linear weight is ``[out, in]``.
  A weight may be a plain array or a quantized array (see ``mrs.quant``: it has
  ``linear(x)``, ``dequantize(dtype)`` and ``take_rows(ids, dtype)``); the
  helpers below dispatch on that.
- The KV cache is paged (``mrs.models.kv_cache``): per layer a pool of pages,
  ``(k [P, Hkv, D, page], v [P, Hkv, page, D])`` (heads before rows, so each head's keys
  and values are contiguous, and keys transposed so that ``q . k`` reads a plain
  ``[head_dim, rows]`` matrix, see ``cached_attention``), and one block table ``pages
  [B, n]`` shared by the layers: sequence ``b``'s token at position ``p`` lives in page
  ``pages[b, p // page]``, row ``p % page``. A query at ``p`` attends positions ``<= p``
  (and ``> p - window`` on sliding layers). Positions past the table (padding at
  ``PAD_POSITION``) and unassigned pages (any id outside the pool) write nothing. Without
  a table the cache is contiguous: one page of ``max_seq_len`` rows per sequence
  (``init_cache(config, batch, max_seq_len)``).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mrs.models import kv_cache, paged_attention
from mrs.models.config import SLIDING, ModelConfig
from mrs.models.kv_cache import KVCache, LayerCache, Stage
from mrs.quant import native
from mrs.quant.qarray import QArray, linears

Array = jax.Array
# Stage: decoder layers [start, stop) that one pipeline stage runs (num_device_layers); None: all.

# Padding tokens get this position: far past any cache, so their writes drop.
PAD_POSITION = np.iinfo(np.int32).max // 2


class Injected(NamedTuple):
    """Inputs beyond token ids for a prefill chunk (a vision model's image features).

    ``embeds [B, T, H]`` replace the token embeddings where ``mask [B, T]`` is set. A
    query at ``[b, t]`` also sees the keys at positions ``[span_start, span_end)`` besides
    its causal ones (Gemma 3's bidirectional attention among one image's tokens; an
    empty span, start == end, adds nothing).
    """

    embeds: Array
    mask: Array
    span_start: Array
    span_end: Array


def inject(x: Array, injected: Injected | None) -> Array:
    """Token embeddings ``x [B, T, H]`` with the injected ones in place."""
    if injected is None:
        return x
    return jnp.where(injected.mask[..., None], injected.embeds.astype(x.dtype), x)


def weight(module: nn.Module, name: str, *within: str) -> Any:
    """A parameter as stored (array or quantized array), with a clear error if absent:
    ``name``, or the leaf at ``within`` under it (a submodule's ``weight``, say).

    We read variables directly instead of ``self.param``: models are only ever
    applied to loaded weights, and ``param`` would reject quantized pytrees.
    """
    value = module.get_variable("params", name)
    for key in within:
        value = None if value is None else value.get(key)
    if value is None:
        raise KeyError(f"missing parameter {'.'.join(module.path + (name, *within))}")
    return value


def linear(x: Array, w: Any, bias: Array | None = None) -> Array:
    """``x @ w.T (+ bias)`` for a ``[out, in]`` weight, plain or quantized."""
    if hasattr(w, "linear"):
        y = w.linear(x)
    else:
        y = jnp.einsum("...i,oi->...o", x, w.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(y.dtype)
    return y


def project(module: nn.Module, x: Array, names: tuple[str, ...], use_bias: bool = False) -> list[Array]:
    """The ``Linear`` submodules ``names`` of ``module`` (HF's ``q_proj``, ``k_proj``, ...)
    applied to ``x``; quantized weights in one native kernel call (``qarray.linears``)."""
    ws = [weight(module, name, "weight") for name in names]
    if all(isinstance(w, QArray) for w in ws):
        ys = linears(x, ws)
    else:
        ys = [linear(x, w) for w in ws]
    if not use_bias:
        return ys
    return [y + weight(module, name, "bias").astype(y.dtype) for y, name in zip(ys, names)]


def dense_weight(w: Any, dtype: Any) -> Array:
    """A weight as a plain array (quantized ones dequantize), e.g. for embedding lookups."""
    return w.dequantize(dtype) if hasattr(w, "dequantize") else w.astype(dtype)


class Linear(nn.Module):
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        bias = weight(self, "bias") if self.use_bias else None
        return linear(x, weight(self, "weight"), bias)


class RMSNorm(nn.Module):
    eps: float
    unit_offset: bool = False  # gemma scales by (1 + weight)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        w = weight(self, "weight").astype(jnp.float32)
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + w if self.unit_offset else w)).astype(x.dtype)


class LayerNorm(nn.Module):
    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * weight(self, "weight").astype(jnp.float32) + weight(self, "bias").astype(jnp.float32)
        return y.astype(x.dtype)


class Embedding(nn.Module):
    """Token embedding with HF's ``weight [vocab, hidden]``; also serves as a tied head."""

    dtype: Any

    @nn.compact
    def __call__(self, tokens: Array) -> Array:
        table = weight(self, "weight")
        if hasattr(table, "take_rows"):  # quantized tables dequantize only the rows taken
            return table.take_rows(tokens, self.dtype)
        return jnp.take(table, tokens, axis=0, mode="clip").astype(self.dtype)

    def attend(self, x: Array) -> Array:
        return linear(x, weight(self, "weight"))


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # CLIP's
}


class GatedMLP(nn.Module):
    """``down(act(gate(x)) * up(x))``: SwiGLU (llama family) or GeGLU (gemma3), per config."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.config.hidden_activation]
        gate, up = project(self, x, ("gate_proj", "up_proj"))
        return Linear(name="down_proj")(act(gate) * up)


def rope_inv_freq(config: ModelConfig, theta: float, scaled: bool) -> np.ndarray:
    """Inverse frequencies (host constant), with llama3 or linear scaling when configured."""
    dim = config.head_dim
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if scaled and config.rope_llama3_scaling is not None:
        factor, low, high, original = config.rope_llama3_scaling
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv_freq
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = np.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(medium, smoothed, inv_freq)
    if scaled and config.rope_linear_factor is not None:
        inv_freq = inv_freq / config.rope_linear_factor
    return inv_freq.astype(np.float32)


def apply_rope(x: Array, positions: Array, inv_freq: np.ndarray) -> Array:
    """Rotate-half RoPE (HF layout) on ``x [B, T, H, D]`` at ``positions [B, T]``."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def cached_attention(
    q: Array,
    k: Array,
    v: Array,
    cache: LayerCache,
    context: "Context",
    *,
    scale: float,
    window: int | None,
    softcap: float | None = None,
) -> tuple[Array, LayerCache]:
    """One layer's attention through its KV cache: writes the new ``k``/``v`` ``[b, T, Hkv, D]``
    at ``context.positions [b, T]`` (``mrs.models.kv_cache``), then attends ``q [b, T, H, D]``;
    returns ``[b, T, H * D]`` and the cache.

    ``context.kv_len`` (static) limits attention to each sequence's first ``kv_len`` rows,
    so a step over short sequences does not read more. ``b`` may be fewer than the cache's
    sequences: a step may run only the first ``b`` slots (the engine's decode does when
    the others are idle). ``context.spans`` widen each query's view beyond causality.
    A decode step (``T == 1``) reads the pages in place through a kernel: the native one on
    CPU, the Pallas one on GPUs (see ``_decode``).
    """
    pages = None if context.pages is None else context.pages[: k.shape[0]]
    cache = kv_cache.write(cache, k, v, context.positions, pages)
    kv_len = min(context.kv_len or kv_cache.capacity(cache, pages), kv_cache.capacity(cache, pages))
    options = dict(scale=scale, window=window, softcap=softcap, kv_len=kv_len)
    if q.shape[1] == 1 and context.spans is None:
        out = _decode(q, cache, pages, context.positions, **options)
    else:
        out = _attend(q, cache, pages, context.positions, **options, spans=context.spans)
    return out, cache


def _decode(q: Array, cache: LayerCache, pages: Array | None, positions: Array, **options: Any) -> Array:
    """A decode step's attention: the native kernel when compiling for CPU, the Pallas kernel
    for CUDA and ROCm, each where it takes the shapes and dtypes; XLA's ``_attend`` otherwise
    and inside ``native.xla_only()`` (mesh steps: the kernels have no partitioning rule)."""
    xla = partial(_attend, **options)
    if not native.kernels_allowed():
        return xla(q, cache, pages, positions)
    native_ok = _native_decode_ok(q.dtype, cache[0].dtype, cache[1].dtype, q.shape[3])
    cpu = partial(_kernel_decode, native.decode_attention, **options) if native_ok else xla
    gpu = (partial(_kernel_decode, paged_attention.paged_decode_attention, **options)
           if paged_attention.supported(q, *cache) else None)
    return native.cpu_or_xla(cpu, xla, q, cache, pages, positions, gpu=gpu)


def _native_decode_ok(q_dtype: Any, k_dtype: Any, v_dtype: Any, head_dim: int) -> bool:
    return all(d == jnp.float32 for d in (q_dtype, k_dtype, v_dtype)) and head_dim % 8 == 0 and native.available()


def decode_reads_lengths(config: ModelConfig, kv_dtype: Any) -> bool:
    """Whether a decode step's attention reads each sequence's length at run time, so that its
    cost does not grow with the static ``kv_len``: the native CPU kernel, where it applies
    (steps compiled for the CPU, float32 queries and cache). One attention-length variant of
    decode then serves every length (``mrs.engine.engine``)."""
    kv = jnp.dtype(kv_dtype)
    return jax.default_backend() == "cpu" and _native_decode_ok(config.jnp_dtype, kv, kv, config.head_dim)


def _kernel_decode(kernel: Callable[..., Array], q: Array, cache: LayerCache, pages: Array | None,
                   positions: Array, **options: Any) -> Array:
    """``kernel`` (``native.decode_attention``'s contract) on ``q [b, 1, H, D]`` grouped by KV head."""
    batch, _, heads, dim = q.shape
    kv_heads = cache[0].shape[1]
    grouped = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    out = kernel(grouped, *cache, kv_cache.table(pages, batch), positions[:, 0], **options)
    return out.reshape(batch, 1, heads * dim)


def _attend(q: Array, cache: LayerCache, pages: Array | None, positions: Array, *, scale: float,
            window: int | None, softcap: float | None, kv_len: int, spans: tuple[Array, Array] | None = None) -> Array:
    batch, steps, heads, dim = q.shape
    k_cache, v_cache = kv_cache.gather(cache, pages, batch, kv_len)  # the sequences with queries
    kv_heads = k_cache.shape[1]
    q = q.reshape(batch, steps, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bkds->bkgts", q, k_cache.astype(q.dtype)).astype(jnp.float32) * scale
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    key_pos = jnp.arange(kv_len)[None, None, :]
    query_pos = positions[:, :, None]
    valid = key_pos <= query_pos
    if spans is not None:  # an image's tokens see each other both ways; the window still applies (as HF)
        valid |= (key_pos >= spans[0][:, :, None]) & (key_pos < spans[1][:, :, None])
    if window is not None:
        valid &= key_pos > query_pos - window
    # A finite floor keeps padding queries (which see no key) free of NaN.
    scores = jnp.where(valid[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_cache.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v_cache)
    return out.reshape(batch, steps, heads * dim).astype(q.dtype)


class PreNormBlock(nn.Module):
    """The LayerNorm pre-norm block (GPT-2, Kosmos-2): ``x + attention(norm(x))``, then
    ``x + mlp(norm(x))``. A family names the modules, HF's names in ``names``: (attention
    norm, attention, MLP norm, MLP); its attention is ``(x, cache, context) -> (x, cache)``."""

    attention: ClassVar[type[nn.Module]]
    mlp: ClassVar[type[nn.Module]]
    names: ClassVar[tuple[str, str, str, str]]

    config: ModelConfig
    layer: int

    @nn.compact
    def __call__(self, x: Array, cache: LayerCache, context: "Context"):
        c = self.config
        attn_norm, attn, mlp_norm, mlp = self.names
        h, cache = self.attention(c, name=attn)(LayerNorm(c.norm_eps, name=attn_norm)(x), cache, context)
        x = x + h
        return x + self.mlp(c, name=mlp)(LayerNorm(c.norm_eps, name=mlp_norm)(x)), cache


def layer_window(config: ModelConfig, layer: int) -> int | None:
    return config.sliding_window if config.layer_type(layer) == SLIDING else None


def stage_layers(config: ModelConfig, stage: Stage) -> range:
    """The decoder layers a stage runs. The first stage embeds tokens; a later one takes
    the previous stage's hidden states ``[B, T, H]`` instead. Only the last applies the
    final norm and the head; the others return hidden states."""
    return range(*(stage or (0, config.num_layers)))


class Context(NamedTuple):
    """What every decoder layer of one step shares besides its input and its cache:
    the tokens' ``positions [B, T]``, the static ``kv_len``, the attention ``spans`` and
    the KV block table ``pages [B, n]`` (None: the contiguous cache)."""

    positions: Array
    kv_len: int | None
    spans: tuple[Array, Array] | None = None
    pages: Array | None = None


class Backbone(nn.Module):
    """Embed (first stage: with the injected embeddings in place) -> the stage's decoder
    layers -> the final norm (last stage only): ``(inputs, positions, cache, kv_len,
    injected) -> (hidden, token embedding, cache)``. A family declares its layer module
    and HF's names for the parts (overriding ``embed`` or ``final_norm`` where it differs);
    they are built inside ``__call__``, so they become this module's submodules."""

    # Called as layer_module(config, index, name=...): (x, cache, context) -> (x, cache).
    layer_module: ClassVar[type[nn.Module]]
    layer_prefix: ClassVar[str] = "layers"
    embedding_name: ClassVar[str] = "embed_tokens"
    final_norm_name: ClassVar[str] = "norm"

    config: ModelConfig
    stage: Stage = None

    def token_embedding(self) -> Embedding:
        """The token table (a tied LM head reads it too)."""
        return Embedding(self.config.jnp_dtype, name=self.embedding_name)

    def embed(self, table: Embedding, tokens: Array, positions: Array, injected: Injected | None) -> Array:
        """The first stage's input: token embeddings with the injected ones in place (a family
        that scales or adds positions decides whether the injected ones are scaled too)."""
        return inject(table(tokens), injected)

    def layer(self, index: int) -> nn.Module:
        return self.layer_module(self.config, index, name=f"{self.layer_prefix}_{index}")

    def final_norm(self) -> nn.Module:
        return LayerNorm(self.config.norm_eps, name=self.final_norm_name)

    @nn.compact
    def __call__(self, inputs: Array, positions: Array, cache: KVCache, kv_len: int | None,
                 injected: Injected | None = None, pages: Array | None = None) -> tuple[Array, Embedding, KVCache]:
        layers = stage_layers(self.config, self.stage)
        table = self.token_embedding()
        x = self.embed(table, inputs, positions, injected) if layers.start == 0 else inputs
        spans = None if injected is None else (injected.span_start, injected.span_end)
        context = Context(positions, kv_len, spans, pages)
        new_cache = []
        for i in layers:
            x, layer_cache = self.layer(i)(x, cache[i - layers.start], context)
            new_cache.append(layer_cache)
        if layers.stop == self.config.num_layers:
            x = self.final_norm()(x)
        return x, table, tuple(new_cache)


class CausalLM(nn.Module):
    """``(tokens [B,T], positions [B,T], cache) -> (float32 logits, cache)``, for every family.

    ``logits_at [B]`` keeps only those time steps (logits ``[B, V]``); ``kv_len``
    (static) bounds the cache rows attention reads; ``injected`` (a vision prefill) puts
    embeddings at marked positions, see ``Injected``; ``pages [B, n]`` is the KV block
    table (``mrs.models.kv_cache``; None: the contiguous cache). ``stage`` (num_device_layers)
    runs only those decoder layers, see ``stage_layers``. A family subclasses this
    and names its decoder stack (a ``Backbone``) and HF's name for it.
    """

    backbone_module: ClassVar[type[Backbone]]
    backbone_name: ClassVar[str] = "model"

    config: ModelConfig
    stage: Stage = None

    @nn.compact
    def __call__(
        self,
        tokens: Array,
        positions: Array,
        cache: KVCache,
        logits_at: Array | None = None,
        kv_len: int | None = None,
        injected: Injected | None = None,
        pages: Array | None = None,
    ):
        backbone = self.backbone_module(self.config, self.stage, name=self.backbone_name)
        hidden, embed, cache = backbone(tokens, positions, cache, kv_len, injected, pages)
        return lm_logits(hidden, embed, self.config, logits_at, self.stage), cache


def lm_logits(
    hidden: Array, embed: Embedding, config: ModelConfig, logits_at: Array | None, stage: Stage = None
) -> Array:
    """The LM head every family shares: float32 logits at ``logits_at`` (all steps when None).

    Call it inside the causal-LM module's compact ``__call__``: an untied head is
    that module's ``lm_head`` submodule. A stage before the last has no head: its
    hidden states go on to the next stage as they are.
    """
    if stage_layers(config, stage).stop < config.num_layers:
        return hidden
    hidden = select_logits(hidden, logits_at)
    logits = embed.attend(hidden) if config.tie_word_embeddings else Linear(name="lm_head")(hidden)
    logits = logits.astype(jnp.float32)
    if config.final_logit_softcapping is not None:
        cap = config.final_logit_softcapping
        logits = jnp.tanh(logits / cap) * cap
    return logits


def select_logits(hidden: Array, logits_at: Array | None) -> Array:
    """Keep the hidden state at ``logits_at [B]`` only (prefill needs just the last token)."""
    if logits_at is None:
        return hidden
    return jnp.take_along_axis(hidden, logits_at[:, None, None], axis=1)[:, 0]
