"""Tool calling: OpenAI's ``tools``/``tool_choice`` as a prompt and a grammar, and the
model's reply parsed back into ``tool_calls``. Shared by the HTTP and Python APIs.

A call is written in the Hermes format (Qwen 2.5, Hermes and others are trained on it),
one block per call, blocks separated by a newline::

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

- ``tool_choice`` ``"none"`` (or no tools): no grammar, and the reply is plain text.
- ``"required"`` / ``{"type": "function", "function": {"name": ...}}``: the output is
  constrained to calls (of that function), arguments valid against its ``parameters``;
  one call, or one or more with ``parallel_tool_calls`` (the default).
- ``"auto"`` (the default with tools): calls, or a text reply. The text branch may not
  start with ``<`` or whitespace, so a reply that starts a call block finishes it.

Prompting: a chat template that reads ``tools`` (HF templates take ``tools=``) renders
them and the conversation's calls and results itself. Otherwise ``TOOL_PROMPT`` is put
in the system message, an assistant message's calls become its blocks above, and
``role: "tool"`` results become a user turn of ``<tool_response>`` blocks (consecutive
results merged into one turn, so templates that insist on alternating roles work).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from mrs.engine.grammar import JSON_OPTIONS
from mrs.engine.types import Grammar
from mrs.errors import InvalidRequest
from mrs.response_format import output_grammar

OPEN, CLOSE = "<tool_call>", "</tool_call>"

TOOL_PROMPT = """You can call functions. Their JSON schemas:
<tools>
{tools}
</tools>
To call a function, reply only with one block per call:
<tool_call>
{{"name": "<function name>", "arguments": <the arguments as a JSON object>}}
</tool_call>"""


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # as the protocol models: no 0 for false, no "1" for 1


class FunctionDef(_Shape):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Shape):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(_Shape):
    name: str


class NamedToolChoice(_Shape):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


_TOOL = TypeAdapter(Tool)
_CHOICE = TypeAdapter(ToolChoice)


def parse_tools(tools: Any, tool_choice: Any) -> tuple[list[Tool], ToolChoice | None]:
    """Python API dicts checked with the HTTP layer's models; ``tool_choice`` needs ``tools``."""
    try:
        parsed = [t if isinstance(t, Tool) else _TOOL.validate_python(t) for t in tools or []]
    except ValidationError as err:
        raise InvalidRequest(f"tools: {err.errors()[0]['msg']}", param="tools") from None
    try:
        choice = tool_choice if tool_choice is None or isinstance(tool_choice, BaseModel) else (
            _CHOICE.validate_python(tool_choice))
    except ValidationError as err:
        raise InvalidRequest(f"tool_choice: {err.errors()[0]['msg']}", param="tool_choice") from None
    if choice is not None and not parsed:
        raise InvalidRequest("tool_choice: only allowed when tools are given", param="tool_choice")
    names = [t.function.name for t in parsed]
    if len(set(names)) != len(names):
        raise InvalidRequest("tools: function names must be unique", param="tools")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise InvalidRequest(f"tool_choice: no tool named {choice.function.name!r} in tools", param="tool_choice")
    return parsed, choice


def calls_enabled(tools: list[Tool], choice: ToolChoice | None) -> bool:
    return bool(tools) and choice != "none"


def reply_grammar(tools: list[Tool], choice: ToolChoice | None, parallel: bool, response_format: Any = None,
                  grammar: Any = None) -> Grammar | None:
    """The one grammar of a chat reply: the tools' when calls are enabled, else the output format's."""
    output = output_grammar(response_format, grammar)
    if not calls_enabled(tools, choice):
        return output
    if output is not None:
        raise InvalidRequest(f"{output.param}: not supported together with tools (unless tool_choice is \"none\")",
                             param=output.param)
    return tool_grammar(tools, choice, parallel)


def tool_grammar(tools: list[Tool], choice: ToolChoice | None, parallel: bool = True) -> Grammar | None:
    """The grammar of the reply: calls only (``required``/named), calls or text (``auto``)."""
    if not calls_enabled(tools, choice):
        return None
    if isinstance(choice, NamedToolChoice):
        tools = [t for t in tools if t.function.name == choice.function.name]
    rules = [f"fn_{i}: %json {json.dumps(_call_schema(t))}" for i, t in enumerate(tools)]
    repeat = ' ("\\n" call)*' if parallel else ""
    start = "calls" if choice == "required" or isinstance(choice, NamedToolChoice) else "calls | TEXT"
    lark = "\n".join([
        "%llguidance {}",
        f"start: {start}",
        f"calls: call{repeat}",
        f'call: "{OPEN}\\n" ({" | ".join(f"fn_{i}" for i in range(len(tools)))}) "\\n{CLOSE}"',
        *rules,
        r"TEXT: /[^<\s](.|\n)*/",
    ])
    return Grammar("lark", lark, param="tools")


def _call_schema(tool: Tool) -> dict[str, Any]:
    fn = tool.function
    return {
        "type": "object",
        "properties": {"name": {"const": fn.name}, "arguments": fn.parameters or {"type": "object"}},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": {**JSON_OPTIONS, "lenient": not fn.strict},
    }


# ---- the prompt ----

def template_reads_tools(template: str | None) -> bool:
    return bool(template) and re.search(r"\btools\b", template) is not None


def _block(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {json.dumps(name, ensure_ascii=False)}, "arguments": {arguments}}}\n{CLOSE}'


def _arguments_value(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


def prompt_messages(messages: list[dict[str, Any]], tools: list[Tool], template: str | None
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """OpenAI-shaped messages (and tools) as ``template`` takes them: ``(messages, tools=)``."""
    if template_reads_tools(template):
        return [_native(m) for m in messages], [t.model_dump(exclude_none=True) for t in tools] or None
    out: list[dict[str, Any]] = []
    for m in messages:
        if m["role"] == "tool":
            response = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("tool_results"):
                out[-1]["content"] += "\n" + response
            else:
                out.append({"role": "user", "content": response, "tool_results": True})
        elif m.get("tool_calls"):
            blocks = [_block(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]]
            out.append({"role": m["role"], "content": "\n".join(filter(None, [m.get("content"), *blocks]))})
        else:
            out.append({"role": m["role"], "content": m.get("content") or ""})
    for m in out:
        m.pop("tool_results", None)
    if tools:
        described = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
        prompt = TOOL_PROMPT.format(tools=described)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


def _native(m: dict[str, Any]) -> dict[str, Any]:
    """HF's tool-calling message shape: arguments as objects, results with their call id."""
    out = {k: v for k, v in m.items() if v is not None}
    out.setdefault("content", "")
    if m.get("tool_calls"):
        out["tool_calls"] = [
            {**c, "function": {**c["function"], "arguments": _arguments_value(c["function"]["arguments"])}}
            for c in m["tool_calls"]
        ]
    return out


# ---- the reply ----

def _call_from(body: str) -> ToolCall | None:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    if not (isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(value.get("arguments"), dict)):
        return None
    return ToolCall(f"call_{uuid.uuid4().hex[:24]}", value["name"], json.dumps(value["arguments"], ensure_ascii=False))


class ToolCallParser:
    """Splits a reply, as it streams, into text and complete calls.

    Text that could be the start of a ``<tool_call>`` block is held back; a block is
    released as a call once closed, or as text if it does not parse.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._after_call = False  # drop the newline that separates blocks, however it arrives

    def _take(self, text: str) -> None:
        self._buffer += text
        if self._after_call:
            self._buffer = self._buffer.lstrip("\n")
            self._after_call = not self._buffer

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._take(text)
        out, calls = "", []
        while (start := self._buffer.find(OPEN)) >= 0 and (end := self._buffer.find(CLOSE, start)) >= 0:
            out += self._buffer[:start]
            body, self._buffer = self._buffer[start + len(OPEN):end], self._buffer[end + len(CLOSE):]
            if call := _call_from(body.strip()):
                calls.append(call)
                self._after_call = True
                self._take("")
            else:
                out += OPEN + body + CLOSE
        start = self._buffer.find(OPEN)
        if start < 0:  # hold back a tail that may begin a block
            start = len(self._buffer) - next(
                (k for k in range(len(OPEN) - 1, 0, -1) if self._buffer.endswith(OPEN[:k])), 0)
        out, self._buffer = out + self._buffer[:start], self._buffer[start:]
        return out, calls

    def finish(self) -> str:
        """What is left at the end (an unclosed block stays text)."""
        rest, self._buffer = self._buffer, ""
        return rest


def finish_reason(engine_reason: str, called: bool) -> str:
    """``tool_calls`` for a reply that made calls and ended on its own; a cut reply stays ``length``."""
    return "tool_calls" if called and engine_reason == "stop" else engine_reason


def parse_reply(text: str) -> tuple[str | None, list[ToolCall]]:
    """A whole reply as ``(content, tool_calls)``; content is None when only calls remain."""
    parser = ToolCallParser()
    content, calls = parser.feed(text)
    content += parser.finish()
    return (content.strip() or None) if calls else content, calls
