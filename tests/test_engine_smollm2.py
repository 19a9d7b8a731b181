"""The engine on the real SmolLM2-135M GGUF: greedy tokens equal HF transformers'
``generate`` for 32 tokens, for two different prompts decoding in the same batch."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch

from mrs.config.schema import GGUF, EngineConfig, ModelEntry, ModelSource
from mrs.engine.engine import Engine
from mrs.engine.types import Finish, GenerationRequest, SamplingParams, TokenDelta
from mrs.loading.chat_template import render_chat
from mrs.loading.load import load_checkpoint

STEPS = 32


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf: Path, hf_smollm2_gguf_model):
    # dequantized like the reference; warm-up off: the test compiles just the shapes it uses
    entry = ModelEntry(model_id="smollm2", model=ModelSource(kind=GGUF, quantized_model_id=str(smollm2_gguf)),
                       dequantize_gguf=True)
    checkpoint = load_checkpoint(entry)
    engine = Engine(checkpoint, EngineConfig(max_batch=2, max_seq_len=128, prefill_buckets=[64], warmup=False))
    yield checkpoint, engine.start(), hf_smollm2_gguf_model
    engine.shutdown()


def hf_generate(reference, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=STEPS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_greedy_tokens_equal_hf_generate_in_one_batch(smollm2) -> None:
    checkpoint, engine, reference = smollm2
    tok = checkpoint.tokenizer
    chat = render_chat(checkpoint.chat_template, [{"role": "user", "content": "What is the capital of France?"}],
                       tok, model_id="smollm2")
    prompts = [tok.encode(chat, add_special_tokens=False), tok.encode("def fibonacci(n):\n    ")]
    params = SamplingParams(temperature=0.0, max_tokens=STEPS, ignore_eos=True)

    async def both() -> list[tuple[list[int], str]]:
        streams = [engine.submit(GenerationRequest(ids, params)) for ids in prompts]

        async def collect(stream):
            ids, text, reason = [], "", None
            async for event in stream:
                if isinstance(event, TokenDelta):
                    ids, text = ids + event.token_ids, text + event.text
                elif isinstance(event, Finish):
                    reason = event.reason
            assert reason == "length"
            return ids, text

        return await asyncio.gather(*(collect(s) for s in streams))

    results = asyncio.run(both())
    for ids, (tokens, text) in zip(prompts, results):
        expected = hf_generate(reference, ids)
        assert tokens == expected
        assert text == tok.decode(expected, skip_special_tokens=True)
    assert results[0][1].startswith("The capital of France is Paris.")
