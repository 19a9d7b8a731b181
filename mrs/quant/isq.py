"""In-situ quantization (ISQ): quantize a loaded model's linear weights at load time,
and its token embedding and LM head when asked (``isq_embeddings``).

Accepts mistral.rs's names. Each name maps to one of our storages (see
``mrs.quant.qarray``); where names share a representation we say so here:

==========  ===============================================================  ==============
name        what mrs does                                                    bits / weight
==========  ===============================================================  ==============
Q4_0        ggml Q4_0: 4-bit symmetric, blocks of 32, float16 scale          4.5
Q4_1        ggml Q4_1: 4-bit with min, blocks of 32, float16 scale + min     5
Q4K, "4"    **same as Q4_1** (no super-block 6-bit scales: our matmul reads  5
            one scale per 32 anyway)
Q5_0        ggml Q5_0 values (5-bit symmetric), one byte per value           8.5
Q5_1        ggml Q5_1 values (5-bit with min), one byte per value            9
Q5K         **same as Q5_1**                                                 9
Q8_0, "8"   ggml Q8_0: int8, blocks of 32, float16 scale                     8.5
Q6K         6-bit symmetric, blocks of 32, float16 scale (packed as          6.5
            ``QArray``'s 6-bit storage; not ggml's Q6_K super-blocks, whose
            16-value sub-blocks would cost 8 bits per weight here)
Q8K         **same as Q8_0** (an 8-bit value takes a byte either way)        8.5
==========  ===============================================================  ==============

The 5-bit formats keep their ggml numerics but not ggml's memory saving (a value is
a byte here, so dequantization is a single pass); prefer Q4_* or Q8_0.

Each block's scale (and min) is searched for the least weighted squared error
(``mrs.quant.blockfit``) instead of taken from the block's max-abs as ggml's reference
quantizer does; the result is still ggml's block format (gguf-py's dequantizer reads
it), repacked by ``mrs.quant.ggml``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import gguf
import jax
import numpy as np
from gguf import GGMLQuantizationType as T

from mrs.errors import ConfigError
from mrs.quant.blockfit import quantize, quantize_six_bit
from mrs.quant.ggml import repack
from mrs.quant.gguf import to_device
from mrs.quant.qarray import QArray

SCHEMES: dict[str, T] = {
    "Q4_0": T.Q4_0,
    "Q4_1": T.Q4_1,
    "Q5_0": T.Q5_0,
    "Q5_1": T.Q5_1,
    "Q8_0": T.Q8_0,
    "Q4K": T.Q4_1,
    "Q5K": T.Q5_1,
    "Q6K": T.Q6_K,
    "Q8K": T.Q8_0,
    "4": T.Q4_1,
    "8": T.Q8_0,
}

# Modules whose 2-D "weight" is the token table or the LM head: ``quantize_params``'s
# ``embeddings`` scheme, not ``scheme``, applies to them (none by default).
EMBEDDING_MODULES = ("embed_tokens", "wte", "lm_head")
POSITION_TABLES = ("wpe",)  # never quantized: tiny, and read by absolute position


def resolve_scheme(name: str, field: str = "in_situ_quant") -> T:
    """The ggml type an ISQ name quantizes to, or a ConfigError naming ``field`` and the valid names."""
    key = str(name).strip()
    if key.upper() in SCHEMES:
        key = key.upper()
    if key not in SCHEMES:
        raise ConfigError(f"unknown {field} {name!r}; valid: {', '.join(SCHEMES)}", param=field)
    return SCHEMES[key]


def block_size(ggml_type: T) -> int:
    """Values per block an ISQ scheme's storage uses (Q6K: 32, see the table above)."""
    return 32 if ggml_type == T.Q6_K else gguf.GGML_QUANT_SIZES[ggml_type][0]


# A block quantizer: float ``[..., in]`` values -> ggml blocks ``[rows, bytes]`` (gguf-py's signature).
Quantizer = Callable[[np.ndarray, T], np.ndarray]


def quantize_array(w: Any, scheme: str | T, *, fmt: str | None = None, quantizer: Quantizer = quantize) -> QArray:
    """A float ``[..., in]`` array (or a QArray, re-quantized) as a device QArray.

    ``quantizer`` may be gguf-py's reference ``gguf.quants.quantize`` (for comparisons).
    """
    ggml_type = scheme if isinstance(scheme, T) else resolve_scheme(scheme)
    if isinstance(w, QArray):
        w = w.dequantize()
    values = np.asarray(w, dtype=np.float32)
    if ggml_type == T.Q6_K:  # our own 6-bit blocks (gguf-py has no Q6_K quantizer to compare with)
        packed = quantize_six_bit(values)
    else:
        packed = repack(quantizer(values, ggml_type), ggml_type, values.shape)
    if fmt is not None:
        packed = dataclasses.replace(packed, fmt=fmt)
    # Uncommitted (default device): committed params change the warmed-up steps' input
    # signature, so they compile again on the first request. Placement comes after.
    return to_device(packed)


def quantizable_group(path: tuple[str, ...], value: Any) -> str | None:
    """``"linear"`` for a linear layer's ``[out, in]`` weight, ``"embeddings"`` for the token
    table or LM head, None for anything else (norms, biases, position tables)."""
    if path[-1] != "weight" or len(getattr(value, "shape", ())) != 2 or len(path) < 2:
        return None
    module = path[-2]
    if module in POSITION_TABLES:
        return None
    return "embeddings" if module in EMBEDDING_MODULES else "linear"


def quantize_params(params: dict, scheme: str | None, *, embeddings: str | None = None,
                    quantizer: Quantizer = quantize) -> dict:
    """The params tree with every linear weight (attention, MLP) quantized to ``scheme``
    and the token embedding and LM head (one table when tied) to ``embeddings``.

    Either may be None: that group stays as loaded (mistral.rs keeps the tables in the
    model dtype; llama.cpp's Q4 files usually hold them in Q8_0 or Q6_K). Norms stay
    float. The tree alone says which leaves are which (2-D ``weight`` leaves, by module
    name), for every family. A weight whose input dim is not a multiple of the block
    size (32) stays as it is. ``quantizer`` as in ``quantize_array``.
    """
    targets = {"linear": _target(scheme, "in_situ_quant"), "embeddings": _target(embeddings, "isq_embeddings")}

    def convert(path: tuple[str, ...], value: Any) -> Any:
        target = targets.get(quantizable_group(path, value) or "")
        if target is None or value.shape[-1] % block_size(target[0]):
            return value
        return quantize_array(value, target[0], fmt=target[1], quantizer=quantizer)

    def walk(node: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, path + (k,)) for k, v in node.items()}
        return convert(path, node)

    return walk(params, ())


def _target(scheme: str | None, field: str) -> tuple[T, str] | None:
    """The ggml type and format label a scheme name stands for; None leaves the group alone."""
    if scheme is None:
        return None
    return resolve_scheme(scheme, field), str(scheme).strip().upper()


def tree_quant_summary(params: dict) -> dict[str, int]:
    """How many leaves of each storage format (``float32``, ``Q8_0``, ...) a tree holds."""
    counts: dict[str, int] = {}
    for leaf in jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QArray)):
        key = leaf.fmt if isinstance(leaf, QArray) else str(leaf.dtype)
        counts[key] = counts.get(key, 0) + 1
    return counts
