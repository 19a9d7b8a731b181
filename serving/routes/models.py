"""The model routes: OpenAI's list and get, adding and removing models at runtime, and
mistral.rs's ``/v1/models/status|unload|reload``."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from quart import Blueprint, Response, request
from quart_schema import validate_request

from mrs.config.mistralrs import parse_multi_model_config
from mrs.errors import ConfigError, InvalidRequest, ModelUnavailable
from serving import protocol, responses
from serving.responses import documented
from serving.routes.common import json_reply, services
from serving.table import check_entry

blueprint = Blueprint("models", __name__)


def _card(model_id: str) -> dict[str, Any]:
    table = services().table
    return protocol.model_card(model_id, table.created(model_id), table.card(model_id))


@blueprint.get("/v1/models")
@documented(responses.ModelList)
async def list_models() -> Response:
    return json_reply({"object": "list", "data": [_card(m) for m in services().table.ids]})


@blueprint.post("/v1/models")
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
    future = services().table.add(entry, load_now)
    if future is not None:
        with contextlib.suppress(ModelUnavailable):  # a failed load stays in the table as failed
            await asyncio.wrap_future(future)
    return json_reply(_card(entry.model_id), 201)


@blueprint.delete("/v1/models/<path:model>")
@documented(responses.ModelDeleted)
async def delete_model(model: str) -> Response:
    table = services().table
    model_id = table.resolve(model)
    await asyncio.to_thread(table.remove, model_id)
    return json_reply({"id": model_id, "object": "model", "deleted": True})


@blueprint.get("/v1/models/<path:model>")
@documented(responses.ModelCard)
async def get_model(model: str) -> Response:
    return json_reply(_card(services().table.resolve(model)))


async def _manage(action: str, data: protocol.ModelIdRequest) -> Response:
    table = services().table
    model_id = table.resolve(data.model_id)
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


@blueprint.post("/v1/models/status")
@documented(responses.ModelStatus)
@validate_request(protocol.ModelIdRequest)
async def model_status(data: protocol.ModelIdRequest) -> Response:
    return await _manage("status", data)


@blueprint.post("/v1/models/unload")
@documented(responses.ModelStatus)
@validate_request(protocol.ModelIdRequest)
async def model_unload(data: protocol.ModelIdRequest) -> Response:
    return await _manage("unload", data)


@blueprint.post("/v1/models/reload")
@documented(responses.ModelStatus)
@validate_request(protocol.ModelIdRequest)
async def model_reload(data: protocol.ModelIdRequest) -> Response:
    return await _manage("reload", data)
