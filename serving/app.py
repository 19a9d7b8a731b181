"""The Quart app: thin handlers over the model table; errors mapped in serving.errors.

Handlers only parse, route and shape; tokenization runs in worker threads and
generation on each model's engine thread, so the event loop never blocks.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from quart import Quart, Response, request
from quart_schema import QuartSchema, RequestSchemaValidationError, document_request, hide, validate_request
from quart_schema.openapi import Info
from werkzeug.exceptions import HTTPException

from mrs.config.schema import ServerConfig
from mrs.engine.types import GenerationRequest
from mrs.errors import InvalidRequest
from mrs.tools import calls_enabled, parse_tools
from serving import completions, protocol, responses, security, sse
from serving.errors import envelope, to_reply, validation_message
from serving.limits import Limits
from serving.metrics import Metrics
from serving.responses import documented
from serving.security import Keys
from serving.table import LOADED, ModelTable


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

    async def run_job(job: completions.Job, stream: bool, endpoint: str) -> Response:
        try:
            if not stream:
                body = await completions.complete(job, metrics)
                count(job.model_id, endpoint, 200)
                return json_reply(body)
            chunks = completions.stream(job, metrics)
        except Exception as exc:
            count(job.model_id, endpoint, to_reply(exc).status)
            raise
        count(job.model_id, endpoint, 200)
        return Response(chunks, headers=sse.HEADERS)

    @app.post("/v1/chat/completions")
    @documented(responses.ChatCompletion)
    @validate_request(protocol.ChatCompletionRequest)
    async def chat_completions(data: protocol.ChatCompletionRequest) -> Response:
        model_id = table.resolve(data.model)
        served = table.get(model_id)
        sampling, (tools, choice) = data.to_sampling(), data.tool_setup()
        calls = calls_enabled(tools, choice)
        ids = await asyncio.to_thread(served.encode_chat, data.template_messages(), tools if calls else None)
        limits.apply(sampling, len(ids), "messages")
        job_id = protocol.new_id("chatcmpl")
        job = completions.Job(served, model_id, job_id, [GenerationRequest(ids, sampling, job_id)], chat=True,
                              include_usage=data.include_usage, tool_calls=calls, timeout_s=limits.timeout_s)
        return await run_job(job, data.stream, "chat")

    @app.post("/v1/completions")
    @documented(responses.Completion)
    @validate_request(protocol.CompletionRequest)
    async def text_completions(data: protocol.CompletionRequest) -> Response:
        model_id = table.resolve(data.model)
        served = table.get(model_id)
        sampling, prompts, job_id = data.to_sampling(), data.prompts(), protocol.new_id("cmpl")
        requests, echoes = [], []
        for k, prompt in enumerate(prompts):  # a list of prompts: one request (and choice set) each
            if isinstance(prompt, str):
                ids, text = await asyncio.to_thread(served.encode, prompt), prompt
            else:
                ids = list(prompt)
                text = await asyncio.to_thread(served.decode, ids, "prompt") if data.echo else ""
            limits.apply(sampling, len(ids), "prompt")
            requests.append(GenerationRequest(ids, sampling, job_id if len(prompts) == 1 else f"{job_id}-{k}"))
            echoes.append(text)
        job = completions.Job(served, model_id, job_id, requests, chat=False, include_usage=data.include_usage,
                              echoes=echoes if data.echo else None, timeout_s=limits.timeout_s)
        return await run_job(job, data.stream, "completions")

    # ---- models ----

    def card(model_id: str) -> dict[str, Any]:
        return protocol.model_card(model_id, table.created(model_id), table.status(model_id))

    @app.get("/v1/models")
    @documented(responses.ModelList)
    async def list_models() -> Response:
        return json_reply({"object": "list", "data": [card(m) for m in table.ids]})

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
        served = table.get(model_id)
        if data.messages is not None:
            ids = await asyncio.to_thread(
                served.encode_chat, [m.openai() for m in data.messages], parse_tools(data.tools, None)[0],
                add_generation_prompt=data.add_generation_prompt, continue_final_message=data.continue_final_message)
        elif data.add_special_tokens:
            ids = await asyncio.to_thread(served.encode, data.prompt)
        else:
            ids = await asyncio.to_thread(served.tokenizer.encode, data.prompt, add_special_tokens=False)
        reply = {"model": model_id, "tokens": ids, "count": len(ids), "max_model_len": served.engine.context_limit}
        if data.return_token_strs:
            reply["token_strs"] = served.tokenizer.convert_ids_to_tokens(ids)
        return json_reply(reply)

    @app.post("/detokenize")
    @documented(responses.DetokenizeResponse)
    @validate_request(protocol.DetokenizeRequest)
    async def detokenize(data: protocol.DetokenizeRequest) -> Response:
        model_id = table.resolve(data.model)
        served = table.get(model_id)
        return json_reply({"model": model_id, "prompt": await asyncio.to_thread(served.decode, data.tokens)})

    # ---- operations ----

    @app.get("/health")
    @documented(responses.Health, errors=(503,))
    async def health() -> Response:
        statuses = {m: table.status(m) for m in table.ids}
        ready = app.config["MRS_STARTED"] and any(s == LOADED for s in statuses.values())
        return json_reply({"status": "ok" if ready else "loading", "models": statuses}, 200 if ready else 503)

    @app.get("/metrics")
    @hide  # Prometheus text, not part of the OpenAI API
    async def prometheus() -> Response:
        return Response(metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")

    return security.install(app, server, keys or Keys())
