"""Gemma 3 text (``Gemma3ForCausalLM``, and the text tower of ``Gemma3ForConditionalGeneration``),
on the shared rotary decoder (``mrs.models.decoder``) with all its Gemma flags set.

Differences from llama that matter for parity with HF transformers:
- layers alternate sliding-window and global attention (``config.layer_types``),
  and each kind has its own RoPE base (``rope_local_theta`` unscaled for sliding,
  ``rope_theta`` with optional linear scaling for global);
- q and k are RMS-normalized per head (QK-norm) before RoPE;
- every RMSNorm scales by ``1 + weight``; besides the input and final norms
  there are post-attention, pre-feedforward and post-feedforward norms;
- the embedding is multiplied by ``sqrt(hidden)`` cast to the model dtype first
  (in bfloat16 that rounds, e.g. sqrt(640) -> 25.25; HF does the same);
- the softmax scale is ``query_pre_attn_scalar ** -0.5``; an optional tanh softcap
  on the final logits (HF ignores ``attn_logit_softcapping`` for Gemma 3, so do we);
  GeGLU MLP (gelu tanh).
"""

from __future__ import annotations

from typing import Any

from mrs.models import gemma3_vision
from mrs.models.config import FULL, SLIDING, ModelConfig
from mrs.models.decoder import DecoderForCausalLM
from mrs.models.family import LLAMA_CPP_PROJECTIONS, Family, GgufTables, Vision, renamed

# Tensor-name prefixes of the multimodal checkpoint's text tower, mapped to ours.
HF_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
               ("language_model.lm_head.", "lm_head."))
# Multimodal-only tensors that a text-only model skips.
SKIPPED_PREFIXES = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.")


def hf_name(name: str) -> str | None:
    """Our name for a HF tensor name, or None for tensors the text model does not use."""
    if name.startswith(SKIPPED_PREFIXES):
        return None
    for old, new in HF_PREFIXES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _rope_for(hf: dict, layer_type: str) -> dict:
    """The RoPE parameters of one layer type, from the v5 or the legacy config layout."""
    params = hf.get("rope_parameters") or {}
    if layer_type in params:
        return dict(params[layer_type] or {})
    if layer_type == SLIDING:
        return {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0)}
    scaling = dict(hf.get("rope_scaling") or {})
    scaling.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    return scaling


def _layer_types(hf: dict, layers: int) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    pattern = hf.get("sliding_window_pattern", 6)
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(layers))


def config_from_hf(hf: dict, dtype: str = "float32") -> ModelConfig:
    """ModelConfig from a ``gemma3_text`` config.json, or the text part of a ``gemma3`` one."""
    tied = hf.get("tie_word_embeddings", True)
    if hf.get("model_type") == "gemma3":  # multimodal: tying is decided at the top level
        hf = hf.get("text_config") or {}
    if hf.get("use_bidirectional_attention"):
        raise ValueError("gemma3: use_bidirectional_attention (embedding models) is not supported")
    layers = hf.get("num_hidden_layers", 26)
    heads = hf.get("num_attention_heads", 8)
    local, full = _rope_for(hf, SLIDING), _rope_for(hf, FULL)
    linear_factor = None
    for kind, rope in ((SLIDING, local), (FULL, full)):
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "linear" and kind == FULL:
            linear_factor = float(rope["factor"])
        elif rope_type != "default":
            raise ValueError(f"gemma3: unsupported rope_type {rope_type!r} on {kind} layers")
    return ModelConfig(
        arch="gemma3",
        vocab_size=hf.get("vocab_size", 262_208),
        hidden_size=hf.get("hidden_size", 2304),
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", 4),
        head_dim=hf.get("head_dim", 256),
        intermediate_size=hf.get("intermediate_size", 9216),
        max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope_theta=float(full.get("rope_theta", 1_000_000.0)),
        rope_linear_factor=linear_factor,
        rope_local_theta=float(local.get("rope_theta", 10_000.0)),
        attention_bias=bool(hf.get("attention_bias", False)),
        output_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True,
        norm_unit_offset=True,
        sandwich_norms=True,
        embed_scale=True,
        sliding_window=hf.get("sliding_window", 4096),
        layer_types=_layer_types(hf, layers),
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)),
        final_logit_softcapping=hf.get("final_logit_softcapping"),
        # HF's Gemma 3 accepts attn_logit_softcapping but never applies it (real
        # checkpoints set null); ignoring it too keeps parity with the reference.
        attn_logit_softcapping=None,
        hidden_activation=hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh",
        tie_word_embeddings=bool(tied),
        dtype=dtype,
    )


def _gguf_config(g: Any, hf: dict[str, Any]) -> dict[str, Any]:
    layers, heads = hf["num_hidden_layers"], hf["num_attention_heads"]
    # llama.cpp hard-codes these for gemma3 (llama-model.cpp, LLM_ARCH_GEMMA3): sliding
    # layers use base 10000, every 6th layer is global, and the attention scale is
    # 1/sqrt(hidden/heads) for the 27B model (62 layers), else 1/sqrt(head_dim).
    return hf | {
        "model_type": "gemma3_text", "hidden_activation": "gelu_pytorch_tanh",
        "rope_theta": float(g.get("gemma3.rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": 10_000.0, "sliding_window_pattern": 6,
        "query_pre_attn_scalar": hf["hidden_size"] // heads if layers == 62 else hf["head_dim"],
        "sliding_window": int(g.require("gemma3.attention.sliding_window")),
    }


FAMILY = Family(
    archs=("gemma3",),
    module=DecoderForCausalLM,
    config_from_hf=config_from_hf,
    model_types={"gemma3": "gemma3", "gemma3_text": "gemma3"},
    hf_classes={"Gemma3ForCausalLM": "gemma3", "Gemma3ForConditionalGeneration": "gemma3"},
    hf_tensor=renamed(hf_name),
    foreign_prefixes=SKIPPED_PREFIXES,
    gguf={"gemma3": GgufTables(
        _gguf_config,
        block=LLAMA_CPP_PROJECTIONS | {
            "attn_norm": "input_layernorm",
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
            "attn_q_norm": "self_attn.q_norm",
            "attn_k_norm": "self_attn.k_norm",
        },
        hf_class="Gemma3ForCausalLM", norms_offset=True)},
    vision=Vision(gemma3_vision.ImageEncoder, gemma3_vision.spec_from_hf, gemma3_vision.hf_name),
)
