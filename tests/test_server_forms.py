"""The other ways to start a server: the seed's single-model ``plain`` form, the Hydra
front door (``mrs serve``), and the interactive terminal chat (``-i``, single-model
``gguf`` form) driven through a pseudo-terminal.

Plain and Hydra use a tiny random-weight Llama checkpoint (fast to compile); the
interactive chat uses the real SmolLM2 GGUF.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import openai
import pexpect
import pytest
from hf_checkpoints import hf_model, save_checkpoint
from server_process import (
    BIN,
    SMALL_ENGINE,
    TINY_ENGINE,
    TINY_ENGINE_CONFIG,
    TINY_ENGINE_HYDRA,
    jax_cache_env,
    start,
)

import mrs

PROMPT_IDS = [5, 17, 42, 99, 7, 3]
STEPS = 10


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("tiny") / "tiny-llama")


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> dict:
    """The pipeline's greedy completion of PROMPT_IDS (ignoring EOS, so always STEPS tokens)."""
    entry = {"model_id": "tiny", "model": {"kind": "plain", "model_id": str(tiny_llama), "arch": "llama"}}
    with mrs.load(entry, TINY_ENGINE_CONFIG) as pipe:
        result = pipe.generate(PROMPT_IDS, max_tokens=STEPS, ignore_eos=True)
    return {"text": result.text, "ids": result.token_ids}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", _strict_response_validation=True,
                         max_retries=0, timeout=300)


def _complete(client: openai.OpenAI, model: str) -> openai.types.Completion:
    return client.completions.create(model=model, prompt=PROMPT_IDS, max_tokens=STEPS, temperature=0,
                                     extra_body={"ignore_eos": True})


def test_seed_single_model_plain_form(tiny_llama: Path, reference: dict, tmp_path: Path) -> None:
    server = start([str(BIN / "mrs-server"), *TINY_ENGINE, "plain", "-m", str(tiny_llama), "-a", "llama"],
                   tmp_path / "plain.log", jax_cache_env())
    try:
        server.wait_ready()
        client = _client(server.url)
        assert [m.id for m in client.models.list().data] == [str(tiny_llama)]  # the model id, as mistral.rs
        result = _complete(client, "default")
        assert result.choices[0].text == reference["text"]
        assert result.usage.completion_tokens == STEPS and result.usage.prompt_tokens == len(PROMPT_IDS)
        assert _complete(client, str(tiny_llama)).choices[0].text == reference["text"]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert "loading model" in server.output() and "ready" in server.output()  # visible progress


def test_hydra_front_door(tiny_llama: Path, reference: dict, tmp_path: Path) -> None:
    config = tmp_path / "models.json"
    config.write_text(json.dumps({"tiny-a": {"Plain": {"model_id": str(tiny_llama), "arch": "llama"}, "alias": "tiny"}}))
    server = start([str(BIN / "mrs"), "serve", f"multi_model_config={config}", "default_model_id=tiny",
                    *TINY_ENGINE_HYDRA, "engine.max_queue=1"], tmp_path / "hydra.log", jax_cache_env())
    try:
        server.wait_ready()
        client = _client(server.url)
        assert [m.id for m in client.models.list().data] == ["tiny"]
        assert _complete(client, "tiny").choices[0].text == reference["text"]
        # 2 slots and a queue of 1: of 6 simultaneous long requests some must get 429.
        statuses = asyncio.run(_burst(server.url, 6))
        assert set(statuses) == {200, 429}, statuses
    finally:
        assert server.stop() == 0, server.output()[-3000:]


async def _burst(url: str, count: int) -> list[int]:
    body = {"model": "tiny", "prompt": PROMPT_IDS, "max_tokens": 100, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        replies = await asyncio.gather(*[client.post("/v1/completions", json=body) for _ in range(count)])
    for reply in replies:
        if reply.status_code == 429:
            assert reply.headers["retry-after"] and reply.json()["error"]["type"] == "rate_limit_error"
    return [reply.status_code for reply in replies]


def test_a_model_that_fails_half_way_through_loading_leaves_the_others_serving(tiny_llama: Path, reference: dict,
                                                                              tmp_path: Path) -> None:
    """Fault injection: the second model's safetensors file is cut in half, so its load fails
    while reading tensors. The first serves; the second is ``failed`` with the reason, its
    requests get 503 naming it, and once the file is whole again ``reload`` brings it up."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_llama, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    config = tmp_path / "models.json"
    config.write_text(json.dumps([{"model_id": m, "model": {"Plain": {"model_id": str(p), "arch": "llama"}}}
                                  for m, p in (("good", tiny_llama), ("broken", broken))]))
    server = start([str(BIN / "mrs-server"), *TINY_ENGINE, "--multi-model", "--multi-model-config", str(config)],
                   tmp_path / "server.log", jax_cache_env())
    try:
        server.wait_ready()
        client = _client(server.url)
        assert _complete(client, "good").choices[0].text == reference["text"]
        status = httpx.post(f"{server.url}/v1/models/status", json={"model_id": "broken"}).json()
        assert status["status"] == "failed" and status["error"]
        with pytest.raises(openai.APIStatusError) as err:
            _complete(client, "broken")
        assert err.value.status_code == 503 and "failed to load" in err.value.message
        shutil.copy(tiny_llama / "model.safetensors", weights)
        reloaded = httpx.post(f"{server.url}/v1/models/reload", json={"model_id": "broken"}, timeout=600).json()
        assert reloaded["status"] == "loaded", reloaded
        assert _complete(client, "broken").choices[0].text == reference["text"]
        assert _complete(client, "good").choices[0].text == reference["text"]
    finally:
        assert server.stop() == 0, server.output()[-3000:]
    assert "'broken' failed to load" in server.output() and "1 of 2 models loaded" in server.output()


def test_interactive_chat_through_a_pty(smollm2_gguf: Path) -> None:
    argv = [*SMALL_ENGINE, "-i", "gguf", "-m", str(smollm2_gguf.parent), "-f", smollm2_gguf.name]
    child = pexpect.spawn(str(BIN / "mrs-server"), argv, env=jax_cache_env(), encoding="utf-8", timeout=900)
    try:
        child.expect(r"ready, chat\. Type \\help")
        child.expect_exact("> ")
        child.sendline("\\help")
        child.expect_exact("\\temperature <t>")
        for command, echo in [("\\temperature 0", "temperature = 0.0"), ("\\topk 40", "top_k = 40"),
                              ("\\topp 0.9", "top_p = 0.9"), ("\\topp 7", "must be in"),
                              ("\\system You answer in one short sentence.", "system prompt set"),
                              ("\\clear", "history cleared"), ("\\frob", "unknown command")]:
            child.expect_exact("> ")
            child.sendline(command)
            child.expect_exact(echo)
        child.expect_exact("> ")
        child.sendline("What is the capital of France?")
        child.expect("Paris")  # streamed greedy answer
        child.expect_exact("> ")
        child.sendline("\\exit")
        child.expect_exact("bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
