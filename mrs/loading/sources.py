"""Resolve model ids to local files: an existing path, or a Hugging Face hub repo.

Hub lookups go through ``huggingface_hub``: its cache is tried first
(``local_files_only``), then a download unless ``HF_HUB_OFFLINE`` is set. When
nothing is found, the ``LoadError`` names the id and every place looked.
"""

from __future__ import annotations

import os
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError

from mrs.errors import LoadError


def _hub_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE at import; re-read it so a later change is honoured.
    value = os.environ.get("HF_HUB_OFFLINE")
    if value is None:
        return bool(hub_constants.HF_HUB_OFFLINE)
    return value.strip().lower() in {"1", "on", "yes", "true"}


def _hub_snapshot(repo_id: str, allow_patterns: list[str] | None, looked: list[str]) -> Path | None:
    """A local snapshot of ``repo_id`` (cache first, then download), or None; ``looked`` gets each attempt."""
    attempts = [True] if _hub_offline() else [True, False]
    for local_only in attempts:
        where = f"hub cache {hub_constants.HF_HUB_CACHE}" if local_only else f"hub download {hub_constants.ENDPOINT}/{repo_id}"
        try:
            path = huggingface_hub.snapshot_download(
                repo_id, allow_patterns=allow_patterns, local_files_only=local_only
            )
        except HFValidationError as err:
            looked.append(f"hub: {repo_id!r} is not a valid repo id ({err})")
            return None
        except Exception as err:  # offline, missing repo, network: all mean "not here"
            looked.append(f"{where} ({type(err).__name__})")
            continue
        return Path(path)
    if _hub_offline():
        looked.append("hub download skipped (HF_HUB_OFFLINE is set)")
    return None


def resolve_model(model_id: str, allow_patterns: list[str] | None = None) -> Path:
    """A local file or directory for ``model_id`` (a path, or a hub repo id)."""
    looked: list[str] = []
    path = Path(model_id).expanduser()
    if path.exists():
        return path.resolve()
    looked.append(f"local path {path.resolve()}")
    snapshot = _hub_snapshot(model_id, allow_patterns, looked)
    if snapshot is not None:
        return snapshot
    raise LoadError(f"model {model_id!r} not found; looked in: " + "; ".join(looked))


def resolve_gguf(quantized_model_id: str, quantized_filename: str | None = None) -> Path:
    """The GGUF file named by a ``Gguf`` entry.

    ``quantized_model_id`` is a ``.gguf`` file, a directory, or a hub repo. Without a
    filename the location must hold exactly one ``.gguf``.
    """
    direct = Path(quantized_model_id).expanduser()
    if direct.is_file():
        if quantized_filename and direct.name != quantized_filename:
            raise LoadError(
                f"quantized_model_id {quantized_model_id!r} is a file, but quantized_filename "
                f"is {quantized_filename!r}; give the directory or drop the filename"
            )
        return direct.resolve()
    patterns = [quantized_filename] if quantized_filename else ["*.gguf"]
    root = resolve_model(quantized_model_id, allow_patterns=patterns)
    if quantized_filename:
        target = root / quantized_filename
        if not target.is_file():
            raise LoadError(f"GGUF file {quantized_filename!r} not found in {root} (model {quantized_model_id!r})")
        return target
    found = sorted(p for p in root.rglob("*.gguf") if p.is_file())
    if not found:
        raise LoadError(f"no .gguf file in {root} (model {quantized_model_id!r}); set quantized_filename")
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(root)) for p in found)
        raise LoadError(
            f"{root} holds several .gguf files ({names}); set quantized_filename to pick one"
        )
    return found[0]
