"""Tokenizer, special token ids and chat template of a Plain (Hugging Face layout) checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from mrs.errors import LoadError
from mrs.loading.chat_template import tokenizer_template


@dataclass
class PlainTokenizer:
    tokenizer: PreTrainedTokenizerBase
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None
    add_bos: bool
    chat_template: str | None


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: not valid JSON ({e})") from None


def load_tokenizer(tok_dir: Path) -> PreTrainedTokenizerBase:
    # Imported on use: AutoTokenizer imports torch where it is installed (3 s of start-up
    # that a server of GGUF models, with their own tokenizers, does not need).
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        files = ", ".join(sorted(p.name for p in tok_dir.iterdir())) if tok_dir.is_dir() else "not a directory"
        raise LoadError(
            f"{tok_dir}: cannot load a tokenizer (need tokenizer.json, or vocab files; found: {files}): {e}"
        ) from None


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in (value if isinstance(value, (list, tuple)) else [value]))


def plain_tokenizer(model_dir: Path, tok_dir: Path, hf_config: dict) -> PlainTokenizer:
    """EOS ids come from generation_config.json (int or list), then config.json, then the tokenizer."""
    tokenizer = load_tokenizer(tok_dir)
    gen_path = model_dir / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else {}
    eos = _ids(generation.get("eos_token_id")) or _ids(hf_config.get("eos_token_id")) or _ids(tokenizer.eos_token_id)
    if not eos:
        raise LoadError(f"{model_dir}: no EOS token id in generation_config.json, config.json or the tokenizer")
    bos = generation.get("bos_token_id", hf_config.get("bos_token_id", tokenizer.bos_token_id))
    # Whether the tokenizer itself prepends BOS to raw text (llama does, gpt2 does not).
    probe = tokenizer("a")["input_ids"]
    add_bos = bos is not None and bool(probe) and probe[0] == bos
    return PlainTokenizer(tokenizer, eos, None if bos is None else int(bos), add_bos, tokenizer_template(tokenizer))
