"""Chat templates: which one applies to a model, and rendering it under HF semantics.

Precedence, highest first: the entry's ``jinja_explicit`` file, its ``chat_template``
field (a file path or a literal template), the checkpoint's own (tokenizer_config /
chat_template.jinja), then the GGUF metadata. Loaders report the last two as
``Checkpoint.chat_template``; ``select_chat_template`` applies the entry's fields.

Rendering reuses transformers' ``render_jinja_template`` (the sandboxed jinja2
environment behind ``apply_chat_template``: ``raise_exception``, ``tojson``,
``strftime_now``, tools), so a prompt is byte-identical to the reference's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from mrs.config.schema import ModelEntry
from mrs.errors import ConfigError, InvalidRequest, NoChatTemplate

_JINJA_MARKERS = ("{{", "{%", "{#")


@dataclass(frozen=True)
class SelectedTemplate:
    template: str | None
    origin: str  # e.g. "jinja_explicit /x.jinja", "checkpoint", "none"


def _read_template_file(path: Path, field: str, model_id: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"model {model_id!r}: cannot read {field} file {path}: {err}", param=field) from None


def select_chat_template(entry: ModelEntry, checkpoint_template: str | None) -> SelectedTemplate:
    """The template a model uses, by the precedence in the module docstring."""
    if entry.jinja_explicit:
        path = Path(entry.jinja_explicit).expanduser()
        return SelectedTemplate(_read_template_file(path, "jinja_explicit", entry.model_id), f"jinja_explicit {path}")
    if entry.chat_template:
        value = entry.chat_template
        path = Path(value).expanduser()
        if any(marker in value for marker in _JINJA_MARKERS):
            return SelectedTemplate(value, "chat_template (literal)")
        if path.is_file():
            return SelectedTemplate(_read_template_file(path, "chat_template", entry.model_id), f"chat_template {path}")
        raise ConfigError(
            f"model {entry.model_id!r}: chat_template {value!r} is neither an existing file nor a jinja template",
            param="chat_template",
        )
    if checkpoint_template:
        return SelectedTemplate(checkpoint_template, "checkpoint")
    return SelectedTemplate(None, "none")


def tokenizer_template(tokenizer: PreTrainedTokenizerBase) -> str | None:
    """The tokenizer's own template; of several named ones, ``default``."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return template.get("default")
    return template or None


def render_chat(
    template: str | None,
    messages: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    *,
    model_id: str,
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """The prompt text for ``messages``, as ``tokenizer.apply_chat_template(..., tokenize=False)``.

    Tokenize the result with ``add_special_tokens=False``: the template writes BOS itself.
    """
    if template is None:
        raise NoChatTemplate(
            f"model {model_id!r} has no chat template; use the completions endpoint or set "
            "chat_template / jinja_explicit in its entry",
            param="messages",
        )
    context = {**tokenizer.special_tokens_map, **extra}
    try:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except jinja2.TemplateError as err:  # raise_exception() in the template lands here too
        raise InvalidRequest(f"chat template of model {model_id!r} rejected the messages: {err}", param="messages") from None
    except (TypeError, ValueError) as err:
        raise InvalidRequest(f"invalid messages for model {model_id!r}: {err}", param="messages") from None
    return rendered[0]
