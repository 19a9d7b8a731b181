"""Chat and text completions over an engine stream: one JSON body, or SSE chunks.

The two endpoints differ only in how a choice is shaped (``message``/``delta`` vs
``text``, and their logprobs formats); ``_Shape`` holds those differences.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mrs.engine.types import Event, Finish, GenerationRequest, TokenDelta, TokenLogprob, Usage
from mrs.errors import ModelUnavailable, MrsError
from mrs.pipeline import Pipeline
from serving import protocol, sse
from serving.errors import RequestTimedOut, to_reply
from serving.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One accepted request: what to run and how to shape its answer."""

    served: Pipeline
    model_id: str
    request: GenerationRequest
    chat: bool
    include_usage: bool = False
    echo: str = ""  # text completions with echo: the prompt text, prepended to the output
    timeout_s: float | None = None  # the server's request_timeout_s
    created: int = field(default_factory=protocol.now)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


async def _within(job: Job, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """``events`` until the job's timeout, then ``RequestTimedOut``. Only the wait for the
    engine is timed: a timeout around the caller's yields would cancel its task mid-write."""
    if job.timeout_s is None:
        async for event in events:
            yield event
        return
    deadline = time.monotonic() + job.timeout_s
    iterator = aiter(events)
    while True:
        try:
            event = await asyncio.wait_for(anext(iterator), max(0.0, deadline - time.monotonic()))
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise RequestTimedOut(f"the generation ran past this server's request timeout of {job.timeout_s:g} s") from None
        yield event


def _cancelled_error() -> ModelUnavailable:
    return ModelUnavailable("the generation was cancelled: the model was unloaded or the server is stopping")


def _logprobs(job: Job, items: list[TokenLogprob], offset: int) -> dict[str, Any] | None:
    if not job.request.sampling.logprobs:
        return None
    if job.chat:
        return {"content": protocol.chat_logprobs(items), "refusal": None}
    return protocol.completion_logprobs(items, offset)


class _Timer:
    """Records time to first token and latency for the metrics."""

    def __init__(self, metrics: Metrics, model_id: str) -> None:
        self.metrics, self.model_id = metrics, model_id
        self.start = time.perf_counter()
        self.first = False

    def token(self) -> None:
        if not self.first:
            self.first = True
            self.metrics.ttft.labels(self.model_id).observe(time.perf_counter() - self.start)

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        m.latency.labels(self.model_id).observe(time.perf_counter() - self.start)
        m.prompt_tokens.labels(self.model_id).inc(prompt_tokens)
        m.generated_tokens.labels(self.model_id).inc(completion_tokens)


def _usage(finishes: dict[int, Finish], prompt_tokens: int) -> Usage:
    return Usage(prompt_tokens, sum(f.usage.completion_tokens for f in finishes.values()))


async def complete(job: Job, metrics: Metrics) -> dict[str, Any]:
    """Run to the end and build the non-streaming response; errors raise (mapped by the app)."""
    n = job.request.sampling.n
    texts = [job.echo] * n
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(n)]
    finishes: dict[int, Finish] = {}
    timer = _Timer(metrics, job.model_id)
    stream = _within(job, job.served.submit(job.request))
    try:
        async for event in stream:
            if isinstance(event, TokenDelta):
                timer.token()
                texts[event.index] += event.text
                logprobs[event.index].extend(event.logprobs or [])
            else:
                finishes[event.index] = event
                if event.reason == "error":
                    raise event.error or MrsError("generation failed")
                if event.reason == "cancelled":
                    raise _cancelled_error()
    finally:
        if len(finishes) < n:  # the client went away (or an error): free the slots now
            job.served.cancel(job.request.request_id)
    usage = _usage(finishes, len(job.request.prompt_ids))
    timer.done(usage.prompt_tokens, usage.completion_tokens)
    choices = []
    for i in range(n):
        choice: dict[str, Any] = {"index": i}
        if job.chat:
            choice["message"] = {"role": "assistant", "content": texts[i]}
        else:
            choice["text"] = texts[i]
        choice["logprobs"] = _logprobs(job, logprobs[i], len(job.echo))
        choice["finish_reason"] = finishes[i].reason
        choices.append(choice)
    return {
        "id": job.request.request_id, "object": job.object, "created": job.created,
        "model": job.model_id, "choices": choices, "usage": protocol.usage_dict(usage),
    }


def stream(job: Job, metrics: Metrics) -> AsyncIterator[bytes]:
    """Submit now (so a bad request fails with a plain HTTP error), then yield SSE chunks."""
    events = job.served.submit(job.request)
    return _chunks(job, events, metrics)


async def _chunks(job: Job, events: AsyncIterator[Any], metrics: Metrics) -> AsyncIterator[bytes]:
    n = job.request.sampling.n
    started = [False] * n
    offsets = [len(job.echo)] * n
    finishes: dict[int, Finish] = {}
    timer = _Timer(metrics, job.model_id)

    def chunk(index: int, text: str | None, items: list[TokenLogprob], reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if job.chat:
            delta: dict[str, Any] = {}
            if not started[index]:
                delta["role"] = "assistant"  # the role goes in the first delta only
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = _logprobs(job, items, offsets[index]) if items else None
        choice["finish_reason"] = reason
        started[index] = True
        body = {"id": job.request.request_id, "object": job.chunk_object, "created": job.created,
                "model": job.model_id, "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return sse.event(body)

    try:
        if job.echo and not job.chat:
            for i in range(n):
                yield chunk(i, job.echo, [], None)
        async for event in _within(job, events):
            if isinstance(event, TokenDelta):
                timer.token()
                if event.text or event.logprobs or not started[event.index]:
                    yield chunk(event.index, event.text, event.logprobs or [], None)
                offsets[event.index] += len(event.text)
                continue
            finishes[event.index] = event
            if event.reason in ("error", "cancelled"):
                error = event.error if event.reason == "error" else _cancelled_error()
                yield sse.event(to_reply(error or MrsError("generation failed")).body)
                yield sse.DONE
                return
            yield chunk(event.index, None, [], event.reason)
        usage = _usage(finishes, len(job.request.prompt_ids))
        timer.done(usage.prompt_tokens, usage.completion_tokens)
        if job.include_usage:
            yield sse.event({"id": job.request.request_id, "object": job.chunk_object, "created": job.created,
                             "model": job.model_id, "choices": [], "usage": protocol.usage_dict(usage)})
        yield sse.DONE
    except RequestTimedOut as exc:
        yield sse.event(to_reply(exc).body)
        yield sse.DONE
    except asyncio.CancelledError:
        log.info("client disconnected; cancelling %s", job.request.request_id)
        raise
    finally:
        if len(finishes) < n:
            job.served.cancel(job.request.request_id)
