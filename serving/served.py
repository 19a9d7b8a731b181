"""A loaded model as the HTTP layer sees it: engine, tokenizer, prompt encoding.

Prompt encoding runs in worker threads (``asyncio.to_thread``) because templates and
tokenizers are CPU work; the engine does everything else on its own thread.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mrs.config.schema import EngineConfig, ModelEntry
from mrs.engine.engine import Engine
from mrs.loading.chat_template import SelectedTemplate, render_chat, select_chat_template
from mrs.loading.checkpoint import Checkpoint

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServedModel:
    entry: ModelEntry
    checkpoint: Checkpoint
    engine: Engine
    chat_template: SelectedTemplate

    @property
    def tokenizer(self) -> Any:
        return self.checkpoint.tokenizer

    @property
    def context_limit(self) -> int:
        return self.engine.context_limit

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt's ids, with BOS when the checkpoint's raw prompts take one."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        bos = self.checkpoint.bos_token_id
        if self.checkpoint.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        text = render_chat(self.chat_template.template, messages, self.tokenizer,
                           model_id=self.entry.model_id, add_generation_prompt=add_generation_prompt)
        # The template writes BOS itself where the model wants one.
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def summary(self) -> str:
        stats = self.engine.stats()
        notes = "; ".join(self.checkpoint.notes)
        return (f"arch {self.checkpoint.config.arch}, context {self.context_limit}, "
                f"{stats['slots_total']} slots, warm-up {stats['warmup_s']:.1f}s"
                + (f"; {notes}" if notes else ""))

    def shutdown(self) -> None:
        self.engine.shutdown()


def load_served(entry: ModelEntry, engine_config: EngineConfig) -> ServedModel:
    """Load a checkpoint and start its engine (blocks until warm-up has compiled every bucket)."""
    from mrs.loading.load import load_checkpoint

    checkpoint = load_checkpoint(entry)
    template = select_chat_template(entry, checkpoint.chat_template)
    log.info("model %r: chat template from %s", entry.model_id, template.origin)
    for note in checkpoint.notes:
        log.info("model %r: %s", entry.model_id, note)
    engine = Engine(checkpoint, engine_config).start(wait=True)
    return ServedModel(entry, checkpoint, engine, template)
