"""ggml quantized blocks (as stored in GGUF files): repacked into QArray storage, or encoded, in numpy.

Every repacking is lossless (dequantizing the QArray gives gguf-py's reference
values bit for bit):
- Q8_0 -> int8 blocks of 32, float16 scale (the same bits as ggml).
- Q4_0 / Q4_1 -> 4-bit row pairs (see ``QArray``), float16 scale (and float16 min
  for Q4_1). A tensor with an odd number of rows keeps a byte per value instead.
- Q5_0 / Q5_1 -> the 5-bit values in int8 blocks of 32 (8.5 / 9 bits per weight
  instead of ggml's 5.5 / 6: a byte per value is what makes dequantization one pass).
- Q4_K -> 4-bit row pairs, blocks of 32 with a float32 scale ``d * sc`` and min ``-dmin * m``
  per block (6 bits per weight instead of 4.5: the two-level 6-bit scales are folded
  into one exact float32 per block).
- Q6_K -> 6-bit storage (row pairs of the low nibbles plus row quads of the top two
  bits), blocks of 16 with a float32 scale ``d * sc`` (8 bits per weight instead of
  6.56: the product of the two scale levels is kept exact).

``encode`` is the other direction for the block formats ISQ writes: integers and
float16 scales (``mrs.quant.blockfit``) laid out as ggml's bytes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as T

from mrs.quant.qarray import ROW_GROUP, QArray, pack

# GGUF types kept packed (everything else is expanded to a float array).
REPACKABLE = (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q4_K, T.Q6_K)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's Q4 bytes ``[..., n]`` (value j low, value j + n high) -> values ``[..., 2n]``."""
    return np.concatenate([qs & np.uint8(0xF), qs >> np.uint8(4)], axis=-1)


def packed(values: np.ndarray, scale: np.ndarray, min_: np.ndarray | None, bits: int, **meta: object) -> QArray:
    """Unsigned 4- or 6-bit values ``[rows, nblocks, block]`` in ``bits`` storage, or a byte
    each when the packing's row groups (pairs, quads) do not divide the rows."""
    values = values.astype(np.uint8)
    if values.shape[0] % ROW_GROUP[bits]:
        return QArray(values, scale, min_, bits=8, **meta)
    data, high = pack(values, bits)
    return QArray(data, scale, min_, high=high, bits=bits, **meta)


def _nibble_bytes(values: np.ndarray) -> np.ndarray:
    """Values ``[..., 2n]`` (low 4 bits used) -> ggml's Q4 bytes ``[..., n]``: the inverse of ``_nibbles``."""
    half = values.shape[-1] // 2
    return (values[..., :half] & np.uint8(0xF)) | (values[..., half:] << np.uint8(4))


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _q4_k_scale_min(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The eight 6-bit (scale, min) pairs packed in Q4_K's 12 scale bytes: ``[..., 8]`` each."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def repack(data: np.ndarray, ggml_type: T, shape: tuple[int, ...]) -> QArray:
    """A GGUF tensor's raw blocks (``[rows, bytes_per_row]`` uint8) as a numpy-backed QArray.

    ``shape`` is numpy order (``[out, in]``).
    """
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    rows = int(np.prod(shape[:-1]))
    if shape[-1] % block_size:
        raise ValueError(f"{ggml_type.name} tensor of shape {shape}: last dim not a multiple of {block_size}")
    nblocks = shape[-1] // block_size
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(rows, nblocks, type_size)
    shape = tuple(int(d) for d in shape)
    name = ggml_type.name

    if ggml_type == T.Q8_0:
        return QArray(raw[..., 2:].view(np.int8), _f16(raw[..., :2]), None, shape=shape, fmt=name)
    if ggml_type == T.Q4_0:
        return packed(_nibbles(raw[..., 2:]), _f16(raw[..., :2]), None, 4, shape=shape, zero=8, fmt=name)
    if ggml_type == T.Q4_1:
        return packed(_nibbles(raw[..., 4:]), _f16(raw[..., :2]), _f16(raw[..., 2:4]), 4, shape=shape, fmt=name)
    if ggml_type in (T.Q5_0, T.Q5_1):
        head = 2 if ggml_type == T.Q5_0 else 4
        qh = np.ascontiguousarray(raw[..., head:head + 4]).view(np.uint32)  # [rows, nblocks, 1]
        high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # bit j: value j's 5th bit
        values = _nibbles(raw[..., head + 4:]) | (high << np.uint8(4))
        if ggml_type == T.Q5_0:
            return QArray((values.astype(np.int16) - 16).astype(np.int8), _f16(raw[..., :2]), None, shape=shape, fmt=name)
        return QArray(values.view(np.int8), _f16(raw[..., :2]), _f16(raw[..., 2:4]), shape=shape, fmt=name)
    if ggml_type == T.Q4_K:
        d = _f16(raw[..., 0:2]).astype(np.float32)[..., None]
        dmin = _f16(raw[..., 2:4]).astype(np.float32)[..., None]
        sc, mn = _q4_k_scale_min(raw[..., 4:16])
        # qs: four chunks of 32 bytes; low nibbles are sub-block 2c, high nibbles 2c+1.
        qs = raw[..., 16:].reshape(rows, nblocks, 4, 1, 32) >> np.array([0, 4], np.uint8)[:, None]
        values = (qs & np.uint8(0xF)).reshape(rows, nblocks * 8, 32)
        scale = (d * sc).reshape(rows, nblocks * 8)
        min_ = (-dmin * mn).reshape(rows, nblocks * 8)
        return packed(values, scale, min_, 4, shape=shape, fmt=name)
    if ggml_type == T.Q6_K:
        ql, qh = raw[..., :128], raw[..., 128:192]
        sc = np.ascontiguousarray(raw[..., 192:208]).view(np.int8).astype(np.float32)
        d = _f16(raw[..., 208:210]).astype(np.float32)[..., None]
        low = (ql.reshape(rows, nblocks, 2, 1, 64) >> np.array([0, 4], np.uint8)[:, None]) & np.uint8(0xF)
        high = (qh.reshape(rows, nblocks, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8)[:, None]) & np.uint8(3)
        values = low.reshape(rows, nblocks, 8, 32) | (high.reshape(rows, nblocks, 8, 32) << np.uint8(4))
        values = values.reshape(rows, nblocks * 16, 16)
        return packed(values, (d * sc).reshape(rows, nblocks * 16), None, 6, shape=shape, block=16, zero=32, fmt=name)
    raise ValueError(f"cannot repack GGML type {name}; repackable: {', '.join(t.name for t in REPACKABLE)}")


# ggml's stored integer is the signed value plus this offset (Q4_0, Q5_0 store it unsigned).
_OFFSET = {T.Q8_0: 0, T.Q4_0: 8, T.Q4_1: 0, T.Q5_0: 16, T.Q5_1: 0}
ENCODABLE = tuple(_OFFSET)


def encode(q: np.ndarray, d: np.ndarray, m: np.ndarray | None, ggml_type: T) -> np.ndarray:
    """ggml blocks ``[n, type_size]`` uint8 from integers ``q [n, block]`` and float16 ``d`` (and ``m``) ``[n]``.

    ``q`` is what ggml multiplies by ``d`` (signed for Q4_0/Q5_0/Q8_0).
    """
    if ggml_type not in _OFFSET:
        raise ValueError(f"cannot encode GGML type {ggml_type.name}; encodable: {', '.join(t.name for t in ENCODABLE)}")
    head = [np.asarray(d, np.float16)[:, None].view(np.uint8)]
    if m is not None:
        head.append(np.asarray(m, np.float16)[:, None].view(np.uint8))
    if ggml_type == T.Q8_0:
        return np.concatenate([*head, q.astype(np.int8).view(np.uint8)], axis=1)
    values = (q + _OFFSET[ggml_type]).astype(np.uint8)
    if ggml_type in (T.Q5_0, T.Q5_1):  # the fifth bits, value j at bit j of a little-endian uint32
        head.append(np.packbits(values >> np.uint8(4), axis=1, bitorder="little"))
    return np.concatenate([*head, _nibble_bytes(values)], axis=1)
