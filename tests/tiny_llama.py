"""A tiny random-weight Llama (built by transformers) with a byte-level tokenizer.

Fast enough for engine tests; the torch model doubles as the logits reference.
Every byte is its own token, so any multi-character string spans tokens.
"""

from __future__ import annotations

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mrs.loading.checkpoint import Checkpoint
from mrs.models.llama import config_from_hf
from mrs.models.params import nest

VOCAB = 260  # 256 bytes, <s>, </s> and two unused ids
BOS, EOS = 256, 257


def byte_tokenizer() -> PreTrainedTokenizerFast:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, max_positions: int = 512, layers: int = 2) -> tuple[Checkpoint, LlamaForCausalLM]:
    """A random Llama with peaked logits (large init) so greedy ties are unlikely."""
    hf_config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.15, bos_token_id=BOS, eos_token_id=EOS, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    reference = LlamaForCausalLM(hf_config).eval()
    params = nest((name, np.asarray(t.detach().numpy())) for name, t in reference.state_dict().items())
    checkpoint = Checkpoint(
        config=config_from_hf(hf_config.to_dict()),
        params=params,
        tokenizer=byte_tokenizer(),
        eos_token_ids=(EOS,),
        bos_token_id=BOS,
        add_bos=True,
        chat_template=None,
        source=f"tiny random llama (seed {seed})",
    )
    return checkpoint, reference
