"""Access, limits and TLS end to end: one real ``mrs-server`` on the demo SmolLM2 with API keys
(flag, key file and $MRS_API_KEY), an admin key, CORS for one origin, a body cap, request caps
and HTTPS with a certificate the test makes (trustme). Driven with the
official ``openai`` client and httpx. A second, plain server has a request timeout."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import openai
import pytest
import trustme
from server_process import BIN, SMALL_ENGINE, Server, jax_cache_env, start

from mrs.config.schema import GGUF, ModelEntry, ModelSource, ServeConfig, ServerConfig
from mrs.config.units import parse_size
from mrs.engine.types import SamplingParams
from mrs.errors import ConfigError, InvalidRequest
from serving.app import create_app
from serving.limits import Limits
from serving.security import Keys
from serving.table import ModelTable

FLAG_KEY, FILE_KEY, ENV_KEY, ADMIN_KEY = "sk-flag-0123", "sk-file-4567", "sk-env-89ab", "sk-admin-cdef"
ORIGIN = "https://app.example"
MAX_TOKENS_LIMIT, MAX_PROMPT_TOKENS, TIMEOUT_S = 300, 200, 1.0
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]

# Every route but /health and /metrics, as (method, path, JSON body).
PROTECTED = [
    ("GET", "/v1/models", None), ("GET", "/v1/models/default", None),
    ("POST", "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 2}),
    ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
    ("POST", "/tokenize", {"prompt": "Hi"}), ("POST", "/detokenize", {"tokens": [1]}),
    ("POST", "/v1/models/status", {"model_id": "default"}),
    ("POST", "/v1/models/unload", {"model_id": "default"}),
    ("POST", "/v1/models/reload", {"model_id": "default"}),
    ("GET", "/openapi.json", None), ("GET", "/docs", None),
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Server:
    tmp = tmp_path_factory.mktemp("security")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp / "cert.pem"))
    (tmp / "keys.txt").write_text(f"# one key per line\n{FILE_KEY}\n\n")
    srv = start(
        [str(BIN / "mrs-server"), *SMALL_ENGINE, "--api-key", FLAG_KEY, "--api-key-file", str(tmp / "keys.txt"),
         "--admin-api-key", ADMIN_KEY, "--cors-origin", ORIGIN, "--max-body", "64KiB",
         "--max-tokens-limit", str(MAX_TOKENS_LIMIT), "--max-n", "2", "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
         "--ssl-certfile", str(tmp / "cert.pem"),
         "--ssl-keyfile", str(tmp / "key.pem"),
         "gguf", "-m", str(smollm2_gguf.parent), "-f", smollm2_gguf.name],
        tmp / "server.log", {**jax_cache_env(), "MRS_API_KEY": ENV_KEY}, ca=tmp / "ca.pem",
    )
    srv.wait_ready()
    yield srv
    _close_clients()
    srv.stop()


# Clients closed before a server stops: an idle TLS keep-alive connection the client never
# closes holds the server's graceful shutdown for its whole timeout (no close_notify reply).
_CLIENTS: list[httpx.Client] = []


def _closed_at_teardown(c: httpx.Client) -> httpx.Client:
    _CLIENTS.append(c)
    return c


def _close_clients() -> None:
    while _CLIENTS:
        _CLIENTS.pop().close()


def http(server: Server, key: str | None = FLAG_KEY, **headers: str) -> httpx.Client:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return _closed_at_teardown(
        httpx.Client(base_url=server.url, verify=server.verify, headers={**auth, **headers}, timeout=60))


def client(server: Server, key: str = FLAG_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0,
                         http_client=_closed_at_teardown(httpx.Client(verify=server.verify)))


def busy_slots(server: Server) -> float:
    text = http(server, None).get("/metrics").text
    return sum(float(v) for v in re.findall(r'^mrs_busy_slots\{[^}]*\} ([\d.]+)$', text, re.M))


def wait_idle(server: Server) -> None:
    deadline = time.monotonic() + 30
    while busy_slots(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy_slots(server) == 0


def assert_envelope(reply: httpx.Response, status: int, type_: str) -> dict:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["type"] == type_ and error["message"] and set(error) == {"message", "type", "param", "code"}
    return error


# ---- API keys ----------------------------------------------------------------------------

@pytest.mark.parametrize("key", [None, "sk-wrong", FLAG_KEY + "x", FLAG_KEY[:-1]])
def test_no_route_but_health_and_metrics_answers_without_a_valid_key(server: Server, key: str | None) -> None:
    with http(server, key) as c:
        for method, path, body in PROTECTED:
            error = assert_envelope(c.request(method, path, json=body), 401, "authentication_error")
            assert error["code"] == "invalid_api_key" and not (key and key in error["message"])
        assert c.get("/health").status_code == 200
        assert c.get("/metrics").status_code == 200
        # the unauthenticated unload did nothing
        assert c.get("/health").json()["models"] == {server_model(): "loaded"}


def server_model() -> str:
    return "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("key", [FLAG_KEY, FILE_KEY, ENV_KEY, ADMIN_KEY])
def test_the_openai_client_works_with_every_kind_of_key(server: Server, key: str) -> None:
    reply = client(server, key).chat.completions.create(model="default", messages=QUESTION, max_tokens=4,
                                                        temperature=0)
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 4


def test_a_wrong_key_is_an_authentication_error_for_the_openai_client(server: Server) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client(server, "sk-nope").models.list()
    assert err.value.status_code == 401 and err.value.body["type"] == "authentication_error"


def test_managing_models_needs_the_admin_key(server: Server) -> None:
    with http(server, FLAG_KEY) as c:
        error = assert_envelope(c.post("/v1/models/unload", json={"model_id": "default"}), 403, "permission_error")
        assert "admin" in error["message"]
        assert c.post("/v1/models/status", json={"model_id": "default"}).json()["status"] == "loaded"
    with http(server, ADMIN_KEY) as admin:
        assert admin.post("/v1/models/unload", json={"model_id": "default"}).json()["status"] == "unloaded"
        assert admin.post("/v1/models/reload", json={"model_id": "default"}).json()["status"] == "loaded"


def test_keys_never_reach_the_log(server: Server) -> None:
    with http(server, "sk-guess-should-not-be-logged") as c:
        c.get("/v1/models")
    log = server.output()
    for key in (FLAG_KEY, FILE_KEY, ENV_KEY, ADMIN_KEY, "sk-guess-should-not-be-logged"):
        assert key not in log
    assert "API keys required" in log


def test_the_key_table_reads_flags_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text("f1\n# comment\n\n f2 \n")
    keys = Keys.from_config(ServerConfig(api_keys=["a"], admin_api_keys=["b"], api_key_file=str(tmp_path / "keys")),
                            {"MRS_API_KEY": "c"})
    assert all(keys.is_valid(k) for k in (b"a", b"b", b"c", b"f1", b"f2")) and not keys.is_valid(b"d")
    assert keys.is_admin(b"b") and not keys.is_admin(b"a")
    assert not Keys.from_config(ServerConfig(), {}).enabled
    with pytest.raises(ConfigError, match="api_key_file"):
        Keys.from_config(ServerConfig(api_key_file="/nonexistent/keys"), {})
    with pytest.raises(ConfigError, match="API key"):
        Keys.from_config(ServerConfig(api_keys=[" spaced "]), {})


@pytest.mark.parametrize("need_key", [False, True])
def test_metrics_need_a_key_only_when_asked(smollm2_gguf: Path, need_key: bool) -> None:
    """The app itself (Quart's test client; no model needs to load for these routes)."""
    entry = ModelEntry("m", ModelSource(kind=GGUF, quantized_model_id=str(smollm2_gguf)))
    server = ServerConfig(api_keys=["k"], metrics_need_key=need_key)
    app = create_app(ModelTable(ServeConfig(server=server, models=[entry])), server, Keys.from_config(server, {}))

    async def statuses() -> tuple[int, int, int]:
        c = app.test_client()
        bare = await c.get("/metrics")
        keyed = await c.get("/metrics", headers={"Authorization": "Bearer k"})
        health = await c.get("/health")  # 503 (nothing loaded), but not 401
        return bare.status_code, keyed.status_code, health.status_code

    assert asyncio.run(statuses()) == ((401 if need_key else 200), 200, 503)


# ---- CORS ----------------------------------------------------------------------------------

def test_cors_preflight_and_responses_for_the_allowed_origin_only(server: Server) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}
    with http(server, None) as c:
        reply = c.options("/v1/chat/completions", headers=preflight)
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in reply.headers["access-control-allow-headers"].lower()
        assert "POST" in reply.headers["access-control-allow-methods"]
        other = c.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers
    with http(server, FLAG_KEY, Origin=ORIGIN) as c:
        assert c.get("/v1/models").headers["access-control-allow-origin"] == ORIGIN
        # a browser can read the 401 too
        assert c.get("/v1/models", headers={"Authorization": "Bearer no"}).headers["access-control-allow-origin"] == ORIGIN


# ---- body and request limits ----------------------------------------------------------------

def test_a_body_over_the_cap_is_413(server: Server) -> None:
    with http(server) as c:
        reply = c.post("/v1/completions", json={"prompt": "a" * 70_000, "max_tokens": 1})
        error = assert_envelope(reply, 413, "invalid_request_error")
        assert "65536 bytes" in error["message"] and error["code"] == "request_too_large"


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize"])
def test_a_body_that_is_not_utf8_is_400(server: Server, path: str) -> None:
    body = b'{"messages": [{"role": "user", "content": "caf\xe9"}], "prompt": "\xff", "tokens": [1]}'
    with http(server, **{"Content-Type": "application/json"}) as c:
        error = assert_envelope(c.post(path, content=body), 400, "invalid_request_error")
        assert "UTF-8" in error["message"]


def test_request_caps_are_400s_naming_the_field(server: Server) -> None:
    with http(server) as c:
        error = assert_envelope(c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": MAX_TOKENS_LIMIT + 1}),
                                400, "invalid_request_error")
        assert error["param"] == "max_tokens" and str(MAX_TOKENS_LIMIT) in error["message"]
        error = assert_envelope(c.post("/v1/chat/completions", json={"messages": QUESTION, "n": 3, "max_tokens": 1}),
                                400, "invalid_request_error")
        assert error["param"] == "n"
        long_prompt = " ".join(["word"] * (MAX_PROMPT_TOKENS + 20))
        error = assert_envelope(c.post("/v1/completions", json={"prompt": long_prompt, "max_tokens": 1}),
                                400, "invalid_request_error")
        assert error["param"] == "prompt" and str(MAX_PROMPT_TOKENS) in error["message"]
        assert c.post("/v1/chat/completions", json={"messages": QUESTION, "n": 2, "max_tokens": 1}).status_code == 200


def test_a_request_without_max_tokens_gets_the_servers_cap() -> None:
    limits = Limits.from_config(ServerConfig(max_tokens_limit=7))
    sampling = SamplingParams()
    limits.apply(sampling, prompt_tokens=3, prompt_param="prompt")
    assert sampling.max_tokens == 7
    with pytest.raises(InvalidRequest):
        limits.apply(SamplingParams(max_tokens=8), prompt_tokens=3, prompt_param="prompt")
    assert parse_size("64KiB", "max_body") == 65536 and parse_size("2MB", "max_body") == 2_000_000
    with pytest.raises(ConfigError, match="max_body"):
        parse_size("lots", "max_body")


@pytest.fixture(scope="module")
def timeout_server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Server:
    """Its own server: a timeout short enough to hit is too short for the other tests' requests
    on a loaded 2-core machine."""
    tmp = tmp_path_factory.mktemp("timeout")
    srv = start([str(BIN / "mrs-server"), *SMALL_ENGINE, "--request-timeout", str(TIMEOUT_S),
                 "gguf", "-m", str(smollm2_gguf.parent), "-f", smollm2_gguf.name], tmp / "server.log", jax_cache_env())
    srv.wait_ready()
    srv.wait_all_compiled()  # the tests time generations: not while compiling in the background
    yield srv
    _close_clients()
    srv.stop()


def test_a_generation_past_the_timeout_ends_with_an_error_and_frees_its_slot(timeout_server: Server) -> None:
    # 480 tokens take >= 4 s at this machine's best single-stream rate, against a 1 s timeout
    long = {"prompt": "Once upon a time", "max_tokens": 480, "ignore_eos": True, "temperature": 0}
    with http(timeout_server, None) as c:
        started = time.monotonic()
        error = assert_envelope(c.post("/v1/completions", json=long), 504, "timeout_error")
        assert TIMEOUT_S <= time.monotonic() - started < TIMEOUT_S + 10 and error["code"] == "request_timeout"
        wait_idle(timeout_server)
        with c.stream("POST", "/v1/completions", json={**long, "stream": True}) as reply:
            events = [line.removeprefix("data: ") for line in reply.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["type"] == "timeout_error"
        assert len(events) > 3  # some tokens streamed before the deadline
        wait_idle(timeout_server)
        # the model still answers
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


def test_a_client_that_vanishes_during_prefill_frees_its_slot(server: Server) -> None:
    """A long prompt, and the connection dropped as soon as the response starts (the engine
    is prefilling then): the generation is cancelled and nothing stays busy."""

    async def vanish() -> None:
        async with httpx.AsyncClient(base_url=server.url, verify=server.verify,
                                     headers={"Authorization": f"Bearer {FLAG_KEY}"}) as c:
            body = {"prompt": "tell me " * 90, "max_tokens": MAX_TOKENS_LIMIT - 200, "ignore_eos": True, "stream": True}
            async with c.stream("POST", "/v1/completions", json=body) as reply:
                assert reply.status_code == 200

    for _ in range(3):
        asyncio.run(vanish())
    wait_idle(server)
    with http(server) as c:
        assert c.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# ---- TLS -------------------------------------------------------------------------------------

def test_the_tls_port_speaks_only_tls(server: Server) -> None:
    with pytest.raises((httpx.RemoteProtocolError, httpx.ReadError, httpx.ConnectError)):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=5)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):  # a client that does not trust it
        httpx.get(f"{server.url}/health", timeout=5)
    assert httpx.get(f"{server.url}/health", timeout=5, verify=server.verify).status_code == 200
