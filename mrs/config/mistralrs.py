"""The seed's (mistral.rs's) multi-model JSON config -> ``list[ModelEntry]``.

Two shapes are accepted:
- the seed's array: ``[{"model_id": "a", "model": {"Plain": {...}}, "in_situ_quant": ...}]``
- mistral.rs's older map: ``{"label": {"Plain": {...}, "alias": "a", ...}}``, where the
  API id is ``alias``, else the id inside the model spec.

Every field inside the model spec has a default (a Plain/VisionPlain ``model_id`` and a
Gguf ``quantized_model_id`` default to the entry's own id). Every error is a
``ConfigError`` naming the entry and the field, raised before any model loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mrs.config.schema import GGUF, PLAIN, VISION_PLAIN, ModelEntry, ModelSource
from mrs.config.units import parse_duration
from mrs.config.validate import check_unique_ids
from mrs.errors import ConfigError

# Spec name in JSON -> (ModelSource.kind, the keys it accepts).
_SPECS: dict[str, tuple[str, frozenset[str]]] = {
    "Plain": (PLAIN, frozenset({"model_id", "arch", "dtype", "tok_model_id"})),
    "VisionPlain": (VISION_PLAIN, frozenset({"model_id", "arch", "dtype", "tok_model_id"})),
    "Gguf": (GGUF, frozenset({"quantized_model_id", "quantized_filename", "tok_model_id", "dtype"})),
}
# Entry-level options shared by both shapes (isq_embeddings and all after in_situ_quant are mrs extensions).
_OPTIONS = frozenset({
    "chat_template", "jinja_explicit", "num_device_layers", "in_situ_quant",
    "isq_embeddings", "dtype", "dequantize_gguf", "tensor_parallel",
    "lazy", "keep_alive", "max_seqs", "max_seq_len", "prefill_buckets",
})
_DTYPES = ("float32", "bfloat16", "float16")


def load_multi_model_config(path: str | Path) -> list[ModelEntry]:
    """Read and parse a multi-model JSON file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read multi-model config {str(path)!r}: {e.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"multi-model config {str(path)!r} is not JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None
    return parse_multi_model_config(data, source=str(path))


def parse_multi_model_config(data: Any, source: str = "multi-model config") -> list[ModelEntry]:
    """Parse an already-decoded JSON value (array or map form)."""
    if isinstance(data, list):
        entries = [_array_entry(item, f"{source}: entry {i}") for i, item in enumerate(data)]
    elif isinstance(data, dict):
        entries = [_map_entry(label, item, f"{source}: entry {label!r}") for label, item in data.items()]
    else:
        raise ConfigError(
            f"{source}: expected a JSON array of model entries (or mistral.rs's object form), "
            f"got {type(data).__name__}"
        )
    if not entries:
        raise ConfigError(f"{source}: no model entries")
    check_unique_ids(entries, source)
    return entries


def _array_entry(item: Any, where: str) -> ModelEntry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected an object, got {type(item).__name__}")
    unknown = set(item) - {"model_id", "model"} - _OPTIONS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: model_id, model, {', '.join(sorted(_OPTIONS))}",
            param=sorted(unknown)[0],
        )
    model_id = item.get("model_id")
    if not isinstance(model_id, str) or not model_id:
        raise ConfigError(f"{where}: missing or empty 'model_id' (the id API requests use)", param="model_id")
    where = f"{where} ({model_id!r})"
    spec = item.get("model", {"Plain": {}})
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{where}: 'model' must be an object with exactly one of {', '.join(_SPECS)}", param="model"
        )
    (name, fields), = spec.items()
    source, dtype = _source(name, fields, model_id, f"{where}: model")
    return _entry(model_id, source, dtype, item, where)


def _map_entry(label: str, item: Any, where: str) -> ModelEntry:
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected an object, got {type(item).__name__}")
    specs = [k for k in item if k in _SPECS]
    if len(specs) != 1:
        raise ConfigError(f"{where}: needs exactly one of {', '.join(_SPECS)}, found {len(specs)}", param="model")
    unknown = set(item) - set(_SPECS) - {"alias"} - _OPTIONS
    if unknown:
        raise ConfigError(
            f"{where}: unknown key {sorted(unknown)[0]!r}; allowed: {', '.join(_SPECS)}, alias, "
            f"{', '.join(sorted(_OPTIONS))}",
            param=sorted(unknown)[0],
        )
    name = specs[0]
    source, dtype = _source(name, item[name], None, where)
    alias = item.get("alias")
    if alias is not None and (not isinstance(alias, str) or not alias):
        raise ConfigError(f"{where}: 'alias' must be a non-empty string", param="alias")
    model_id = alias or (source.quantized_model_id if source.kind == GGUF else source.model_id)
    if not model_id:
        id_field = "quantized_model_id" if source.kind == GGUF else "model_id"
        raise ConfigError(f"{where}: missing {name}.{id_field} (and no alias)", param=id_field)
    return _entry(model_id, source, dtype, item, f"{where} ({model_id!r})")


def _source(name: str, fields: Any, default_id: str | None, where: str) -> tuple[ModelSource, str | None]:
    if name not in _SPECS:
        raise ConfigError(f"{where}: unknown model type {name!r}; expected one of {', '.join(_SPECS)}", param="model")
    kind, allowed = _SPECS[name]
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}.{name}: expected an object, got {type(fields).__name__}")
    unknown = set(fields) - allowed
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{where}.{name}: unknown key {key!r}; allowed: {', '.join(sorted(allowed))}", param=key
        )
    for key, value in fields.items():
        if value is not None and not isinstance(value, str):
            if not (key == "quantized_filename" and _single_string_list(value)):
                raise ConfigError(f"{where}.{name}.{key}: expected a string, got {json.dumps(value)}", param=key)
    filename = fields.get("quantized_filename")
    if isinstance(filename, list):  # mistral.rs accepts a list for split files; we take one file
        filename = filename[0]
    source = ModelSource(
        kind=kind,
        model_id=fields.get("model_id", default_id) if kind != GGUF else None,
        arch=fields.get("arch"),
        quantized_model_id=fields.get("quantized_model_id", default_id) if kind == GGUF else None,
        quantized_filename=filename,
        tok_model_id=fields.get("tok_model_id"),
    )
    return source, _dtype(fields.get("dtype"), f"{where}.{name}.dtype")


def _single_string_list(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 1 and isinstance(value[0], str)


def _dtype(value: Any, where: str) -> str | None:
    if value is None or value == "auto":
        return None
    if value not in _DTYPES:
        raise ConfigError(f"{where}: unknown dtype {value!r}; expected auto or one of {', '.join(_DTYPES)}",
                          param="dtype")
    return value


def _entry(model_id: str, source: ModelSource, dtype: str | None, item: dict, where: str) -> ModelEntry:
    entry = ModelEntry(model_id=model_id, model=source)
    for key in ("chat_template", "jinja_explicit", "in_situ_quant", "isq_embeddings"):
        value = item.get(key)
        if value is not None and not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {json.dumps(value)}", param=key)
        setattr(entry, key, value)
    layers = item.get("num_device_layers")
    if isinstance(layers, str):
        layers = [layers]
    if layers is not None and not (isinstance(layers, list) and all(isinstance(x, str) for x in layers)):
        raise ConfigError(
            f"{where}: 'num_device_layers' must be a list of strings like [\"8\"] or [\"0:16;1:14\"], "
            f"got {json.dumps(layers)}",
            param="num_device_layers",
        )
    entry.num_device_layers = layers
    entry.dtype = _dtype(item.get("dtype"), f"{where}: dtype") or dtype or entry.dtype
    if "dequantize_gguf" in item:
        if not isinstance(item["dequantize_gguf"], bool):
            raise ConfigError(f"{where}: 'dequantize_gguf' must be true or false", param="dequantize_gguf")
        entry.dequantize_gguf = item["dequantize_gguf"]
    tp = item.get("tensor_parallel")
    if tp is not None and (not isinstance(tp, int) or isinstance(tp, bool) or tp < 1):
        raise ConfigError(f"{where}: 'tensor_parallel' must be a positive integer", param="tensor_parallel")
    entry.tensor_parallel = tp
    if "lazy" in item:
        if not isinstance(item["lazy"], bool):
            raise ConfigError(f"{where}: 'lazy' must be true or false", param="lazy")
        entry.lazy = item["lazy"]
    if item.get("keep_alive") is not None:
        entry.keep_alive = str(item["keep_alive"])
        try:
            parse_duration(entry.keep_alive, "keep_alive")
        except ConfigError as e:
            raise ConfigError(f"{where}: {e.message}", param="keep_alive") from None
    for key in ("max_seqs", "max_seq_len"):
        value = item.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: '{key}' must be a positive integer", param=key)
        setattr(entry, key, value)
    buckets = item.get("prefill_buckets")
    if buckets is not None:
        if not (isinstance(buckets, list) and buckets and all(isinstance(b, int) and b >= 1 for b in buckets)):
            raise ConfigError(f"{where}: 'prefill_buckets' must be a list of positive integers", param="prefill_buckets")
        entry.prefill_buckets = sorted(set(buckets))
    return entry
