"""GGUF tensors -> the model's parameter tree (Hugging Face names and layouts).

llama.cpp's converter renames every tensor (``blk.N.attn_q.weight``), permutes the
rows of llama's q/k projections for its rope kernel, and stores gemma's norms as
``1 + w``. We undo each step, as transformers' GGUF loader does, so the weights
are exactly the ones the model's safetensors checkpoint would hold.
"""

from __future__ import annotations

import re
from typing import Any, Iterator

import jax.numpy as jnp
import numpy as np

from mrs.errors import LoadError
from mrs.loading.gguf_reader import GGUFFile, GGUFTensor
from mrs.models.config import ModelConfig
from mrs.models.family import GgufTables
from mrs.models.registry import get_gguf_tables, params_from_hf
from mrs.quant.gguf import gguf_tensor_to_jax, gguf_tensor_values

_TOP_LEVEL = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_TOP_NAME = re.compile(r"^(\w+)\.(weight|bias)$")


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (LoadError if unknown)."""
    table = get_gguf_tables(arch, gguf_name)
    if m := _BLOCK_NAME.match(gguf_name):
        layer, part, kind = m.groups()
        if part in table.block:
            return f"model.layers.{layer}.{table.block[part]}.{kind}"
    elif (m := _TOP_NAME.match(gguf_name)) and m.group(1) in _TOP_LEVEL:
        return f"{_TOP_LEVEL[m.group(1)]}.{m.group(2)}"
    raise LoadError(f"GGUF tensor {gguf_name!r} has no counterpart in the {arch} model")


def unpermute_qk_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (transformers' ``_reverse_permute_weights``).

    llama.cpp interleaves each head's two rotary halves; HF keeps them as two blocks.
    """
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


def _convert(t: GGUFTensor, hf_name: str, config: ModelConfig, table: GgufTables, keep_quantized: bool) -> Any:
    dtype = config.jnp_dtype
    if hf_name.endswith("norm.weight"):
        # Norms are small: always plain, and the +1 offset is undone in float32 before the cast.
        values = gguf_tensor_values(t.data, t.ggml_type, t.shape).astype(np.float32)
        return jnp.asarray(values - np.float32(1) if table.norms_offset else values, dtype=dtype)
    rows = None
    if table.permuted_qk and (".q_proj." in hf_name or ".k_proj." in hf_name):
        heads = config.num_heads if ".q_proj." in hf_name else config.num_kv_heads
        rows = unpermute_qk_rows(t.np_shape[0], heads)
    return gguf_tensor_to_jax(t.data, t.ggml_type, t.shape, keep_quantized=keep_quantized and len(t.shape) > 1,
                              dtype=dtype, rows=rows)


def iter_hf_tensors(g: GGUFFile, config: ModelConfig, keep_quantized: bool) -> Iterator[tuple[str, Any]]:
    """``(hf_name, value)`` for every tensor of ``g``, converted to the HF layout."""
    arch = g.architecture
    table = get_gguf_tables(arch, g.path)
    for t in g.tensors.values():
        name = hf_tensor_name(t.name, arch)
        yield name, _convert(t, name, config, table, keep_quantized)


def load_gguf_params(g: GGUFFile, config: ModelConfig, keep_quantized: bool) -> dict:
    """The nested parameter tree for ``module.apply({"params": ...})``."""
    return params_from_hf(config, iter_hf_tensors(g, config, keep_quantized))
