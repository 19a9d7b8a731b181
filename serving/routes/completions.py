"""``POST /v1/chat/completions`` and ``/v1/completions``: parse, tokenize off the event loop,
hand the job to ``serving.completions`` (one JSON body or SSE chunks)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

from quart import Blueprint, Response
from quart_schema import validate_request

from mrs.engine.types import GenerationRequest
from mrs.pipeline import Pipeline
from mrs.tools import calls_enabled
from serving import completions, protocol, responses, sse
from serving.errors import to_reply
from serving.responses import documented
from serving.routes.common import acquire, count, json_reply, services
from serving.table import Lease

blueprint = Blueprint("completions", __name__)


async def _run(job: completions.Job, stream: bool, endpoint: str, lease: Lease) -> Response:
    metrics = services().metrics
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


async def _released(chunks: AsyncIterator[bytes], lease: Lease) -> AsyncIterator[bytes]:
    """The SSE body, releasing the model's lease when the stream ends or the client leaves."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        lease.release()


async def _serve(data: protocol.ChatCompletionRequest | protocol.CompletionRequest,
                 build: Callable[[Pipeline, str], Awaitable[completions.Job]], endpoint: str) -> Response:
    """Lease the request's model (loading it if need be), build its job, run it; the lease
    is released when the job ends, or at once when building it fails."""
    model_id = services().table.resolve(data.model)
    lease = await acquire(model_id, data.keep_alive)
    try:
        job = await build(lease.served, model_id)
    except BaseException:
        lease.release()
        raise
    return await _run(job, data.stream, endpoint, lease)


@blueprint.post("/v1/chat/completions")
@documented(responses.ChatCompletion)
@validate_request(protocol.ChatCompletionRequest)
async def chat_completions(data: protocol.ChatCompletionRequest) -> Response:
    async def build(served: Pipeline, model_id: str) -> completions.Job:
        limits = services().limits
        sampling, (tools, choice) = data.to_sampling(), data.tool_setup()
        calls = calls_enabled(tools, choice)
        prompt = await asyncio.to_thread(served.prepare_chat, data.template_messages(), tools if calls else None,
                                         limits.images)
        limits.apply(sampling, len(prompt.ids), "messages")
        job_id = protocol.new_id("chatcmpl")
        job = completions.Job(served, model_id, job_id, [prompt.request(sampling, job_id)], chat=True,
                              include_usage=data.include_usage, tool_calls=calls, timeout_s=limits.timeout_s)
        return job

    return await _serve(data, build, "chat")


@blueprint.post("/v1/completions")
@documented(responses.Completion)
@validate_request(protocol.CompletionRequest)
async def text_completions(data: protocol.CompletionRequest) -> Response:
    async def build(served: Pipeline, model_id: str) -> completions.Job:
        limits = services().limits
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
        return job

    return await _serve(data, build, "completions")
