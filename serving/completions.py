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
from mrs.tools import ToolCall, ToolCallParser, finish_reason, parse_reply
from serving import protocol, sse
from serving.errors import RequestTimedOut, to_reply
from serving.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One accepted request: what to run and how to shape its answer.

    A text completion with a list of prompts runs one engine request per prompt; its
    choices are numbered prompt by prompt (``k * n + i``), as OpenAI numbers them.
    """

    served: Pipeline
    model_id: str
    id: str
    requests: list[GenerationRequest]
    chat: bool
    include_usage: bool = False
    echoes: list[str] | None = None  # text completions with echo: each prompt's text, prepended to its output
    tool_calls: bool = False  # chat with tools enabled: the reply is parsed into tool_calls
    timeout_s: float | None = None  # the server's request_timeout_s
    created: int = field(default_factory=protocol.now)

    @property
    def n(self) -> int:
        return self.requests[0].sampling.n

    @property
    def choices(self) -> int:
        return len(self.requests) * self.n

    @property
    def prompt_tokens(self) -> int:
        return sum(len(r.prompt_ids) for r in self.requests)

    def echo(self, index: int) -> str:
        return self.echoes[index // self.n] if self.echoes else ""

    @property
    def scored(self) -> bool:
        """Echo with logprobs: the prompt tokens' logprobs come first (the engine scores them)."""
        return self.requests[0].sampling.prompt_logprobs is not None

    def first_offset(self, index: int) -> int:
        """The text offset of the first logprob item: the prompt's start if scored, else its end."""
        return 0 if self.scored else len(self.echo(index))

    def submit(self) -> list[Any]:
        """Queue every request (all or none: a refused one cancels those before it)."""
        streams = []
        try:
            for request in self.requests:
                streams.append(self.served.submit(request))
        except Exception:
            self.cancel()
            raise
        return streams

    def cancel(self) -> None:
        for request in self.requests:
            self.served.cancel(request.request_id)

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    @property
    def chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"


async def _within(job: Job, events: AsyncIterator[Any]) -> AsyncIterator[Any]:
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
    if not job.requests[0].sampling.logprobs:
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


def _usage(finishes: dict[int, Finish], job: Job) -> Usage:
    """The job's usage; a prompt's cached tokens are those of its first choice (the others
    reuse that choice's prefill through the prefix cache, which is no saving of the prompt's)."""
    cached = sum(f.usage.cached_tokens for index, f in finishes.items() if index % job.n == 0)
    return Usage(job.prompt_tokens, sum(f.usage.completion_tokens for f in finishes.values()), cached)


async def _merged(streams: list[Any], n: int) -> AsyncIterator[tuple[int, Event]]:
    """The events of several requests' streams as they arrive, with each choice's job-wide index."""
    if len(streams) == 1:  # the usual case: no pump task and queue hop per token
        async for event in streams[0]:
            yield event.index, event
        return
    queue: asyncio.Queue[tuple[int, Event] | None] = asyncio.Queue()

    async def pump(k: int, events: Any) -> None:
        async for event in events:
            await queue.put((k * n + event.index, event))
        await queue.put(None)

    tasks = [asyncio.create_task(pump(k, events)) for k, events in enumerate(streams)]
    try:
        open_streams = len(tasks)
        while open_streams:
            item = await queue.get()
            if item is None:
                open_streams -= 1
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


async def complete(job: Job, metrics: Metrics) -> dict[str, Any]:
    """Run to the end and build the non-streaming response; errors raise (mapped by the app)."""
    total = job.choices
    texts = [job.echo(i) for i in range(total)]
    logprobs: list[list[TokenLogprob]] = [[] for _ in range(total)]
    finishes: dict[int, Finish] = {}
    timer = _Timer(metrics, job.model_id)
    streams = job.submit()
    try:
        async for index, event in _within(job, _merged(streams, job.n)):
            if isinstance(event, TokenDelta):
                timer.token()
                texts[index] += event.text
                logprobs[index].extend((event.prompt_logprobs or []) + (event.logprobs or []))
            else:
                finishes[index] = event
                if event.reason == "error":
                    raise event.error or MrsError("generation failed")
                if event.reason == "cancelled":
                    raise _cancelled_error()
    finally:
        if len(finishes) < total:  # the client went away (or an error): free the slots now
            job.cancel()
    usage = _usage(finishes, job)
    timer.done(usage.prompt_tokens, usage.completion_tokens)
    choices = []
    for i in range(total):
        choice: dict[str, Any] = {"index": i}
        reason = finishes[i].reason
        if job.chat:
            choice["message"] = {"role": "assistant", "content": texts[i]}
            if job.tool_calls and (parsed := parse_reply(texts[i]))[1]:
                choice["message"] = {"role": "assistant", "content": parsed[0],
                                     "tool_calls": [c.to_openai() for c in parsed[1]]}
                reason = finish_reason(reason, True)
        else:
            choice["text"] = texts[i]
        choice["logprobs"] = _logprobs(job, logprobs[i], job.first_offset(i))
        choice["finish_reason"] = reason
        choices.append(choice)
    return {
        "id": job.id, "object": job.object, "created": job.created,
        "model": job.model_id, "choices": choices, "usage": protocol.usage_dict(usage),
    }


def stream(job: Job, metrics: Metrics) -> AsyncIterator[bytes]:
    """Submit now (so a bad request fails with a plain HTTP error), then yield SSE chunks."""
    return _chunks(job, job.submit(), metrics)


async def _chunks(job: Job, streams: list[Any], metrics: Metrics) -> AsyncIterator[bytes]:
    total = job.choices
    started = [False] * total
    offsets = [job.first_offset(i) for i in range(total)]
    finishes: dict[int, Finish] = {}
    timer = _Timer(metrics, job.model_id)
    # Tool calls stream as OpenAI's deltas, one per call once its block closes.
    parsers = [ToolCallParser() for _ in range(total)] if job.tool_calls else None
    calls_sent = [0] * total

    def chunk(index: int, text: str | None, items: list[TokenLogprob], reason: str | None,
              calls: list[ToolCall] | None = None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if job.chat:
            delta: dict[str, Any] = {}
            if not started[index]:
                delta["role"] = "assistant"  # the role goes in the first delta only
            if text is not None:
                delta["content"] = text
            if calls:
                delta["tool_calls"] = [{"index": calls_sent[index] + k, **c.to_openai()} for k, c in enumerate(calls)]
                calls_sent[index] += len(calls)
            choice["delta"] = delta
        else:
            choice["text"] = text or ""
        choice["logprobs"] = _logprobs(job, items, offsets[index]) if items else None
        choice["finish_reason"] = reason
        started[index] = True
        body = {"id": job.id, "object": job.chunk_object, "created": job.created,
                "model": job.model_id, "choices": [choice]}
        if job.include_usage:
            body["usage"] = None
        return sse.event(body)

    try:
        if job.echoes and not job.scored:
            for i in range(total):
                yield chunk(i, job.echo(i), [], None)
        async for index, event in _within(job, _merged(streams, job.n)):
            if isinstance(event, TokenDelta):
                timer.token()
                if event.prompt_logprobs is not None and job.echoes:  # the echo, once the prompt is scored
                    yield chunk(index, job.echo(index), event.prompt_logprobs, None)
                    offsets[index] += len(job.echo(index))
                text, calls = parsers[index].feed(event.text) if parsers else (event.text, [])
                if text or calls or event.logprobs or not started[index]:
                    yield chunk(index, text, event.logprobs or [], None, calls)
                offsets[index] += len(event.text)
                continue
            finishes[index] = event
            if event.reason in ("error", "cancelled"):
                error = event.error if event.reason == "error" else _cancelled_error()
                yield sse.event(to_reply(error or MrsError("generation failed")).body)
                yield sse.DONE
                return
            if parsers and (rest := parsers[index].finish()):
                yield chunk(index, rest, [], None)
            yield chunk(index, None, [], finish_reason(event.reason, calls_sent[index] > 0))
        usage = _usage(finishes, job)
        timer.done(usage.prompt_tokens, usage.completion_tokens)
        if job.include_usage:
            yield sse.event({"id": job.id, "object": job.chunk_object, "created": job.created,
                             "model": job.model_id, "choices": [], "usage": protocol.usage_dict(usage)})
        yield sse.DONE
    except RequestTimedOut as exc:
        yield sse.event(to_reply(exc).body)
        yield sse.DONE
    except asyncio.CancelledError:
        log.info("client disconnected; cancelling %s", job.id)
        raise
    finally:
        if len(finishes) < total:
            job.cancel()
