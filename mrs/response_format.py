"""OpenAI's ``response_format`` and mistral.rs's ``grammar`` request fields, as engine grammars.

The same shapes for the HTTP API (``serving.protocol`` embeds these models) and the
Python API (``Pipeline.chat/generate(response_format=..., grammar=...)`` take them as
dicts), so both mean the same:

- ``{"type": "text"}``: no constraint.
- ``{"type": "json_object"}``: any JSON object.
- ``{"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}``:
  JSON valid against ``schema`` (any JSON value when absent). ``strict: true`` refuses
  schema keywords the grammar compiler does not implement; otherwise they are ignored.
- ``grammar: {"type": "regex" | "lark" | "json_schema", "value": ...}``: a regular
  expression, a Lark grammar (llguidance's dialect), or a JSON schema.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mrs.engine.types import Grammar
from mrs.errors import InvalidRequest


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, strict=True)  # as the protocol models


class JsonSchemaSpec(_Shape):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class TextFormat(_Shape):
    type: Literal["text"]


class JsonObjectFormat(_Shape):
    type: Literal["json_object"]


class JsonSchemaFormat(_Shape):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class GrammarSpec(_Shape):
    type: Literal["regex", "lark", "json_schema"]
    value: str | dict[str, Any]


def _parsed(adapter: TypeAdapter, value: Any, param: str) -> Any:
    """A Python API dict checked like the HTTP layer checks it (the same models)."""
    if value is None or isinstance(value, BaseModel):
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in (param, *first["loc"]))
        raise InvalidRequest(f"{where}: {first['msg']}", param=param) from None


_FORMAT = TypeAdapter(ResponseFormat)
_GRAMMAR = TypeAdapter(GrammarSpec)


def output_grammar(response_format: Any = None, grammar: Any = None) -> Grammar | None:
    """The engine grammar for a request's ``response_format`` and ``grammar`` (models, dicts, or a ``Grammar``)."""
    if isinstance(grammar, Grammar) and response_format is None:
        return grammar
    fmt = _parsed(_FORMAT, response_format, "response_format")
    spec = _parsed(_GRAMMAR, grammar, "grammar")
    if spec is not None and fmt is not None and fmt.type != "text":
        raise InvalidRequest("grammar: give either response_format or grammar, not both", param="grammar")
    if spec is not None:
        if spec.type != "json_schema" and not isinstance(spec.value, str):
            raise InvalidRequest(f"grammar.value: a {spec.type} grammar is a string", param="grammar")
        return Grammar(spec.type, spec.value, param="grammar")
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return Grammar("json_schema", {"type": "object"}, param="response_format")
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return Grammar("json_schema", schema, param="response_format", lenient=not fmt.json_schema.strict)
