"""A tiny random-weight Kosmos-2 checkpoint (``Kosmos2ForConditionalGeneration`` with its
``Kosmos2Processor``), built locally for parity tests.

The tokenizer is a byte-level BPE with XLM-R's four specials first (``<s>`` 0, ``<pad>`` 1,
``</s>`` 2, ``<unk>`` 3, as Kosmos-2's vocabulary has them); the processor appends its tag
and 1,024 patch-index tokens and fills an image's 64 latent-query positions with the ids
after ``<unk>``, exactly as the real one does. The image processor is CLIP's at 32 pixels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hf_checkpoints import CORPUS, random_model
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    GenerationConfig,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
    Kosmos2Processor,
    PreTrainedTokenizerFast,
)

torch.set_num_threads(1)

SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(4)
IMAGE_SIZE = 32   # CLIP input side
PATCH_SIZE = 8    # 4 x 4 patches + the class token
LATENT_QUERIES = 64  # Kosmos2Processor's num_image_tokens default; the projector's latent queries


def kosmos2_tokenizer(base_vocab: int = 300) -> PreTrainedTokenizerFast:
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=base_vocab, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(CORPUS * 4, trainer)
    spec = json.loads(trained.to_str())
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    assert [tok.token_to_id(t) for t in SPECIALS] == [BOS_ID, PAD_ID, EOS_ID, UNK_ID]
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def kosmos2_processor() -> Kosmos2Processor:
    """CLIP's preprocessing at IMAGE_SIZE (resize the short side, centre crop, CLIP mean/std)."""
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                   crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return Kosmos2Processor(images, kosmos2_tokenizer())


def kosmos2_config(vocab_size: int, tied: bool = False) -> Kosmos2Config:
    text = dict(vocab_size=vocab_size, embed_dim=64, layers=2, attention_heads=4, ffn_dim=128,
                max_position_embeddings=256, activation_function="gelu", scale_embedding=True,
                pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, tie_word_embeddings=tied)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_act="quick_gelu")
    return Kosmos2Config(text_config=text, vision_config=vision, latent_query_num=LATENT_QUERIES, tie_word_embeddings=tied)


def kosmos2_model(vocab_size: int, seed: int = 0, tied: bool = False,
                  config: Kosmos2Config | None = None) -> Kosmos2ForConditionalGeneration:
    """Random weights, eager attention, float32: matrices ~ N(0, 1/fan_in), biases N(0, 0.1),
    LayerNorm weights 1 + N(0, 0.1), word embeddings N(0, 0.2) (scaled by sqrt(64) on input),
    the latent queries and the class and position embeddings N(0, 0.5). The head is untied by
    default: tied to random embeddings, greedy decoding falls into repeating one token, which
    would make token parity a weak test (the real checkpoint is tied; ``tied=True`` builds that).
    ``config`` replaces the tiny default (tools/bench_vision.py builds larger shapes)."""
    config = config or kosmos2_config(vocab_size, tied)
    def spread(name: str, p: torch.Tensor) -> tuple[float, float]:
        if name.endswith("embed_tokens.weight"):
            return 0.2, 0.0
        if name.endswith(("latent_query", "class_embedding", "position_embedding.weight")):
            return 0.5, 0.0
        if p.dim() == 1:
            is_norm = "norm" in name or "_ln" in name
            return 0.1, (1.0 if is_norm and name.endswith(".weight") else 0.0)
        return p[0].numel() ** -0.5, 0.0  # linear [out, in] and the patch conv [out, 3, k, k]

    model = random_model(Kosmos2ForConditionalGeneration, config, seed, spread)
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                                               do_sample=False)
    return model


def tiny_kosmos2(path: Path, seed: int = 0, tied: bool = False) -> Path:
    """Write the checkpoint into ``path`` as ``save_pretrained`` does (config.json,
    model.safetensors, the tokenizer and processor_config.json)."""
    path = Path(path)
    processor = kosmos2_processor()
    model = kosmos2_model(len(processor.tokenizer), seed=seed, tied=tied)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
