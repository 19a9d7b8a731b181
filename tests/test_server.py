"""The two-model server end to end: a real ``mrs-server`` process with SmolLM2 (GGUF) and
Gemma 3 (GGUF) from a seed-style multi-model JSON file, driven by the official ``openai``
client (strict response validation) and httpx.

One module-scoped server serves every test; the last test shuts it down with SIGTERM
while a stream is in flight.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest
from server_process import BIN, SMALL_ENGINE, Server, jax_cache_env, start

from mrs.config.mistralrs import load_multi_model_config
from mrs.loading.load import load_checkpoint
from mrs.quant import param_bytes

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GEMMA_PROMPT = "The capital of France is"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def jax_cache() -> dict[str, str]:
    return jax_cache_env()


@pytest.fixture(scope="module")
def models_json(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path, gemma3_gguf: Path) -> Path:
    path = tmp_path_factory.mktemp("server") / "models.json"
    path.write_text(json.dumps([
        {"model_id": "smollm2", "model": {"Gguf": {"quantized_model_id": str(smollm2_gguf.parent),
                                                   "quantized_filename": smollm2_gguf.name}}},
        {"model_id": "gemma3", "model": {"Gguf": {"quantized_model_id": str(gemma3_gguf.parent),
                                                  "quantized_filename": gemma3_gguf.name}}},
    ]))
    return path


@pytest.fixture(scope="module")
def server(models_json: Path, jax_cache: dict[str, str]) -> Server:
    srv = start([str(BIN / "mrs-server"), *SMALL_ENGINE, "--shutdown-timeout", "60", "--multi-model",
                 "--multi-model-config", str(models_json), "--default-model-id", "smollm2"],
                models_json.parent / "server.log", jax_cache)
    srv.wait_ready()
    srv.wait_all_loaded()  # /health is 200 once the default model serves; these tests use both
    yield srv
    srv.stop()


def _cli_answer(argv: list[str], env: dict[str, str]) -> dict:
    """Text and token counts of ``mrs generate|chat ...`` (the Python pipeline, mrs.load)."""
    result = subprocess.run([str(BIN / "mrs"), *argv], capture_output=True, text=True, env=env, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    speed = re.search(r"\[prompt: (\d+) tokens, [\d.na]+ tok/s; decode: (\d+) tokens, [\d.na]+ tok/s\]", result.stderr)
    assert speed, result.stderr[-2000:]
    prompt, completion = int(speed[1]), int(speed[2])
    return {"text": result.stdout.removesuffix("\n"), "prompt": prompt, "completion": completion,
            "reason": "stop" if completion < MAX_TOKENS else "length"}


@pytest.fixture(scope="module")
def reference(jax_cache: dict[str, str], server: Server) -> dict[str, dict]:
    """Greedy answers of the pipeline through the Hydra CLI (``mrs chat`` / ``mrs generate``, the
    same checkpoints as presets), after the server so the compilation cache is warm."""
    return {
        "smollm2": _cli_answer(["chat", "model=smollm2-135m", f"prompt={QUESTION[0]['content']}",
                                f"max_tokens={MAX_TOKENS}"], jax_cache),
        "gemma3": _cli_answer(["generate", "model=gemma3-270m", f"prompt={GEMMA_PROMPT}",
                               f"max_tokens={MAX_TOKENS}"], jax_cache),
    }


@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", _strict_response_validation=True,
                         max_retries=0, timeout=300)


def test_models_list_in_seed_shape(client: openai.OpenAI, server: Server) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["smollm2", "gemma3"]
    assert all(m.object == "model" and m.owned_by == "local" and m.created > 0 for m in models.data)
    raw = httpx.get(f"{server.url}/v1/models").json()
    assert raw["object"] == "list" and {m["status"] for m in raw["data"]} == {"loaded"}
    assert client.models.retrieve("gemma3").id == "gemma3"
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_each_model_answers_with_the_pipelines_greedy_tokens(
    client: openai.OpenAI, server: Server, reference: dict[str, dict]
) -> None:
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    smol = reference["smollm2"]
    assert chat.choices[0].message.content == smol["text"]
    assert smol["text"] == "The capital of France is Paris."  # HF transformers' greedy answer too
    assert chat.choices[0].finish_reason == smol["reason"]
    assert chat.usage.prompt_tokens == smol["prompt"] and chat.usage.completion_tokens == smol["completion"]

    text = client.completions.create(model="gemma3", prompt=GEMMA_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    gemma = reference["gemma3"]
    assert text.choices[0].text == gemma["text"] and text.choices[0].finish_reason == gemma["reason"]
    assert text.usage.prompt_tokens == gemma["prompt"] and text.usage.completion_tokens == gemma["completion"]
    assert text.choices[0].text != chat.choices[0].message.content  # two different models answered


def test_default_model(client: openai.OpenAI, server: Server, reference: dict[str, dict]) -> None:
    by_alias = client.chat.completions.create(model="default", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
    assert by_alias.model == "smollm2" and by_alias.choices[0].message.content == reference["smollm2"]["text"]
    omitted = httpx.post(f"{server.url}/v1/chat/completions", timeout=300,
                         json={"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert omitted.status_code == 200 and omitted.json()["choices"][0]["message"]["content"] == reference["smollm2"]["text"]


def test_unknown_model_is_404_envelope(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="llama-9000", messages=QUESTION, max_tokens=4)
    error = info.value.body
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error"
    assert "llama-9000" in error["message"] and "smollm2" in error["message"] and "gemma3" in error["message"]


def test_streaming_chunks_done_and_usage(client: openai.OpenAI, server: Server, reference: dict[str, dict]) -> None:
    chunks = list(client.chat.completions.create(
        model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in content[1:])  # role only in the first delta
    assert content[-1].choices[0].finish_reason == reference["smollm2"]["reason"]
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in content) == reference["smollm2"]["text"]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.completion_tokens == reference["smollm2"]["completion"]
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The raw stream: data: lines and the [DONE] terminator (text completions too).
    with httpx.stream("POST", f"{server.url}/v1/completions", timeout=300, json={
            "model": "gemma3", "prompt": GEMMA_PROMPT, "max_tokens": 4, "temperature": 0, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    pieces = [json.loads(line[6:]) for line in lines[:-1]]
    streamed = "".join(p["choices"][0]["text"] for p in pieces)
    assert streamed and reference["gemma3"]["text"].startswith(streamed)
    assert pieces[-1]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_to_both_models(server: Server, reference: dict[str, dict]) -> None:
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", _strict_response_validation=True,
                                max_retries=0, timeout=600)
    # The SDK types a streamed text-completion chunk's finish_reason as non-null, but
    # OpenAI's own streams send null until the last chunk (as we do): validate loosely there.
    loose = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=600)

    async def smol() -> tuple[str, int]:
        r = await client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0)
        return r.choices[0].message.content, r.usage.completion_tokens

    async def gemma() -> tuple[str, int]:
        chunks = await loose.completions.create(model="gemma3", prompt=GEMMA_PROMPT, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
        text, usage = "", None
        async for c in chunks:
            text += "".join(ch.text for ch in c.choices)
            assert all(ch.finish_reason in (None, "length", "stop") for ch in c.choices)
            usage = c.usage or usage
        return text, usage.completion_tokens

    async def both() -> list[tuple[str, int]]:
        return await asyncio.gather(*[smol() if i % 2 == 0 else gemma() for i in range(8)])

    results = asyncio.run(both())
    for i, answer in enumerate(results):
        ref = reference["smollm2" if i % 2 == 0 else "gemma3"]
        assert answer == (ref["text"], ref["completion"])


def test_sampling_fields_logprobs_n_stop_seed(client: openai.OpenAI, reference: dict[str, dict]) -> None:
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_completion_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    items = r.choices[0].logprobs.content
    assert len(items) == r.usage.completion_tokens == 4 and all(len(t.top_logprobs) == 3 for t in items)
    assert all(t.logprob <= 0 and t.top_logprobs[0].logprob >= t.top_logprobs[-1].logprob for t in items)
    assert "".join(t.token for t in items) == r.choices[0].message.content
    stopped = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS,
                                             temperature=0, stop=["France"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == reference["smollm2"]["text"].split("France")[0]
    kwargs = dict(model="gemma3", prompt=GEMMA_PROMPT, max_tokens=6, temperature=1.0, seed=1234, n=2, logprobs=2,
                  extra_body={"ignore_eos": True})
    first, again = client.completions.create(**kwargs), client.completions.create(**kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]  # seeded: reproducible
    assert [c.index for c in first.choices] == [0, 1] and first.usage.completion_tokens == 12
    assert all(len(c.logprobs.tokens) == 6 for c in first.choices)


def test_bad_requests_get_400_envelopes(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    cases = [
        (dict(content=b"{not json", headers={"content-type": "application/json"}), None),
        (dict(json={"model": "smollm2"}), "messages"),
        (dict(json={"model": "smollm2", "messages": QUESTION, "temperature": 7}), "temperature"),
        (dict(json={"model": "smollm2", "messages": "hi"}), "messages"),
        (dict(json={"model": "smollm2", "messages": [{"role": "wizard", "content": "x"}]}), "messages.0.role"),
        (dict(json={"model": "smollm2", "messages": QUESTION, "top_logprobs": 3}), None),
        (dict(content=b"[1, 2]", headers={"content-type": "application/json"}), None),
    ]
    for kwargs, param in cases:
        reply = httpx.post(url, timeout=60, **kwargs)
        assert reply.status_code == 400, (kwargs, reply.text)
        error = reply.json()["error"]
        assert error["type"] == "invalid_request_error" and error["message"], error
        if param:
            assert error["param"] == param, error
    too_long = httpx.post(url, timeout=60, json={"model": "smollm2", "messages": QUESTION, "max_tokens": 100000})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
    assert "512" in too_long.json()["error"]["message"]
    no_template = httpx.post(url, timeout=60, json={"model": "gemma3", "messages": QUESTION})
    assert no_template.status_code == 400 and "chat template" in no_template.json()["error"]["message"]


def _busy_slots(server: Server, model: str) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith(f'mrs_busy_slots{{model="{model}"}}'):
            return float(line.split()[-1])
    raise AssertionError("no mrs_busy_slots metric")


def test_client_disconnect_cancels_generation(server: Server) -> None:
    body = {"model": "gemma3", "prompt": GEMMA_PROMPT, "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()  # held: dropping a half-read iterator closes the connection
        for _ in range(3):
            next(lines)
        # The metric is the engine's last step snapshot: give it a moment to show the slot.
        deadline = time.monotonic() + 30
        while _busy_slots(server, "gemma3") != 1:
            assert time.monotonic() < deadline, "the streaming generation never showed as a busy slot"
            time.sleep(0.1)
    # 400 tokens would take far longer than this; the slot frees as soon as the client leaves.
    deadline = time.monotonic() + 20
    while _busy_slots(server, "gemma3") != 0:
        assert time.monotonic() < deadline, "the generation kept its slot after the client disconnected"
        time.sleep(0.2)


def test_tokenize_detokenize_metrics_openapi(server: Server) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"model": "smollm2", "prompt": "Hello world"}).json()
    assert ids["count"] == len(ids["tokens"]) > 0 and ids["max_model_len"] == 512
    text = httpx.post(f"{server.url}/detokenize", json={"model": "smollm2", "tokens": ids["tokens"]}).json()
    assert text["prompt"].endswith("Hello world")
    chat = httpx.post(f"{server.url}/tokenize", json={"model": "smollm2", "messages": QUESTION}).json()
    assert chat["count"] > ids["count"]
    bad = httpx.post(f"{server.url}/detokenize", json={"model": "smollm2", "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ('mrs_requests_total{endpoint="chat",model="smollm2",status="200"}', 'mrs_prompt_tokens_total{model="gemma3"}',
                 'mrs_generated_tokens_total{model="smollm2"}', 'mrs_time_to_first_token_seconds_count{model="smollm2"}',
                 'mrs_request_latency_seconds_count{model="gemma3"}', 'mrs_queue_depth{model="smollm2"}'):
        assert name in metrics, name
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/chat/completions" in spec["paths"] and "/v1/completions" in spec["paths"]


def test_status_reports_memory_measured_by_the_engine(server: Server, models_json: Path) -> None:
    """param and KV cache bytes in /v1/models/status and the startup log, as the engine measures
    them: the checkpoint's arrays, and a float32 (k, v) pair per layer for every token of the KV
    pool (4 slots x 512 tokens, under the default 8,192), in pages of 32 tokens."""
    for entry in load_multi_model_config(models_json):
        checkpoint = load_checkpoint(entry)
        config = checkpoint.config
        context = min(512, config.max_position_embeddings)  # SMALL_ENGINE: --max-seqs 4 --max-seq-len 512
        kv = config.num_layers * 2 * 4 * context * config.num_kv_heads * config.head_dim * 4
        params = param_bytes(checkpoint.params)
        pages = 4 * context // 32
        reply = httpx.post(f"{server.url}/v1/models/status", json={"model_id": entry.model_id}).json()
        cached = reply["memory"]["kv_pages_cached"]  # earlier tests' prompts (the server is shared)
        # idle: the pool holds memory for its cached pages only
        assert reply == {"model_id": entry.model_id, "status": "loaded",
                         "memory": {"param_bytes": params, "kv_cache_bytes": kv, "kv_resident_bytes": cached * kv // pages,
                                    "kv_pages_total": pages, "kv_pages_used": 0, "kv_pages_cached": cached,
                                    "kv_page_size": 32}}
        ready = next(line for line in server.output().splitlines() if f"model {entry.model_id!r} ready" in line)
        assert f"params {params / 2**20:.1f} MiB ({params} bytes)" in ready
        assert f"({kv} bytes) ({4 * context // 32} pages of 32 tokens)" in ready


def test_unload_status_reload(client: openai.OpenAI, server: Server, reference: dict[str, dict]) -> None:
    def post(action: str, model_id: str) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/models/{action}", json={"model_id": model_id}, timeout=900)

    assert post("status", "gemma3").json()["status"] == "loaded"
    assert post("unload", "gemma3").json() == {"model_id": "gemma3", "status": "unloaded"}
    assert post("status", "gemma3").json() == {"model_id": "gemma3", "status": "unloaded"}  # no memory held
    assert {m["id"]: m["status"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]} == {
        "smollm2": "loaded", "gemma3": "unloaded"}
    # the other model keeps serving
    assert client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=MAX_TOKENS,
                                          temperature=0).choices[0].message.content == reference["smollm2"]["text"]
    # a request loads it again on demand (autoload, the default) and gets the same answer
    again = client.completions.create(model="gemma3", prompt=GEMMA_PROMPT, max_tokens=MAX_TOKENS, temperature=0)
    assert again.choices[0].text == reference["gemma3"]["text"]
    reloaded = post("reload", "gemma3").json()
    assert reloaded["status"] == "loaded" and reloaded["memory"]["param_bytes"] > 0
    assert "model 'gemma3' loaded (requested" in server.output()
    assert post("status", "nope").status_code == 404
    assert httpx.post(f"{server.url}/v1/models/unload", json={}).status_code == 400


def test_sigterm_lets_the_stream_finish_then_exits_0(server: Server, reference: dict[str, dict]) -> None:
    body = {"model": "smollm2", "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=300) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line)
        server.proc.send_signal(signal.SIGTERM)
        rest = [line for line in lines if line]
    pieces = [json.loads(line[6:]) for line in [first, *rest[:-1]]]
    assert rest[-1] == "data: [DONE]"
    assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces) == reference["smollm2"]["text"]
    assert server.proc.wait(120) == 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/health")
