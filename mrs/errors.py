"""Typed errors shared by every layer. The HTTP layer maps each to an OpenAI error envelope."""

from __future__ import annotations


class MrsError(Exception):
    """Base class; ``param`` names the offending request field when there is one."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(MrsError):
    """A request field is missing, malformed or out of range (HTTP 400)."""


class ModelExists(InvalidRequest):
    """A model with that id is already configured (HTTP 409)."""


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus max_tokens exceed the model's context (HTTP 400, code context_length_exceeded)."""


class Overloaded(MrsError):
    """The engine's queue is full (HTTP 429 with Retry-After)."""


class ModelNotFound(MrsError):
    """No loaded model has the requested id (HTTP 404, code model_not_found)."""


class ModelUnavailable(MrsError):
    """The model is loading or unloaded (HTTP 503)."""


class ConfigError(MrsError):
    """A configuration file or field is wrong; the message names the entry and field."""


class LoadError(MrsError):
    """A checkpoint cannot be found or read (not GGUF, truncated, unsupported arch...)."""


class NoChatTemplate(InvalidRequest):
    """A chat request reached a model that has no chat template."""
