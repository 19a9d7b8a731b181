"""A tiny random-weight Gemma 3 vision checkpoint (``Gemma3ForConditionalGeneration`` with its
``Gemma3Processor``), built locally for parity tests.

The tokenizer is ``hf_checkpoints``' byte-level BPE with Gemma 3's special tokens appended
(``<image_soft_token>`` last, as in the real vocabulary); the chat template is Gemma 3's own.
The processor expands each ``<start_of_image>`` into ``\\n\\n<start_of_image>`` + 4
``<image_soft_token>`` + ``<end_of_image>\\n\\n``, as the real one does with 256.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hf_checkpoints import EOS, byte_level_tokenizer, random_model
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
)

torch.set_num_threads(1)

BASE_VOCAB = 504  # the byte-level BPE part; Gemma's 8 specials follow it, 512 ids in all
# In Gemma's order (pad, eos, bos, ..., <image_soft_token> last); ids BASE_VOCAB + index.
SPECIALS = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>",
            "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
IDS = {token: BASE_VOCAB + i for i, token in enumerate(SPECIALS)}
PAD_ID, EOS_ID, BOS_ID = IDS["<pad>"], IDS["<eos>"], IDS["<bos>"]
END_OF_TURN_ID = IDS["<end_of_turn>"]
BOI_ID, EOI_ID, IMAGE_TOKEN_ID = IDS["<start_of_image>"], IDS["<end_of_image>"], IDS["<image_soft_token>"]

IMAGE_SIZE = 32        # SigLIP input side
PATCH_SIZE = 8         # 4 x 4 = 16 patches
MM_TOKENS_PER_IMAGE = 4  # the projector average-pools 4 x 4 -> 2 x 2

# Gemma 3's chat template (google/gemma-3-4b-it), verbatim: image parts become <start_of_image>.
CHAT_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""


def gemma3_tokenizer() -> PreTrainedTokenizerFast:
    """``byte_level_tokenizer``'s BPE (its EOS slot renamed to a filler) plus Gemma 3's specials
    at ``IDS``; BOS is prepended on ``add_special_tokens=True``, as Gemma's tokenizer does."""
    spec = json.loads(byte_level_tokenizer(BASE_VOCAB).backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[f"<unused_{vocab.pop(EOS)}>"] = BASE_VOCAB - 1
    spec["added_tokens"] = []
    spec["post_processor"] = None
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert all(tok.token_to_id(t) == i for t, i in IDS.items())
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", add_bos_token=True,
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        chat_template=CHAT_TEMPLATE)


def gemma3_processor() -> Gemma3Processor:
    """Gemma3's own image processor at ``IMAGE_SIZE`` (bilinear resize to a square, rescale 1/255,
    mean/std 0.5, no pan-and-scan) and the tokenizer, expanding a boi into MM_TOKENS_PER_IMAGE."""
    images = Gemma3ImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Gemma3Processor(images, gemma3_tokenizer(), chat_template=CHAT_TEMPLATE,
                           image_seq_length=MM_TOKENS_PER_IMAGE)


def gemma3_vision_config(vocab_size: int = BASE_VOCAB + len(SPECIALS), sliding_window: int = 128) -> Gemma3Config:
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False)
    text = Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, max_position_embeddings=256,
        sliding_window=sliding_window, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}},
        pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID])
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
                        boi_token_index=BOI_ID, eoi_token_index=EOI_ID, image_token_index=IMAGE_TOKEN_ID)


def gemma3_vision_model(seed: int = 0, sliding_window: int = 128,
                        config: Gemma3Config | None = None) -> Gemma3ForConditionalGeneration:
    """Random weights, eager attention, float32. Every tensor is drawn (HF would leave the
    projector matrix and the ``1 + w`` norms at zero): matrices ~ N(0, 1/fan_in), biases and
    norm weights ~ N(0, 0.1) around their 0 (LayerNorm weights: 1), the word embeddings
    N(0, 0.05) (scaled by sqrt(64) on input; tied to the head), SigLIP positions N(0, 0.2).
    ``config`` replaces the tiny default (tools/bench_vision.py builds larger shapes)."""
    config = config or gemma3_vision_config(sliding_window=sliding_window)
    def spread(name: str, p: torch.Tensor) -> tuple[float, float]:
        if name.endswith("embed_tokens.weight"):
            return 0.05, 0.0
        if name.endswith("position_embedding.weight"):
            return 0.2, 0.0
        if name.endswith("mm_input_projection_weight"):  # [vision hidden, text hidden], x @ W
            return p.shape[0] ** -0.5, 0.0
        if p.dim() == 1:
            is_layer_norm = ".layer_norm" in name or "post_layernorm" in name
            return 0.1, (1.0 if is_layer_norm and name.endswith(".weight") else 0.0)
        return p[0].numel() ** -0.5, 0.0  # linear [out, in] and the patch conv [out, 3, k, k]

    model = random_model(Gemma3ForConditionalGeneration, config, seed, spread)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, END_OF_TURN_ID],
                                               pad_token_id=PAD_ID, do_sample=False)
    return model


# Tensor-name layouts, as renames of transformers 5's in-memory names (model.language_model.*,
# model.vision_tower.* with no vision_model level, model.multi_modal_projector.*; lm_head is tied).
LAYOUTS = {
    # google/gemma-3-*-it on the hub
    "hub": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower.vision_model."),
            ("model.multi_modal_projector.", "multi_modal_projector.")),
    # transformers 5 save_pretrained (its default save_original_format=True): no vision_model level
    "save_pretrained": (("model.language_model.", "language_model.model."), ("model.vision_tower.", "vision_tower."),
                        ("model.multi_modal_projector.", "multi_modal_projector.")),
    # transformers 5 in memory (save_pretrained(save_original_format=False))
    "model": (),
}


def _renamed(name: str, layout: str) -> str:
    for old, new in LAYOUTS[layout]:
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def tiny_gemma3_vision(path: Path, *, layout: str = "hub", seed: int = 0, sliding_window: int = 128) -> Path:
    """Write the checkpoint into ``path``: config.json, generation_config.json, model.safetensors
    (float32, tensor names as ``LAYOUTS[layout]``: the hub's by default), tokenizer.json,
    tokenizer_config.json, processor_config.json (the image processor's settings nested) and
    chat_template.jinja. Every layout loads in transformers 5 to the same weights."""
    path = Path(path)
    processor = gemma3_processor()
    model = gemma3_vision_model(seed=seed, sliding_window=sliding_window)
    assert model.config.text_config.vocab_size == len(processor.tokenizer)
    model.save_pretrained(path, save_original_format=False)
    tensors = load_file(path / "model.safetensors")
    save_file({_renamed(k, layout): v for k, v in tensors.items()}, path / "model.safetensors", metadata={"format": "pt"})
    processor.save_pretrained(path)
    return path


def tiny_image(seed: int = 0, size: tuple[int, int] = (40, 48)) -> Image.Image:
    """A deterministic random RGB image, ``size`` = (width, height) as PIL has it; not square,
    so the processor resizes it."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")
