"""The VisionPlain loader: a Hugging Face multimodal directory -> a Checkpoint whose text
tower loads as Plain does and whose ``vision`` holds the image encoder and processor.

The text tower's tensors and the encoder's are read in two passes over the same files,
each pass reading only its own tensors.
"""

from __future__ import annotations

import jax.numpy as jnp
from transformers import AutoProcessor

from mrs.config.schema import ModelEntry
from mrs.errors import LoadError
from mrs.loading.checkpoint import Checkpoint, VisionParts
from mrs.loading.plain_tokenizer import read_json
from mrs.loading.safetensors_reader import load_plain, read_tensors, resolve_dir, safetensors_files
from mrs.models import registry
from mrs.models.params import nest


def load_vision_plain(entry: ModelEntry) -> Checkpoint:
    if not entry.model.model_id:
        raise LoadError(f"model {entry.model_id!r}: a VisionPlain model needs model.model_id")
    model_dir = resolve_dir(entry.model.model_id)
    checkpoint = load_plain(entry)
    hf = read_json(model_dir / "config.json")
    try:
        processor = AutoProcessor.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise LoadError(f"{model_dir}: no usable processor (preprocessor_config.json): {e}") from None
    try:
        vision = registry.get_vision_arch(checkpoint.config.arch)
        spec = vision.spec_from_hf(hf, processor, dtype=entry.dtype)
    except KeyError as e:
        raise LoadError(f"{model_dir / 'config.json'}: missing field {e}") from None
    except ValueError as e:
        raise LoadError(f"{model_dir}: {e}") from None
    keep = lambda name: vision.hf_name(name) is not None  # noqa: E731
    named = ((vision.hf_name(name), jnp.asarray(value))
             for name, value in read_tensors(safetensors_files(model_dir), jnp.dtype(entry.dtype), keep))
    params = nest(named)
    try:
        registry.check_encoder_params(spec, params)
    except KeyError as e:
        raise LoadError(f"{model_dir}: image encoder tensor missing: {e.args[0]}") from None
    except (TypeError, ValueError) as e:
        raise LoadError(f"{model_dir}: image encoder tensors do not fit arch {spec.arch!r}: {e}") from None
    checkpoint.vision = VisionParts(spec, params, processor)
    checkpoint.notes.append(f"vision: {spec.arch} image encoder, {spec.tokens_per_image} tokens per image")
    return checkpoint
