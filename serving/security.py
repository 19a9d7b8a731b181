"""What a request must pass before any handler runs: its API key, its body's size and encoding.

Installed on the app by ``install``; CORS comes from quart-cors. The key check runs
first, so nothing of an unauthenticated request is read, and keys are compared in
constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from quart import Quart, Response, request
from quart_cors import cors

from mrs.config.schema import ServerConfig
from mrs.config.units import parse_size
from mrs.errors import ConfigError, InvalidRequest
from serving.errors import AuthenticationFailed, PermissionDenied

KEY_ENV = "MRS_API_KEY"
ALWAYS_OPEN = frozenset({"/health"})


@dataclass(frozen=True)
class Keys:
    """The server's keys: ``user`` keys call the API, ``admin`` keys also manage models."""

    user: tuple[bytes, ...] = ()
    admin: tuple[bytes, ...] = ()

    @classmethod
    def from_config(cls, server: ServerConfig, environ: Mapping[str, str]) -> "Keys":
        """``api_keys`` + the lines of ``api_key_file`` + ``$MRS_API_KEY``, and ``admin_api_keys``."""
        user = list(server.api_keys)
        if server.api_key_file:
            try:
                lines = Path(server.api_key_file).read_text().splitlines()
            except OSError as e:
                raise ConfigError(f"api_key_file {server.api_key_file!r}: {e.strerror}", param="api_key_file") from None
            user += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
        if environ.get(KEY_ENV):
            user.append(environ[KEY_ENV])
        for key in [*user, *server.admin_api_keys]:
            if not key or key != key.strip() or not key.isprintable():
                raise ConfigError("an API key must be non-empty printable text without surrounding spaces",
                                  param="api_keys")
        return cls(tuple(k.encode() for k in user), tuple(k.encode() for k in server.admin_api_keys))

    @property
    def enabled(self) -> bool:
        return bool(self.user or self.admin)

    def is_admin(self, given: bytes) -> bool:
        return _matches(given, self.admin)

    def is_valid(self, given: bytes) -> bool:
        return _matches(given, self.user) | self.is_admin(given)


def _matches(given: bytes, keys: tuple[bytes, ...]) -> bool:
    """Constant time in the key's content, and every key compared (no early exit)."""
    found = False
    for key in keys:
        found |= hmac.compare_digest(given, key)
    return found


def _is_management(method: str, path: str) -> bool:
    """Loading, unloading, adding and removing models (status is a read)."""
    return method in ("POST", "DELETE") and path.startswith("/v1/models") and path != "/v1/models/status"


def install(app: Quart, server: ServerConfig, keys: Keys) -> Quart:
    """Add the key check, the body cap and UTF-8 check, and CORS (when origins are set) to ``app``."""
    max_body = parse_size(server.max_body, "max_body")
    app.config["MAX_CONTENT_LENGTH"] = max_body  # Quart stops reading past it: 413
    app.config["MRS_MAX_BODY"] = max_body
    open_paths = ALWAYS_OPEN if server.metrics_need_key else ALWAYS_OPEN | {"/metrics"}
    preflight_open = bool(server.cors_origins)

    @app.before_request
    async def _guard() -> Response | None:
        if keys.enabled and request.path not in open_paths and not (preflight_open and request.method == "OPTIONS"):
            given = _bearer(request.headers.get("Authorization", ""))
            if given is None:
                raise AuthenticationFailed("missing API key: send the header 'Authorization: Bearer <key>'")
            if not keys.is_valid(given):
                raise AuthenticationFailed("invalid API key")
            if keys.admin and _is_management(request.method, request.path) and not keys.is_admin(given):
                raise PermissionDenied("managing models needs an admin API key (--admin-api-key)")
        if request.method in ("POST", "PUT", "PATCH"):
            body = await request.get_data(as_text=False)
            try:
                body.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InvalidRequest(f"the request body is not valid UTF-8 (byte {e.start})") from None
        return None

    if server.cors_origins:
        origins = "*" if "*" in server.cors_origins else list(server.cors_origins)
        app = cors(app, allow_origin=origins, allow_headers=["Authorization", "Content-Type"],
                   allow_methods=["GET", "POST", "DELETE", "OPTIONS"], max_age=600)
    return app


def _bearer(header: str) -> bytes | None:
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip().encode("latin-1")  # the header's own bytes (HTTP headers decode as latin-1)
