"""mrs conversions: a model's ready-to-serve parameters in an Orbax checkpoint, with what serving needs.

Our counterpart of mistral.rs's UQFF. ``mrs convert`` loads a model entry once
(reading, casting, in-situ quantizing) and writes the result; a ``Plain`` entry whose
``model_id`` is such a directory restores it without doing that work again.

    DIR/mrs-conversion.json  format and version, ModelConfig, EOS/BOS/add_bos, chat template,
                             in_situ_quant, isq_embeddings, source, notes, and the parameters'
                             layout (param_spec)
    DIR/tokenizer/           tokenizer.save_pretrained
    DIR/params/              orbax-checkpoint PyTree (uncompressed: quantized blocks barely compress,
                             and restore speed is the point)

The marker file is written last, so an interrupted conversion is never taken for one.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np

from mrs.config.schema import ModelEntry
from mrs.errors import ConfigError, LoadError
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.param_spec import abstract_params, param_spec
from mrs.loading.plain_tokenizer import load_tokenizer, read_json
from mrs.loading.safetensors_reader import resolve_dir
from mrs.models.config import ModelConfig
from mrs.quant import resolve_scheme

FORMAT = "mrs-conversion"
# Bump when what is stored changes meaning: the QArray storage layout (mrs.quant.qarray),
# parameter names or shapes of an arch, or this module's metadata fields.
VERSION = 1
MARKER = "mrs-conversion.json"
TOKENIZER = "tokenizer"
PARAMS = "params"


def is_conversion(model_id: str | None) -> bool:
    """Whether ``model_id`` is a local directory written by ``mrs convert``."""
    return bool(model_id) and (Path(model_id).expanduser() / MARKER).is_file()


def check_out_dir(out: str | Path) -> Path:
    """``out`` as an absolute path, if it is free (missing or an empty directory)."""
    path = Path(out).expanduser().resolve()
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(f"out={path} already exists and is not an empty directory; remove it or pick another",
                          param="out")
    return path


def save_conversion(checkpoint: Checkpoint, out: str | Path) -> Path:
    """Write ``checkpoint`` as it is (quantized or not) to the free directory ``out``."""
    import orbax.checkpoint as ocp  # here: at module level it slowed every server's start

    root = check_out_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    checkpoint.tokenizer.save_pretrained(root / TOKENIZER)
    ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_compression=False)).save(
        root / PARAMS, args=ocp.args.PyTreeSave(checkpoint.params)
    )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "source": checkpoint.source,
        "in_situ_quant": checkpoint.in_situ_quant,
        "isq_embeddings": checkpoint.isq_embeddings,
        "config": dataclasses.asdict(checkpoint.config),
        "eos_token_ids": list(checkpoint.eos_token_ids),
        "bos_token_id": checkpoint.bos_token_id,
        "add_bos": checkpoint.add_bos,
        "chat_template": checkpoint.chat_template,
        "notes": checkpoint.notes,
        "params": param_spec(checkpoint.params),
    }
    (root / MARKER).write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return root


def load_conversion(entry: ModelEntry) -> Checkpoint:
    """The checkpoint in the conversion ``entry.model.model_id``, parameters on the default device.

    The weights are served as converted: ``in_situ_quant`` and ``isq_embeddings``, when
    the entry gives them, must store the same way as the conversion's (re-quantizing would compound rounding
    silently); the conversion's dtype wins over the entry's, with a note when they differ.
    """
    root = Path(str(entry.model.model_id)).expanduser().resolve()
    meta = read_marker(root)
    config = model_config(meta["config"], root)
    _check_entry(entry, meta, config, root)
    tok_dir = resolve_dir(entry.model.tok_model_id) if entry.model.tok_model_id else root / TOKENIZER
    notes = [f"restored from an mrs conversion of {meta['source']}"]
    notes += [f"at conversion: {note}" for note in meta["notes"]]
    if entry.dtype != config.dtype:
        notes.append(f"dtype {config.dtype} from the conversion (the entry's {entry.dtype} needs a new conversion)")
    return Checkpoint(
        config=config,
        params=restore_params(root / PARAMS, meta["params"]),
        tokenizer=load_tokenizer(tok_dir),
        eos_token_ids=tuple(meta["eos_token_ids"]),
        bos_token_id=meta["bos_token_id"],
        add_bos=meta["add_bos"],
        chat_template=meta["chat_template"],
        source=f"{root} (mrs conversion)",
        notes=notes,
        in_situ_quant=meta["in_situ_quant"],
        isq_embeddings=meta.get("isq_embeddings"),  # absent from conversions written before it existed
    )


def read_marker(root: Path) -> dict[str, Any]:
    """The conversion's metadata; a LoadError unless ``root`` is a conversion this mrs reads."""
    path = root / MARKER
    if not path.is_file():
        raise LoadError(f"{root} is not an mrs conversion (no {MARKER}; `mrs convert ... out=DIR` writes it last)")
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise LoadError(f"{path} is not an mrs conversion marker (expected format {FORMAT!r})")
    if meta.get("version") != VERSION:
        raise LoadError(
            f"{root} is an mrs conversion of format version {meta.get('version')!r}, but this mrs reads "
            f"version {VERSION}; convert the model again with `mrs convert`"
        )
    return meta


def restore_params(path: Path, spec: dict[str, Any]) -> dict[str, Any]:
    """The parameter tree at ``path``, laid out as ``spec`` says, on the default device.

    Orbax reads host arrays and one ``device_put`` places them, uncommitted, as every
    loader's parameters are: committed parameters give the engine's jitted steps a
    second input signature after the first step, i.e. fresh compiles while serving.
    """
    import orbax.checkpoint as ocp  # here, as in save_conversion

    target = abstract_params(spec)
    args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype), target)
    try:
        host = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).restore(
            path, args=ocp.args.PyTreeRestore(item=target, restore_args=args)
        )
    except Exception as err:  # orbax and tensorstore raise many types; all mean "unreadable here"
        raise LoadError(f"{path}: cannot restore the converted parameters ({type(err).__name__}: {err})") from None
    return jax.device_put(host)


def model_config(data: dict[str, Any], root: Path) -> ModelConfig:
    try:  # JSON turned the config's tuples into lists
        return ModelConfig(**{key: tuple(v) if isinstance(v, list) else v for key, v in data.items()})
    except (TypeError, ValueError) as err:
        raise LoadError(f"{root}: the conversion's model config does not fit this mrs ({err}); convert again") from None


def _check_entry(entry: ModelEntry, meta: dict[str, Any], config: ModelConfig, root: Path) -> None:
    if entry.model.arch and entry.model.arch != config.arch:
        raise ConfigError(f"model {entry.model_id!r}: arch {entry.model.arch!r}, but {root} holds a "
                          f"{config.arch!r} model", param="model.arch")
    for field in ("in_situ_quant", "isq_embeddings"):
        wanted, stored = getattr(entry, field), meta.get(field)
        if wanted and (stored is None or resolve_scheme(wanted, field) != resolve_scheme(stored, field)):
            done = f"{field}={stored}" if stored else f"no {field}"
            raise ConfigError(
                f"model {entry.model_id!r}: {root} was converted with {done}, the entry asks for "
                f"{field}={wanted}; drop {field} to serve the conversion as it is, or convert "
                f"again with model.{field}={wanted}",
                param=field,
            )
