"""Tokenizers: built from GGUF metadata, or loaded from a model id.

For GGUF we hand the vocabulary, merges and token types we read to transformers'
own GGUF tokenizer builders (gpt2-style byte-level BPE, SentencePiece/llama,
gemma's variant), so our ids are the reference's by construction; the tests
check that on a mixed corpus. Building one takes seconds for a large vocabulary
(Gemma 3's 262k tokens: its merges are recomputed), so the result is kept in
``~/.cache/mrs/tokenizers`` (or ``MRS_TOKENIZER_CACHE_DIR``), keyed by the file and the
library versions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import tokenizers
import transformers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mrs.errors import LoadError
from mrs.loading.gguf_reader import GGUFFile
from mrs.loading.plain_tokenizer import load_tokenizer
from mrs.loading.sources import resolve_model

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("MRS_TOKENIZER_CACHE_DIR") or Path.home() / ".cache" / "mrs" / "tokenizers")

_SPECIAL = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unknown_token_id",
            "pad_token": "padding_token_id"}


def _tokenizer_fields(g: GGUFFile, renames: dict[str, str]) -> dict[str, Any]:
    return {name: g.get(f"tokenizer.{key}") for key, name in renames.items() if g.has(f"tokenizer.{key}")}


def gguf_add_bos(g: GGUFFile) -> bool:
    """Whether raw text starts with BOS; llama.cpp's default is yes for SentencePiece vocabularies."""
    flag = g.get("tokenizer.ggml.add_bos_token")
    return bool(flag) if flag is not None else g.get("tokenizer.ggml.model") == "llama"


def tokenizer_from_gguf(g: GGUFFile) -> PreTrainedTokenizerFast:
    """The tokenizer a GGUF file describes, with bos/eos/unk/pad and ``add_bos_token`` set;
    from the cache when this file's was built before."""
    stat = Path(g.path).stat()
    key = f"{Path(g.path).resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{tokenizers.__version__}"
    entry = CACHE_DIR / hashlib.sha256(key.encode()).hexdigest()[:32]
    try:
        kwargs = json.loads((entry / "kwargs.json").read_text(encoding="utf-8"))
        return PreTrainedTokenizerFast(tokenizer_file=str(entry / "tokenizer.json"), **kwargs)
    except Exception:  # not cached yet, or a damaged entry (tokenizers raises plain Exception): build it
        pass
    backend, kwargs = _build(g)
    _store(entry, backend, kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _store(entry: Path, backend: tokenizers.Tokenizer, kwargs: dict[str, Any]) -> None:
    """Write a cache entry, each file renamed into place (two servers may build it at once)
    and the kwargs file last, so a reader never sees half of one."""
    try:
        entry.mkdir(parents=True, exist_ok=True)
        partial = entry / f"tokenizer.json.{os.getpid()}"
        backend.save(str(partial))
        partial.replace(entry / "tokenizer.json")
        partial = entry / f"kwargs.json.{os.getpid()}"
        partial.write_text(json.dumps(kwargs), encoding="utf-8")
        partial.replace(entry / "kwargs.json")
    except (OSError, TypeError) as err:  # a read-only home, or kwargs JSON cannot hold: build it every time
        log.debug("cannot cache the tokenizer in %s: %s", entry, err)


def _build(g: GGUFFile) -> tuple[tokenizers.Tokenizer, dict[str, Any]]:
    """The backend tokenizer and ``PreTrainedTokenizerFast``'s keyword arguments."""
    # Imported here: a third of a second at every start, needed only when the cache misses.
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    spec = _tokenizer_fields(g, GGUF_TOKENIZER_MAPPING["tokenizer"])
    if "tokens" not in spec:
        raise LoadError(f"{g.path}: GGUF metadata has no tokenizer.ggml.tokens; set tok_model_id")
    try:
        backend, extra = convert_gguf_tokenizer(g.architecture, spec)
    except ValueError as err:
        raise LoadError(f"{g.path}: cannot build its tokenizer: {err}") from None
    kwargs: dict[str, Any] = dict(extra)
    kwargs["add_bos_token"] = gguf_add_bos(g)
    kwargs["add_eos_token"] = bool(g.get("tokenizer.ggml.add_eos_token", False))
    tokens = spec["tokens"]
    for name, key in _SPECIAL.items():
        token_id = g.get(f"tokenizer.ggml.{key}")
        if token_id is not None:
            kwargs[name] = tokens[int(token_id)]
    return backend, kwargs


def tokenizer_from_id(tok_model_id: str) -> PreTrainedTokenizerBase:
    """A tokenizer from a local directory or hub repo (``tok_model_id`` of an entry)."""
    root = resolve_model(tok_model_id, allow_patterns=["tokenizer*", "*.json", "*.model", "*.jinja"])
    return load_tokenizer(root)
