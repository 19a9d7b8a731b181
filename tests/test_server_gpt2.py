"""Issue 6's server checks: the seed's GPT-2 examples with local random-weight checkpoints.

- ``mrs-server --port P plain -m <DialoGPT-medium-shaped dir> -a gpt2`` answers a chat
  request (the checkpoint has no template: the gpt2 family's fallback applies and the
  startup log says so).
- The seed's Example 1: two GPT-2 models in one multi-model JSON, served by id.
"""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import torch
from hf_checkpoints import hf_model, save_checkpoint
from server_process import BIN, TINY_ENGINE, TINY_ENGINE_CONFIG, jax_cache_env, start

import mrs

PROMPT_IDS = [11, 22, 33, 44]
STEPS = 8
# DialoGPT-medium's shape (the vocabulary stays small: the tokenizer is trained here).
DIALOGPT_MEDIUM = dict(n_layer=24, n_embd=1024, n_head=16, n_positions=1024, n_ctx=1024)


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", _strict_response_validation=True,
                         max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def dialogpt_medium(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # bfloat16 on disk halves the write; the server loads it as float32 (its --dtype default).
    return save_checkpoint(hf_model("gpt2", **DIALOGPT_MEDIUM), tmp_path_factory.mktemp("gpt2") / "DialoGPT-medium",
                           dtype=torch.bfloat16)


def test_seed_single_model_command_with_dialogpt_shape(dialogpt_medium: Path, tmp_path: Path) -> None:
    server = start([str(BIN / "mrs-server"), *TINY_ENGINE, "plain", "-m", str(dialogpt_medium), "-a", "gpt2"],
                   tmp_path / "dialogpt.log", jax_cache_env())
    try:
        server.wait_ready()
        client = _client(server.url)
        reply = client.chat.completions.create(model=str(dialogpt_medium), max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Hello, how are you?"}])
        assert reply.choices[0].finish_reason in ("stop", "length")
        assert reply.usage.prompt_tokens > 0 and reply.usage.completion_tokens >= 1
        models = client.models.list().data
        assert [m.id for m in models] == [str(dialogpt_medium)]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert "fallback chat template in use" in server.output()


@pytest.fixture(scope="module")
def two_gpt2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("example1")
    small = save_checkpoint(hf_model("gpt2"), root / "gpt2")
    torch.manual_seed(1)
    large = save_checkpoint(hf_model("gpt2", n_layer=3, n_embd=96, n_head=6), root / "gpt2-large")
    return small, large


def _greedy(path: Path) -> str:
    entry = {"model_id": path.name, "model": {"kind": "plain", "model_id": str(path)}}
    with mrs.load(entry, TINY_ENGINE_CONFIG) as pipe:
        return pipe.generate(PROMPT_IDS, max_tokens=STEPS, ignore_eos=True).text


def test_seed_example_1_two_gpt2_models(two_gpt2: tuple[Path, Path], tmp_path: Path) -> None:
    small, large = two_gpt2
    config = tmp_path / "example-1.json"  # the seed's Example 1 with local paths for the hub ids
    config.write_text(json.dumps([
        {"model_id": "gpt2-small", "model": {"Plain": {"model_id": str(small)}}},
        {"model_id": "gpt2-large", "model": {"Plain": {"model_id": str(large)}}},
    ]))
    expected = {"gpt2-small": _greedy(small), "gpt2-large": _greedy(large)}
    assert expected["gpt2-small"] != expected["gpt2-large"]
    server = start([str(BIN / "mrs-server"), *TINY_ENGINE, "--multi-model", "--multi-model-config", str(config)],
                   tmp_path / "example1.log", jax_cache_env())
    try:
        server.wait_ready()
        client = _client(server.url)
        assert [m.id for m in client.models.list().data] == ["gpt2-small", "gpt2-large"]
        for model_id, text in expected.items():
            reply = client.completions.create(model=model_id, prompt=PROMPT_IDS, max_tokens=STEPS, temperature=0,
                                              extra_body={"ignore_eos": True})
            assert reply.choices[0].text == text and reply.model == model_id
        # no default given: the first model answers "default"
        reply = client.completions.create(model="default", prompt=PROMPT_IDS, max_tokens=STEPS, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert reply.model == "gpt2-small" and reply.choices[0].text == expected["gpt2-small"]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
