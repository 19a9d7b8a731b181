"""``load_checkpoint``: one entry point for every checkpoint kind.

Dispatches on ``entry.model.kind`` and then applies the entry's chat-template
fields, so every loader gets the same precedence (see ``mrs.loading.chat_template``).
"""

from __future__ import annotations

from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, ModelEntry
from mrs.errors import ConfigError, LoadError
from mrs.loading.chat_template import select_chat_template
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.gguf_loader import load_gguf
from mrs.loading.safetensors_reader import load_plain


def load_checkpoint(entry: ModelEntry) -> Checkpoint:
    kind = entry.model.kind
    if kind == GGUF:
        checkpoint = load_gguf(entry)
    elif kind == PLAIN:
        checkpoint = load_plain(entry)
    elif kind == VISION_PLAIN:
        raise LoadError(f"model {entry.model_id!r}: vision-plain models are not supported yet")
    else:
        raise ConfigError(
            f"model {entry.model_id!r}: unknown model kind {kind!r}; expected {PLAIN}, {GGUF} or {VISION_PLAIN}",
            param="model.kind",
        )
    selected = select_chat_template(entry, checkpoint.chat_template)
    if selected.origin != "checkpoint":
        checkpoint.notes.append(f"chat template: {selected.origin}")
    checkpoint.chat_template = selected.template
    return checkpoint
