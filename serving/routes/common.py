"""What every route module shares: the server's state (``Services``), JSON replies, and the
lease that holds a request's model, loading it first when it is not loaded."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from quart import Response, current_app

from mrs.config.schema import ServerConfig
from mrs.errors import ModelUnavailable
from serving.limits import Limits
from serving.metrics import Metrics
from serving.table import Lease, ModelTable


@dataclass
class Services:
    """What the handlers use, kept on the app (``app.extensions["mrs"]``)."""

    table: ModelTable
    server: ServerConfig
    limits: Limits
    metrics: Metrics


def services() -> Services:
    return current_app.extensions["mrs"]


def json_reply(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status=status, headers=headers,
                    content_type="application/json")


def count(model: str, endpoint: str, status: int) -> None:
    services().metrics.requests.labels(model, endpoint, str(status)).inc()


async def acquire(model: str | None, keep_alive: str | float | None = None) -> Lease:
    """A lease on the request's model, loading it first when it is not loaded (one load
    however many requests wait for it; a model evicted meanwhile is loaded again)."""
    table, timeout = services().table, services().server.load_timeout_s
    model_id = table.resolve(model)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        future = table.ensure_loaded(model_id)
        try:
            await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), max(0.0, deadline - loop.time()))
        except TimeoutError:
            raise ModelUnavailable(f"model {model_id!r} is still loading after {timeout:g} s; retry shortly",
                                   param="model") from None
        try:
            return table.lease(model_id, keep_alive)
        except ModelUnavailable:
            if loop.time() >= deadline:
                raise  # unloaded again between its load and this lease, until the deadline
