"""Fuzzing the server against its own published schema (schemathesis): a real ``mrs-server``
on the demo SmolLM2, a bounded budget per operation and mode (``MRS_FUZZ_CASES``, default 200), and
for every generated request: no 5xx, every error in OpenAI's envelope, responses valid
against /openapi.json, schema-invalid requests refused; and the server healthy afterwards.

Unload and reload are left out: a case that unloads the model would turn the rest into
correct 503s (they have their own tests). ``tools/fuzz.py`` runs the same for long budgets.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi import checks as openapi
from server_process import BIN, SMALL_ENGINE, Server, jax_cache_env, start

CASES = int(os.environ.get("MRS_FUZZ_CASES", "200"))
REPORT = os.environ.get("MRS_FUZZ_REPORT")  # tools/fuzz.py: write the status counts here (JSON)
STATUSES: collections.Counter[tuple[str, str, int]] = collections.Counter()
# Small generations keep a case fast: a request over these is a quick 400.
FUZZ_LIMITS = ["--max-tokens-limit", "4", "--max-n", "2", "--max-prompt-tokens", "300"]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path) -> Server:
    tmp = tmp_path_factory.mktemp("fuzz")
    srv = start([str(BIN / "mrs-server"), *SMALL_ENGINE, *FUZZ_LIMITS, "--max-body", "256KiB",
                 "gguf", "-m", str(smollm2_gguf.parent), "-f", smollm2_gguf.name], tmp / "server.log", jax_cache_env())
    srv.wait_ready()
    yield srv
    if REPORT:
        Path(REPORT).write_text(json.dumps([[*key, count] for key, count in sorted(STATUSES.items())]))
    assert httpx.get(f"{srv.url}/health", timeout=10).status_code == 200, srv.output()[-3000:]
    srv.stop()
    assert "Traceback" not in srv.output(), srv.output()[-5000:]


@pytest.fixture(scope="module")
def api_schema(fuzz_server: Server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


# Every operation of the published schema but unload and reload (see the module docstring).
OPERATIONS = [
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"), ("POST", "/v1/models/status"), ("POST", "/tokenize"),
    ("POST", "/detokenize"), ("GET", "/health"),
]
UNFUZZED = [("POST", "/v1/models/unload"), ("POST", "/v1/models/reload")]


def test_every_operation_is_fuzzed(api_schema) -> None:
    published = {(op.method.upper(), op.path) for op in (r.ok() for r in api_schema.get_all_operations())}
    assert published == set(OPERATIONS) | set(UNFUZZED)


def error_in_envelope(ctx, response, case) -> None:
    """Every status >= 400 carries OpenAI's envelope with a message and a type."""
    if response.status_code < 400:
        return
    body = response.json()
    error = body.get("error") if isinstance(body, dict) else None
    assert isinstance(error, dict) and error.get("message") and error.get("type"), response.text[:500]


CHECKS = [not_a_server_error, error_in_envelope, openapi.status_code_conformance, openapi.content_type_conformance,
          openapi.response_schema_conformance, openapi.negative_data_rejection]


WITH_BODY = [op for op in OPERATIONS if op[0] == "POST"]  # the only ones a request can get wrong
CASES_BY_MODE = [(*op, GenerationMode.POSITIVE) for op in OPERATIONS] + [(*op, GenerationMode.NEGATIVE) for op in WITH_BODY]


@pytest.mark.parametrize(("method", "path", "mode"), CASES_BY_MODE,
                         ids=[f"{m} {p} {mode.value}" for m, p, mode in CASES_BY_MODE])
def test_fuzz(api_schema, method: str, path: str, mode: GenerationMode) -> None:
    operation = api_schema[path][method]

    @given(case=operation.as_strategy(mode))
    @settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def one(case) -> None:
        response = case.call(timeout=120)
        STATUSES[f"{method} {path}", mode.value, response.status_code] += 1
        case.validate_response(response, checks=CHECKS)

    one()
