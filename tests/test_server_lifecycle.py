"""Models that come and go, through a real ``mrs-server`` (after llama.cpp's router tests):
adding and removing models over HTTP, load on demand with one load for many waiters, the
request's ``keep_alive``, the cards' state fields and the lifecycle metrics (tiny random
Llama checkpoints); and the demo models: a server started with SmolLM2 alone gets Gemma 3
added, used, evicted and expired, with no request lost (``--max-loaded-models 1``)."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path

import httpx
import pytest
from hf_checkpoints import hf_model, save_checkpoint
from server_process import BIN, SMALL_ENGINE, TINY_ENGINE, Server, jax_cache_env, start

PROMPT_IDS = [5, 17, 42, 99, 7, 3]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(hf_model("llama"), tmp_path_factory.mktemp("lifecycle") / "tiny")


def plain(model_id: str, path: Path, **fields) -> dict:
    return {"model_id": model_id, "model": {"Plain": {"model_id": str(path), "arch": "llama"}}, **fields}


@pytest.fixture(scope="module")
def server(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Server:
    tmp = tmp_path_factory.mktemp("lifecycle-server")
    (tmp / "models.json").write_text(json.dumps([plain("a", tiny), plain("lazy", tiny, lazy=True)]))
    srv = start([str(BIN / "mrs-server"), *TINY_ENGINE, "--multi-model", "--multi-model-config", str(tmp / "models.json")],
                tmp / "server.log", jax_cache_env())
    srv.wait_ready()
    yield srv
    srv.stop()


def complete(url: str, model: str, **extra) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"model": model, "prompt": PROMPT_IDS, "max_tokens": 4,
                                                     "ignore_eos": True, **extra}, timeout=300)


def cards(url: str) -> dict[str, dict]:
    return {m["id"]: m for m in httpx.get(f"{url}/v1/models").json()["data"]}


def metric(url: str, name: str, model: str) -> float:
    found = re.search(rf'^{name}{{model="{re.escape(model)}"}} ([\d.e+]+)$', httpx.get(f"{url}/metrics").text, re.M)
    return float(found[1]) if found else 0.0


def wait_for(predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_cards_show_each_models_state(server: Server) -> None:
    a, lazy = cards(server.url)["a"], cards(server.url)["lazy"]
    assert a["status"] == "loaded" and a["pinned"] is False and a["expires_at"] is None
    assert a["memory"]["param_bytes"] > 0 and a["memory"]["kv_cache_bytes"] > 0 and a["last_used"] > 0
    assert 0 < a["compiled"]["in_memory"] <= a["compiled"]["total"]
    assert lazy["status"] == "unloaded" and lazy["memory"] is None


def test_twenty_requests_for_a_lazy_model_cause_one_load(server: Server) -> None:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=300) as c:
            body = {"model": "lazy", "prompt": PROMPT_IDS, "max_tokens": 4, "ignore_eos": True, "temperature": 0}
            return await asyncio.gather(*[c.post("/v1/completions", json=body) for _ in range(20)])

    replies = asyncio.run(burst())
    assert [r.status_code for r in replies] == [200] * 20
    assert len({r.json()["choices"][0]["text"] for r in replies}) == 1  # greedy: one answer
    assert metric(server.url, "mrs_model_loads_total", "lazy") == 1
    assert metric(server.url, "mrs_model_load_seconds_total", "lazy") > 0
    assert cards(server.url)["lazy"]["status"] == "loaded"


def test_add_use_and_remove_a_model(server: Server, tiny: Path) -> None:
    added = httpx.post(f"{server.url}/v1/models", json=plain("added", tiny, max_seqs=1), timeout=300)
    assert added.status_code == 201 and added.json()["id"] == "added" and added.json()["status"] == "loaded"
    assert complete(server.url, "added").status_code == 200
    duplicate = httpx.post(f"{server.url}/v1/models", json=plain("added", tiny))
    assert duplicate.status_code == 409 and duplicate.json()["error"]["code"] == "model_exists"
    later = httpx.post(f"{server.url}/v1/models", json={**plain("later", tiny), "load": False})
    assert later.status_code == 201 and later.json()["status"] == "unloaded"
    deleted = httpx.delete(f"{server.url}/v1/models/added")
    assert deleted.json() == {"id": "added", "object": "model", "deleted": True}
    assert httpx.get(f"{server.url}/v1/models/added").status_code == 404
    assert complete(server.url, "added").status_code == 404
    assert httpx.delete(f"{server.url}/v1/models/later").status_code == 200
    refused = httpx.delete(f"{server.url}/v1/models/a")
    assert refused.status_code == 400 and "default model" in refused.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"model_id": "x", "model": {"Plain": {"model_id": "/m"}}, "frobnicate": 1}, "frobnicate"),
    ({"model": {"Gguf": {"quantized_model_id": "/m"}}}, "model_id"),
    ({"model_id": "x", "model": {"Plain": {"model_id": "/m", "arch": "nope"}}}, "arch"),
    ({"model_id": "x", "model": {"Plain": {}}, "keep_alive": "soon"}, "keep_alive"),
    ({"model_id": "x", "model": {"Plain": {"model_id": "/m"}}, "load": "yes"}, "load"),
])
def test_a_bad_entry_is_a_400_naming_the_field(server: Server, body: dict, param: str) -> None:
    reply = httpx.post(f"{server.url}/v1/models", json=body)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == param, reply.text
    assert "x" not in cards(server.url)


def test_a_failed_load_stays_in_the_table_as_failed(server: Server, tmp_path: Path) -> None:
    reply = httpx.post(f"{server.url}/v1/models", json=plain("missing", tmp_path / "absent"), timeout=300)
    assert reply.status_code == 201 and reply.json()["status"] == "failed" and reply.json()["error"]
    assert complete(server.url, "missing").status_code == 503
    assert complete(server.url, "a").status_code == 200
    httpx.delete(f"{server.url}/v1/models/missing")


def test_the_requests_keep_alive_unloads_an_idle_model(server: Server) -> None:
    assert complete(server.url, "lazy", keep_alive=0).status_code == 200
    wait_for(lambda: cards(server.url)["lazy"]["status"] == "unloaded")
    assert metric(server.url, "mrs_model_unloads_total", "lazy") == 1
    bad = complete(server.url, "a", keep_alive="whenever")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "keep_alive"
    pinned = complete(server.url, "lazy", keep_alive=-1)  # loads it again, pinned from now on
    assert pinned.status_code == 200 and cards(server.url)["lazy"]["pinned"] is True


# ---- the demo models ----------------------------------------------------------------------

def test_a_server_with_smollm2_alone_gets_gemma3_added_used_evicted_and_expired(
        smollm2_gguf: Path, gemma3_gguf: Path, tmp_path: Path) -> None:
    srv = start([str(BIN / "mrs-server"), *SMALL_ENGINE, "--max-loaded-models", "1", "gguf",
                 "-m", str(smollm2_gguf.parent), "-f", smollm2_gguf.name], tmp_path / "server.log", jax_cache_env())
    smollm2 = smollm2_gguf.name
    try:
        srv.wait_ready()
        # a long stream from SmolLM2 while Gemma 3 is added: the load waits for the stream
        streamed: dict = {}

        def stream() -> None:
            body = {"model": smollm2, "prompt": "Once upon a time", "max_tokens": 160, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", f"{srv.url}/v1/completions", json=body, timeout=300) as r:
                lines = [line for line in r.iter_lines() if line.startswith("data: ")]
            streamed["events"] = [json.loads(line[6:]) for line in lines[:-1]]
            streamed["done"] = lines[-1] == "data: [DONE]"

        reader = threading.Thread(target=stream)
        reader.start()
        wait_for(lambda: metric(srv.url, "mrs_busy_slots", smollm2) == 1)
        entry = {"model_id": "gemma3", "model": {"Gguf": {"quantized_model_id": str(gemma3_gguf.parent),
                                                          "quantized_filename": gemma3_gguf.name}}}
        added = httpx.post(f"{srv.url}/v1/models", json=entry, timeout=600)
        reader.join(300)
        assert added.status_code == 201 and added.json()["status"] == "loaded", added.text
        assert streamed["done"] and streamed["events"][-1]["choices"][0]["finish_reason"] == "length"
        assert not any("error" in e for e in streamed["events"])
        assert cards(srv.url)[smollm2]["status"] == "evicted"
        text = complete(srv.url, "gemma3", max_tokens=8, temperature=0)
        assert text.status_code == 200 and text.json()["usage"]["completion_tokens"] == 8
        # SmolLM2 again: loaded on demand, Gemma 3 (idle) evicted for it
        chat = httpx.post(f"{srv.url}/v1/chat/completions", timeout=600, json={
            "model": smollm2, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert chat.status_code == 200 and "Paris" in chat.json()["choices"][0]["message"]["content"]
        assert cards(srv.url)["gemma3"]["status"] == "evicted"
        # Gemma 3 once more with a 1 s keep_alive: it expires on its own
        assert complete(srv.url, "gemma3", keep_alive="1s").status_code == 200
        wait_for(lambda: cards(srv.url)["gemma3"]["status"] == "unloaded")
        log = srv.output()
        assert "to make room for 'gemma3': over --max-loaded-models 1" in log
        assert "idle past its keep_alive of 1 s" in log
    finally:
        assert srv.stop() == 0, srv.output()[-3000:]
