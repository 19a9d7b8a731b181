"""The Quart app: the routes (``serving.routes``, one blueprint per area) over the model table,
errors mapped in ``serving.errors``, and the guards of ``serving.security``.

Handlers only parse, route and shape; tokenization runs in worker threads and
generation on each model's engine thread, so the event loop never blocks.
"""

from __future__ import annotations

from quart import Quart, Response
from quart_schema import QuartSchema, RequestSchemaValidationError
from quart_schema.openapi import Info
from werkzeug.exceptions import HTTPException

from mrs.config.schema import ServerConfig
from serving import responses, security
from serving.errors import envelope, to_reply, validation_message
from serving.limits import Limits
from serving.metrics import Metrics
from serving.routes import BLUEPRINTS
from serving.routes.common import Services, json_reply
from serving.security import Keys
from serving.table import ModelTable


def create_app(table: ModelTable, server: ServerConfig | None = None, keys: Keys | None = None) -> Quart:
    server = server or ServerConfig()
    app = Quart("mrs")
    QuartSchema(app, info=Info(title="mrs", version="0.1.0"), openapi_path="/openapi.json",
                swagger_ui_path="/docs", redoc_ui_path=None, scalar_ui_path=None,
                openapi_provider_class=responses.OpenAPIWithStreams)
    app.extensions["mrs"] = Services(table, server, Limits.from_config(server), Metrics(table.stats))
    app.config["MRS_STARTED"] = False  # set by the runner once the default model serves
    app.config["RESPONSE_TIMEOUT"] = None  # a long generation is not a stalled response
    _error_handlers(app)
    for blueprint in BLUEPRINTS:
        app.register_blueprint(blueprint)
    return security.install(app, server, keys or Keys())


def _error_handlers(app: Quart) -> None:
    """The OpenAI envelope for every error, whoever raised it."""

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
        reply = to_reply(error)
        return json_reply(reply.body, reply.status, reply.headers)
