"""The Plain loader: a Hugging Face layout directory (config.json + safetensors) -> Checkpoint.

Weights are read with the ``safetensors`` library, one tensor at a time, cast to the
entry's dtype and handed to the arch's name mapper (``mrs.models.registry``). Single
files and sharded checkpoints (``model.safetensors.index.json``) both load; stored
dtypes may be float32, float16 or bfloat16.
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from mrs.config.schema import ModelEntry
from mrs.errors import LoadError
from mrs.loading import param_check
from mrs.loading.checkpoint import Checkpoint
from mrs.loading.plain_tokenizer import plain_tokenizer, read_json
from mrs.loading.sources import resolve_model
from mrs.models import registry
from mrs.models.config import ModelConfig

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


# What a Plain checkpoint needs from a hub repo (weights, configs, tokenizer files).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model"]


def resolve_dir(model_id: str) -> Path:
    """A local directory for a model id (a path, or a hub repo)."""
    path = resolve_model(model_id, allow_patterns=HUB_PATTERNS)
    if not path.is_dir():
        raise LoadError(f"model {model_id!r}: {path} is a file; a Plain model is a directory with config.json")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    """The shard files of a checkpoint: from the index when there is one, else model.safetensors."""
    index = model_dir / INDEX
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise LoadError(f"{index}: no 'weight_map'")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise LoadError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    if (model_dir / SINGLE).is_file():
        return [model_dir / SINGLE]
    found = ", ".join(sorted(p.name for p in model_dir.iterdir()))
    raise LoadError(f"{model_dir}: no {SINGLE} or {INDEX} (found: {found})")


def read_tensors(files: list[Path], dtype: Any, keep: Callable[[str], bool] = lambda name: True,
                 ) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor whose name ``keep`` accepts as a host numpy array, floating ones cast to ``dtype``.

    safetensors' numpy backend has no bfloat16, so we read through its flax backend
    pinned to the CPU device and view the result as numpy (no copy on CPU).
    """
    cpu = jax.devices("cpu")[0]
    for path in files:
        with safe_open(str(path), framework="flax") as f:
            for name in filter(keep, f.keys()):
                # Only around the read: a context held across ``yield`` would leak
                # into the caller and pin its device arrays to the CPU too.
                with jax.default_device(cpu):
                    value = np.asarray(f.get_tensor(name))
                if jnp.issubdtype(value.dtype, jnp.floating):
                    value = value.astype(dtype, copy=False)
                yield name, value


def _hf_name(flax_path: str) -> str:
    return re.sub(r"_(\d+)(?=\.|$)", r".\1", flax_path)


def load_params(config: ModelConfig, files: list[Path]) -> dict:
    """The module's parameter tree (device arrays), checked complete against the arch."""
    wanted = partial(registry.text_tensor, config.arch)
    named = ((name, jnp.asarray(value)) for name, value in read_tensors(files, config.jnp_dtype, wanted))
    params = registry.params_from_hf(config, named)
    try:
        param_check.check_params(config, params)
    except KeyError as e:
        missing = str(e.args[0]).removeprefix("missing parameter ")
        raise LoadError(
            f"{files[0].parent}: tensor {_hf_name(missing)!r} missing for arch {config.arch!r}"
        ) from None
    except (TypeError, ValueError) as e:
        raise LoadError(f"{files[0].parent}: tensors do not fit arch {config.arch!r}: {e}") from None
    return params


def load_plain(entry: ModelEntry) -> Checkpoint:
    """Load ``entry.model.model_id`` (a Plain checkpoint) with ``entry.dtype`` weights."""
    model_id = entry.model.model_id
    if not model_id:
        raise LoadError(f"model {entry.model_id!r}: a Plain model needs model.model_id")
    model_dir = resolve_dir(model_id)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise LoadError(f"{model_dir}: no config.json (not a Hugging Face model directory) and no "
                        "mrs-conversion.json (not a finished `mrs convert` output either)")
    hf = read_json(config_path)
    try:
        arch = entry.model.arch or registry.detect_arch(hf)
        config = registry.config_from_hf(arch, hf, dtype=entry.dtype)
    except KeyError as e:
        raise LoadError(f"{config_path}: missing field {e}") from None
    except ValueError as e:
        raise LoadError(f"{config_path}: {e}") from None
    tok_dir = resolve_dir(entry.model.tok_model_id) if entry.model.tok_model_id else model_dir
    tok = plain_tokenizer(model_dir, tok_dir, hf)  # before the weights: the cheaper failure first
    params = load_params(config, safetensors_files(model_dir))
    notes: list[str] = []
    template = tok.chat_template
    fallback = registry.get_arch(arch).fallback_chat_template
    if template is None and entry.chat_template is None and entry.jinja_explicit is None and fallback:
        template = fallback
        notes.append(f"fallback chat template in use ({arch} family: turns joined by EOS, DialoGPT convention)")
    return Checkpoint(
        config=config,
        params=params,
        tokenizer=tok.tokenizer,
        eos_token_ids=tok.eos_token_ids,
        bos_token_id=tok.bos_token_id,
        add_bos=tok.add_bos,
        chat_template=template,
        source=str(model_dir),
        notes=notes,
    )
