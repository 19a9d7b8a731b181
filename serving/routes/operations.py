"""``GET /health`` (200 once the default model serves) and ``GET /metrics`` (Prometheus)."""

from __future__ import annotations

from quart import Blueprint, Response, current_app
from quart_schema import hide

from serving import responses
from serving.responses import documented
from serving.routes.common import json_reply, services
from serving.table import FAILED

blueprint = Blueprint("operations", __name__)


@blueprint.get("/health")
@documented(responses.Health, errors=(503,))
async def health() -> Response:
    table = services().table
    statuses = {m: table.status(m) for m in table.ids}
    ready = current_app.config["MRS_STARTED"] and statuses[table.default_id] != FAILED
    return json_reply({"status": "ok" if ready else "loading", "models": statuses}, 200 if ready else 503)


@blueprint.get("/metrics")
@hide  # Prometheus text, not part of the OpenAI API
async def prometheus() -> Response:
    return Response(services().metrics.render(), content_type="text/plain; version=0.0.4; charset=utf-8")
