"""The Quart app: thin handlers over the model table; errors mapped in serving.errors.

Handlers only parse, route and shape; tokenization runs in worker threads and
generation on each model's engine thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from quart import Quart, Response, request
from quart_schema import QuartSchema, RequestSchemaValidationError, document_request, hide, validate_request
from quart_schema.openapi import Info
from werkzeug.exceptions import HTTPException

from mrs.config.mistralrs import parse_multi_model_config
from mrs.config.schema import ServerConfig
from mrs.engine.types import GenerationRequest
from mrs.errors import ConfigError, InvalidRequest, ModelUnavailable
from mrs.pipeline import Pipeline
from serving import completions, protocol, responses, security, sse
from serving.errors import envelope, to_reply, validation_message
from serving.limits import Limits
from serving.metrics import Metrics
from serving.responses import documented
from serving.security import Keys
from serving.table import FAILED, Lease, ModelTable, check_entry


def create_app(table: ModelTable, server: ServerConfig | None = None, keys: Keys | None = None) -> Quart:
    server = server or ServerConfig()
    limits = Limits.from_config(server)
    app = Quart("mrs")
    QuartSchema(app, info=Info(title="mrs", version="0.1.0"), openapi_path="/openapi.json",
                swagger_ui_path="/docs", redoc_ui_path=None, scalar_ui_path=None,
                openapi_provider_class=responses.OpenAPIWithStreams)
    metrics = Metrics(table.stats)
    app.config["MRS_STARTED"] = False  # set by the runner once startup loading is over
    app.config["RESPONSE_TIMEOUT"] = None  # a long generation is not a stalled response

    def json_reply(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
        return Response(json.dumps(body, ensure_ascii=False), status=status, headers=headers,
                        content_type="application/json")

    def error_reply(exc: BaseException) -> Response:
        reply = to_reply(exc)
        return json_reply(reply.body, reply.status, reply.headers)

    def count(model: str, endpoint: str, status: int) -> None:
        metrics.requests.labels(model, endpoint, str(status)).inc()

    # ---- errors: the OpenAI envelope everywhere ----

    @app.errorhandler(RequestSchemaValidationError)
    async def _invalid(error: RequestSchemaValidationError) -> Response:
        cause = error.validation_error
        if isinstance(cause, Exception) and hasattr(cause, "errors"):
            message, param = validation_message(cause)
        else:
            message, param = "the request body must be a JSON object", None
        return json_reply(envelope(message, "invalid_request_error", param), 400)

    @app.errorhandler(HTTPException)
    async def _http(error: HTTPException) -> Response:
        if error.code == 400:  # raised by quart's JSON parsing
            return json_reply(envelope("the request body is not valid JSON", "invalid_request_error"), 400)
        if error.code == 413:
            message = (f"the request body is over this server's limit of {app.config['MRS_MAX_BODY']} bytes "
                       "(--max-body, server.max_body)")
            return json_reply(envelope(message, "invalid_request_error", None, "request_too_large"), 413)
        kind = "invalid_request_error" if (error.code or 500) < 500 else "server_error"
        return json_reply(envelope(f"{error.name}: {error.description}", kind), error.code or 500)

    @app.errorhandler(Exception)
    async def _any(error: Exception) -> Response:
        return error_reply(error)

    # ---- completions ----

    async def acquire(model: str | None, keep_alive: str | float | None = None) -> Lease:
        """A lease on the request's model, loading it first when it is not loaded (one load
        however many requests wait for it; a model evicted meanwhile is loaded again)."""
        model_id = table.resolve(model)
        deadline = asyncio.get_running_loop().time() + server.load_timeout_s
        while True:
            future = table.ensure_loaded(model_id)
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)),
                                       max(0.0, deadline - asyncio.get_running_loop().time()))
            except TimeoutError:
                raise ModelUnavailable(f"model {model_id!r} is still loading after {server.load_timeout_s:g} s; "
                                       "retry shortly", param="model") from None
            try:
                return table.lease(model_id, keep_alive)
            except ModelUnavailable:
                if asyncio.get_running_loop().time() >= deadline:
                    raise  # unloaded again between its load and this lease, until the deadline

    async def run_job(job: completions.Job, stream: bool, endpoint: str, lease: Lease) -> Response:
        try:
            if not stream:
                body = await completions.complete(job, metrics)
                count(job.model_id, endpoint, 200)
                lease.release()
                return json_reply(body)
            chunks = completions.stream(job, metrics)
        except Exception as exc:
            lease.release()
            count(job.model_id, endpoint, to_reply(exc).status)
            raise
        count(job.model_id, endpoint, 200)
        return Response(_released(chunks, lease), headers=sse.HEADERS)

    @app.post("/v1/chat/completions")
    @documented(responses.ChatCompletion)
    @validate_request(protocol.ChatCompletionRequest)
    async def chat_completions(data: protocol.ChatCompletionRequest) -> Response:
        model_id = table.resolve(data.model)
        lease = await acquire(model_id, data.keep_alive)
        try:
            served = lease.served
            ids = await asyncio.to_thread(served.encode_chat, data.template_messages())
            sampling = data.to_sampling()
            limits.apply(sampling, len(ids), "messages")
            job = completions.Job(served, model_id, GenerationRequest(ids, sampling, protocol.new_id("chatcmpl")),
                                  chat=True, include_usage=data.include_usage, timeout_s=limits.timeout_s)
        except BaseException:
            lease.release()
            raise
        return await run_job(job, data.stream, "chat", lease)

    @app.post("/v1/completions")
    @documented(responses.Completion)
    @validate_request(protocol.CompletionRequest)
    async def text_completions(data: protocol.CompletionRequest) -> Response:
        model_id = table.resolve(data.model)
        lease = await acquire(model_id, data.keep_alive)
        try:
            served = lease.served
            prompt = data.single_prompt()
            if isinstance(prompt, str):
                ids = await asyncio.to_thread(served.encode, prompt)
                text = prompt
            else:
                ids = list(prompt)
                text = await asyncio.to_thread(served.decode, ids, "prompt") if data.echo else ""
            sampling = data.to_sampling()
            limits.apply(sampling, len(ids), "prompt")
            job = completions.Job(served, model_id, GenerationRequest(ids, sampling, protocol.new_id("cmpl")),
                                  chat=False, include_usage=data.include_usage, echo=text if data.echo else "",
                                  timeout_s=limits.timeout_s)
        except BaseException:
            lease.release()
            raise
        return await run_job(job, data.stream, "completions", lease)

    # ---- models ----

    def card(model_id: str) -> dict[str, Any]:
        return protocol.model_card(model_id, table.created(model_id), table.card(model_id))

    @app.get("/v1/models")
    @documented(responses.ModelList)
    async def list_models() -> Response:
        return json_reply({"object": "list", "data": [card(m) for m in table.ids]})

    @app.post("/v1/models")
    @documented(responses.ModelCard, status=201)
    async def add_model() -> Response:
        body = await request.get_json(silent=True)
        if not isinstance(body, dict):
            raise InvalidRequest("the body must be one model entry of the multi-model JSON format, e.g. "
                                 '{"model_id": "m", "model": {"Gguf": {"quantized_model_id": "...", '
                                 '"quantized_filename": "..."}}}')
        load_now = body.pop("load", True)
        if not isinstance(load_now, bool):
            raise InvalidRequest("load: must be true or false", param="load")
        try:
            (entry,) = parse_multi_model_config([body], source="the new model")
            check_entry(entry)
        except ConfigError as e:
            raise InvalidRequest(e.message, param=e.param) from None
        future = table.add(entry, load_now)
        if future is not None:
            with contextlib.suppress(ModelUnavailable):  # a failed load stays in the table as failed
                await asyncio.wrap_future(future)
        return json_reply(card(entry.model_id), 201)

    @app.delete("/v1/models/<path:model>")
    @documented(responses.ModelDeleted)
    async def delete_model(model: str) -> Response:
        model_id = table.resolve(model)
        await asyncio.to_thread(table.remove, model_id)
        return json_reply({"id": model_id, "object": "model", "deleted": True})

    @app.get("/v1/models/<path:model>")
    @documented(responses.ModelCard)
    async def get_model(model: str) -> Response:
        return json_reply(card(table.resolve(model)))

    async def manage(action: str) -> Response:
        body = await request.get_json(silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("model_id"), str):
            raise InvalidRequest('the body must be a JSON object {"model_id": "<id>"}', param="model_id")
        model_id = table.resolve(body["model_id"])
        if action == "unload":
            status = await asyncio.to_thread(table.unload, model_id)
        elif action == "reload":
            status = await asyncio.to_thread(table.reload, model_id)
        else:
            status = table.status(model_id)
        reply: dict[str, Any] = {"model_id": model_id, "status": status}
        if error := table.error(model_id):
            reply["error"] = error
        if memory := table.memory(model_id):
            reply["memory"] = memory
        return json_reply(reply)

    @app.post("/v1/models/status")
    @document_request(protocol.ModelIdRequest)
    @documented(responses.ModelStatus)
    async def model_status() -> Response:
        return await manage("status")

    @app.post("/v1/models/unload")
    @document_request(protocol.ModelIdRequest)
    @documented(responses.ModelStatus)
    async def model_unload() -> Response:
        return await manage("unload")

    @app.post("/v1/models/reload")
    @document_request(protocol.ModelIdRequest)
    @documented(responses.ModelStatus)
    async def model_reload() -> Response:
        return await manage("reload")

    # ---- tokenizer ----

    @app.post("/tokenize")
    @documented(responses.TokenizeResponse)
    @validate_request(protocol.TokenizeRequest)
    async def tokenize(data: protocol.TokenizeRequest) -> Response:
        model_id = table.resolve(data.model)
        with await acquire(model_id) as served:
            return await _tokenize(model_id, served, data)

    async def _tokenize(model_id: str, served: Pipeline, data: protocol.TokenizeRequest) -> Response:
        if data.messages is not None:
            messages = [{"role": m.role, "content": m.text()} for m in data.messages]
            ids = await asyncio.to_thread(served.encode_chat, messages)
        elif data.add_special_tokens:
            ids = await asyncio.to_thread(served.encode, data.prompt)
        else:
            ids = await asyncio.to_thread(served.tokenizer.encode, data.prompt, add_special_tokens=False)
        return json_reply({"model": model_id, "tokens": ids, "count": len(ids),
                           "max_model_len": served.context_limit})

    @app.post("/detokenize")
    @documented(responses.DetokenizeResponse)
    @validate_request(protocol.DetokenizeRequest)
    async def detokenize(data: protocol.DetokenizeRequest) -> Response:
        model_id = table.resolve(data.model)
        with await acquire(model_id) as served:
            return json_reply({"model": model_id, "prompt": await asyncio.to_thread(served.decode, data.tokens)})

    # ---- operations ----

    @app.get("/health")
    @documented(responses.Health, errors=(503,))
    async def health() -> Response:
        statuses = {m: table.status(m) for m in table.ids}
        ready = app.config["MRS_STARTED"] and statuses[table.default_id] != FAILED
        return json_reply({"status": "ok" if ready else "loading", "models": statuses}, 200 if ready else 503)

    @app.get("/metrics")
    @hide  # Prometheus text, not part of the OpenAI API
    async def prometheus() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    return security.install(app, server, keys or Keys())


async def _released(chunks: AsyncIterator[bytes], lease: Lease) -> AsyncIterator[bytes]:
    """The SSE body, releasing the model's lease when the stream ends or the client leaves."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        lease.release()
