"""Warm starts: the step executables an engine loaded before it reported ready, read again
ahead of the engine when the same model starts with the same engine settings.

An engine finds its steps in the executable cache (``mrs.engine.executable_cache``) only
once its weights are converted: entries are keyed by the parameters' types. Loading them
(0.2-0.6 s each for the quickstart models) is C++ that lets go of the GIL, so instead of
waiting for the weights, each start notes which entries its engine used before ready, under
a key known before loading (mrs's source, the model entry, the engine config), and the next
start reads those on background threads while the tokenizer and weights load. An entry read
ahead that the engine does not ask for is dropped; nothing is read ahead of a first start.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from mrs.config.schema import EngineConfig, ModelEntry
from mrs.engine import executable_cache

log = logging.getLogger(__name__)

FOLDER = "warm-start"
_read_ahead: dict[str, list[str]] = {}  # key -> entries being read ahead for it


def key(entry: ModelEntry, engine: EngineConfig) -> str | None:
    """What names a model's warm start (None without a compilation cache directory)."""
    if executable_cache.version_folder() is None:
        return None
    described = (dataclasses.asdict(entry), dataclasses.asdict(engine))
    return hashlib.sha256(repr(described).encode()).hexdigest()[:32]


def _manifest(warm_key: str) -> Path:
    folder = executable_cache.version_folder()
    assert folder is not None
    return folder / FOLDER / f"{warm_key}.json"


def read_ahead(warm_key: str | None) -> None:
    """Start reading the entries the last start under ``warm_key`` used before ready."""
    if warm_key is None:
        return
    try:
        entries = json.loads(_manifest(warm_key).read_text())
    except (OSError, ValueError):  # a first start, or a damaged note: the engine loads as it goes
        return
    if isinstance(entries, list) and all(isinstance(e, str) for e in entries):
        _read_ahead[warm_key] = entries
        executable_cache.prefetch(entries)


def remember(warm_key: str | None, entries: list[str]) -> None:
    """Note the ``entries`` an engine used before ready under ``warm_key``; drop what was read
    ahead for it and not used."""
    if warm_key is None:
        return
    drop(warm_key)
    path = _manifest(warm_key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as file:  # whole or absent
            json.dump(sorted(set(entries)), file)
        os.replace(file.name, path)
    except OSError as error:  # a read-only cache: only slower
        log.debug("warm start not noted (%s): %s", path, error)


def drop(warm_key: str | None) -> None:
    """Forget what was read ahead under ``warm_key`` and not taken (a load that failed, or done)."""
    if warm_key is not None:
        executable_cache.drop_prefetched(_read_ahead.pop(warm_key, []))
