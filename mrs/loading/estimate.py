"""How many bytes a model would hold once loaded, from its files' headers (no weight read):
what the server's memory budget (``max_memory``) decides evictions with before a load.

Parameters: the GGUF file as stored (tensors stay packed), or the safetensors files scaled
from their stored dtype to the entry's (in-situ quantization is not subtracted, so the
figure errs high). KV cache: the page pool the engine allocates (``engine.kv_tokens`` or
``kv_memory``, see ``mrs.models.kv_cache.geometry``). Once a model has loaded, the server uses its measured
bytes instead.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from mrs.config.schema import GGUF, EngineConfig, ModelEntry
from mrs.loading.conversion import is_conversion, model_config, read_marker
from mrs.loading.gguf_config import model_config_from_gguf
from mrs.loading.gguf_reader import open_gguf
from mrs.loading.plain_tokenizer import read_json
from mrs.loading.safetensors_reader import resolve_dir, safetensors_files
from mrs.loading.sources import resolve_gguf
from mrs.models import kv_cache, registry
from mrs.models.config import ModelConfig

_SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                         "BOOL": 1}


def estimate_bytes(entry: ModelEntry, engine: EngineConfig) -> int:
    """Parameter plus KV cache bytes of ``entry`` served with ``engine``."""
    config, params = _config_and_param_bytes(entry)
    return params + kv_cache.cache_bytes(config, kv_cache.geometry(engine, config))


def _itemsize(dtype: str) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize  # numpy has no bfloat16


def _config_and_param_bytes(entry: ModelEntry) -> tuple[ModelConfig, int]:
    source = entry.model
    if source.kind == GGUF:
        path = resolve_gguf(source.quantized_model_id, source.quantized_filename)
        config = model_config_from_gguf(open_gguf(path), entry.dtype)
        return config, path.stat().st_size
    model_dir = resolve_dir(source.model_id)
    if is_conversion(source.model_id):
        stored = sum(f.stat().st_size for f in (model_dir / "params").rglob("*") if f.is_file())
        return model_config(read_marker(model_dir)["config"], model_dir), stored
    hf = read_json(model_dir / "config.json")
    config = registry.config_from_hf(source.arch or registry.detect_arch(hf), hf, dtype=entry.dtype)
    target = _itemsize(entry.dtype)
    total = 0
    for file in safetensors_files(model_dir):
        with open(file, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            count = int(np.prod(info["shape"], dtype=np.int64))
            total += count * (target if info["dtype"] in ("F32", "F16", "BF16", "F64") else
                              _SAFETENSORS_ITEMSIZE.get(info["dtype"], 4))
    return config, total
