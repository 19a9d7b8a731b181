"""Tiny random-weight Hugging Face checkpoints for tests, and greedy decoders on both sides.

No hub here, so checkpoints come from transformers configs with random weights and a
byte-level BPE tokenizer trained on a few sentences (padded with unused entries to the
model's vocabulary size, EOS last, as GPT-2 lays it out).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from mrs.models.config import ModelConfig
from mrs.models.kv_cache import init_cache
from mrs.models.layers import PAD_POSITION
from mrs.models.registry import build_model

# Tiny models on a shared 2-core box: torch's thread pool only adds contention.
torch.set_num_threads(1)

EOS = "<|endoftext|>"
CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "def greet(name):\n    return f'Hello, {name}!'\n",
    "Once upon a time there was a small model that answered questions.",
    "Numbers: 1 2 3 10 100 3.14; symbols (a+b)*c = d.",
]
PROMPTS = ["The capital of France is", "def greet(name):", "Once upon a time"]

SMALL = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A GPT-2-style byte-level BPE tokenizer with exactly ``vocab_size`` ids, EOS last."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size - 1, 400), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    trained.train_from_iterator(CORPUS * 4, trainer)
    vocab = trained.get_vocab()
    merges = [tuple(m) for m in json.loads(trained.to_str())["model"]["merges"]]
    # Unused fillers make every model id decodable; no merge produces them.
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"<unused_{i}>"] = i
    vocab[EOS] = vocab_size - 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS)


def hf_model(kind: str, **overrides) -> torch.nn.Module:
    """A random-weight HF model of one family; norms are perturbed so they matter."""
    eos = dict(eos_token_id=SMALL["vocab_size"] - 1, bos_token_id=SMALL["vocab_size"] - 1)
    if kind == "llama":
        config = LlamaConfig(**SMALL, **eos, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 10000.0})
        cls = LlamaForCausalLM
    elif kind == "mistral":
        config = MistralConfig(**SMALL, **eos, sliding_window=8, tie_word_embeddings=False)
        cls = MistralForCausalLM
    elif kind == "qwen2":
        config = Qwen2Config(**SMALL, **eos, tie_word_embeddings=True)
        cls = Qwen2ForCausalLM
    elif kind == "gemma3":
        config = Gemma3TextConfig(
            **{**SMALL, "num_hidden_layers": 4}, **eos, head_dim=16, sliding_window=8,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            query_pre_attn_scalar=24, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        cls = Gemma3ForCausalLM
    elif kind == "gpt2":
        config = GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                            bos_token_id=511, eos_token_id=511)
        cls = GPT2LMHeadModel
    else:
        raise ValueError(kind)
    for key, value in overrides.items():
        setattr(config, key, value)
    config._attn_implementation = "eager"  # the plain reference (softcaps need it anyway)
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # norms and biases: away from their 0/1 init
                p.add_(torch.randn_like(p) * 0.1)
            elif any(table in name for table in ("embed_tokens", "wte", "wpe", "lm_head")):
                # gemma3 multiplies embeddings by sqrt(hidden): keep the product comparable
                p.normal_(0.0, 0.02 if kind == "gemma3" else 0.08)
            else:  # strong layers: with weak ones a tied head just repeats the last token
                p.normal_(0.0, 0.15)
    return model


def dialogpt_medium_shaped() -> GPT2LMHeadModel:
    """Random weights in DialoGPT-medium's exact shape (24 x 1024, 16 heads, 1024 positions,
    vocab 50257), HF's init scale. Built on the meta device and filled in place: HF's
    per-module init of 355M parameters is several times slower."""
    config = GPT2Config(n_embd=1024, n_layer=24, n_head=16, n_positions=1024, vocab_size=50257,
                        bos_token_id=50256, eos_token_id=50256)
    config._attn_implementation = "eager"
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
    model = model.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
            else:  # LayerNorm weights near 1, biases near 0
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02 + (1.0 if name.endswith("ln_1.weight")
                        or name.endswith("ln_2.weight") or name.endswith("ln_f.weight") else 0.0))
    model.tie_weights()
    return model


def random_model(model_class: type, config: Any, seed: int,
                 spread: Callable[[str, torch.Tensor], tuple[float, float]]) -> torch.nn.Module:
    """``model_class(config)`` in eval mode, eager attention in every sub-config, each parameter
    redrawn as ``mean + std * N(0, 1)`` with ``(std, mean) = spread(name, p)`` (float64 draws
    from a generator seeded with ``seed``: the same numbers on every machine), ties re-applied."""
    subs = (getattr(config, key, None) for key in ("text_config", "vision_config"))
    for c in (config, *(sub for sub in subs if sub is not None)):
        c._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_class(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std, mean = spread(name, p)
            p.copy_((torch.randn(p.shape, generator=generator, dtype=torch.float64) * std + mean).float())
    model.tie_weights()
    return model


def save_checkpoint(model: torch.nn.Module, path: Path, *, dtype: torch.dtype | None = None,
                    max_shard_size: str | None = None) -> Path:
    """``save_pretrained`` (safetensors) plus a matching tokenizer."""
    if dtype is not None:
        model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    byte_level_tokenizer(model.config.vocab_size).save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def jitted_apply(config: ModelConfig):
    """One jitted apply per config, so checkpoints of the same shape share compiles."""
    return jax.jit(build_model(config).apply)


def _padded(ids: list[int], start: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """``[1, width]`` tokens and positions; the tail is padding at PAD_POSITION."""
    tokens = np.zeros((1, width), np.int32)
    tokens[0, :len(ids)] = ids
    positions = np.full((1, width), PAD_POSITION, np.int32)
    positions[0, :len(ids)] = np.arange(start, start + len(ids))
    return tokens, positions


def mrs_generate(config: ModelConfig, params: dict, prompt: list[int], steps: int, bucket: int = 16,
                 cache_len: int = 64, decode_width: int = 1) -> tuple[np.ndarray, list[int]]:
    """Prompt logits ``[T, V]`` and greedy tokens through the model contract: a padded
    prefill (padding at PAD_POSITION), then one-token decode steps on the cache.

    ``decode_width=bucket`` decodes in the prefill's shape (the token, then padding):
    one compile instead of two, for the big models.
    """
    apply = jitted_apply(config)
    length = len(prompt)
    assert length + steps <= cache_len, "raise cache_len"
    cache = init_cache(config, 1, cache_len)
    tokens, positions = _padded(prompt, 0, -(-length // bucket) * bucket)
    logits, cache = apply({"params": params}, tokens, positions, cache)
    prompt_logits = np.asarray(logits[0, :length])
    out = [int(np.argmax(prompt_logits[-1]))]
    for i in range(steps - 1):
        tokens, positions = _padded(out[-1:], length + i, decode_width)
        logits, cache = apply({"params": params}, tokens, positions, cache)
        out.append(int(jnp.argmax(logits[0, 0])))
    return prompt_logits, out


def hf_generate(model: torch.nn.Module, prompt: list[int], steps: int,
                incremental: bool = False) -> tuple[np.ndarray, list[int]]:
    """Prompt logits and greedy tokens. By default each step recomputes the whole sequence
    (no cache: an independent check of our incremental decode); ``incremental`` uses HF's
    own KV cache instead, for models where recomputing costs too much."""
    ids = list(prompt)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), use_cache=incremental)
        prompt_logits = out.logits[0].float().numpy()
        ids.append(int(np.argmax(prompt_logits[-1])))
        for _ in range(steps - 1):
            if incremental:
                out = model(input_ids=torch.tensor([ids[-1:]]), cache=out.cache, use_cache=True)
            else:
                out = model(input_ids=torch.tensor([ids]))
            ids.append(int(torch.argmax(out.logits[0, -1])))
    return prompt_logits, ids[len(prompt):]
