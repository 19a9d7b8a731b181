"""The Pallas paged decode-attention kernel (mrs.models.paged_attention) against XLA's
attention (``mrs.models.layers._attend``) on the same pages, and its dispatch.

On CPU the kernel runs in Pallas's interpreter; ``MRS_PALLAS_COMPILED=1`` (tools/gpu_check.sh)
compiles it with Triton instead, which needs a GPU.
"""

from __future__ import annotations

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrs.models import paged_attention
from mrs.models.kv_cache import NO_PAGE
from mrs.models.layers import PAD_POSITION, Context, _attend, cached_attention
from mrs.quant import native

COMPILED = os.environ.get("MRS_PALLAS_COMPILED") == "1"
TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call jaxlib <= 0.10.2 lowers a Triton kernel to


def _pages(positions: list[int], window: int | None, kv_len: int, page: int, width: int, kv_heads: int,
           dim: int, dtype, seed: int = 0):
    """A shuffled pool holding each sequence's pages up to its position (two spare pages, one
    of them the last, where an out-of-pool id would clip to), its block tables (``NO_PAGE``
    past each sequence's length; none for an idle slot), and the same pool with every page
    no query may read set to NaN: one read would show."""
    rng = np.random.default_rng(seed)
    lengths = [0 if p == PAD_POSITION else -(-(p + 1) // page) for p in positions]
    pool = sum(lengths) + 2
    order = iter(rng.permutation(pool - 1))
    table = np.full((len(positions), width), NO_PAGE, np.int32)
    for b, n in enumerate(lengths):
        table[b, :n] = [next(order) for _ in range(n)]
    k = rng.standard_normal((pool, kv_heads, dim, page)).astype(dtype)
    v = rng.standard_normal((pool, kv_heads, page, dim)).astype(dtype)
    read = np.zeros(pool, bool)
    for b, p in enumerate(positions):
        if p != PAD_POSITION:
            lo, hi = (0 if window is None else max(0, p - window + 1)), min(p + 1, kv_len)
            read[table[b, lo // page: -(-hi // page)]] = True
    poisoned = [np.where(read.reshape(-1, 1, 1, 1), a, np.nan).astype(dtype) for a in (k, v)]
    return (k, v), poisoned, table


CASES = {  # positions (PAD_POSITION: an idle slot), kv heads, group, head dim, page, table width, kv_len,
    # window, softcap, pool dtype
    "gqa": ([0, 15, 40, 60, PAD_POSITION], 2, 4, 64, 16, 6, 48, None, None, "float32"),  # 15 ends on a page; 60 >= kv_len
    "gqa-bf16": ([0, 15, 40, 60, PAD_POSITION], 2, 4, 64, 16, 6, 48, None, None, "bfloat16"),
    "mha-softcap": ([31, 63, 5, 100], 2, 1, 128, 32, 4, 128, None, 30.0, "float32"),
    "sliding": ([0, 15, 40, 79], 2, 4, 64, 16, 5, 80, 20, None, "float32"),  # the window skips whole pages
    "sliding-softcap-bf16": ([0, 31, 50, 90], 2, 4, 128, 32, 4, 96, 24, 50.0, "bfloat16"),
    "splits-f16": ([3, 100, 255, PAD_POSITION], 1, 8, 64, 16, 16, 256, None, None, "float16"),  # 4 splits, some empty
}


@pytest.mark.parametrize("case", list(CASES))
def test_kernel_equals_xla(case: str) -> None:
    positions, kv_heads, group, dim, page, width, kv_len, window, softcap, dtype = CASES[case]
    np_dtype = jnp.dtype(dtype)
    (k, v), (k_read, v_read), table = _pages(positions, window, kv_len, page, width, kv_heads, dim, np_dtype)
    q = np.random.default_rng(1).standard_normal((len(positions), kv_heads, group, dim)).astype(np_dtype)
    options = dict(kv_len=kv_len, window=window, scale=dim**-0.5, softcap=softcap)
    got = paged_attention.paged_decode_attention(q, k_read, v_read, table, np.asarray(positions), **options,
                                                 interpret=not COMPILED)
    assert got.dtype == np_dtype and got.shape == q.shape
    # The reference: XLA on the same values in float32, every dot exact (GPUs default to TF32).
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        want = _attend(f32(q).reshape(len(positions), 1, kv_heads * group, dim), (f32(k), f32(v)), jnp.asarray(table),
                       jnp.asarray(positions)[:, None], **options)
    want = np.asarray(want).reshape(q.shape)
    active = np.asarray(positions) != PAD_POSITION
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32)[active], want[active], rtol=tol, atol=tol)
    assert not np.asarray(got, np.float32)[~active].any()  # an idle slot: zeros, as the native kernel


def _decode_step(dim: int = 64, page: int = 16):
    """A jitted decode step through ``cached_attention`` and example arguments (2 KV heads, groups of 4)."""
    f32 = jnp.float32
    args = (jnp.zeros((3, 1, 8, dim), f32), jnp.zeros((3, 1, 2, dim), f32), jnp.zeros((3, 1, 2, dim), f32),
            (jnp.zeros((9, 2, dim, page), f32), jnp.zeros((9, 2, page, dim), f32)), jnp.zeros((3, 1), jnp.int32),
            jnp.zeros((3, 4), jnp.int32))

    def step(q, k, v, cache, positions, pages):
        return cached_attention(q, k, v, cache, Context(positions, 48, None, pages), scale=0.125, window=None)[0]

    return jax.jit(step).trace(*args)


def _custom_calls(traced, platform: str) -> set[str]:
    return set(re.findall(r'custom_call @?"?([\w$.]+)', traced.lower(lowering_platforms=(platform,)).as_text()))


def test_a_gpu_process_lowers_decode_to_the_triton_kernel(monkeypatch) -> None:
    """With a GPU as the default backend a decode step holds both kernels; each platform's
    lowering keeps its own. JAX lowers for CUDA and ROCm without the device; Triton compiles
    the kernel only on a GPU (tools/gpu_check.sh)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    traced = _decode_step()
    assert TRITON_CALL in _custom_calls(traced, "cuda") and TRITON_CALL in _custom_calls(traced, "rocm")
    assert "mrs_decode_attention" not in _custom_calls(traced, "cuda")
    assert TRITON_CALL not in _custom_calls(traced, "cpu")
    assert TRITON_CALL not in _custom_calls(_decode_step(dim=80), "cuda")  # not a power of two: XLA
    assert TRITON_CALL not in _custom_calls(_decode_step(page=8), "cuda")  # a page under Triton's 16-row dots
    with native.xla_only():  # as mesh steps trace
        assert TRITON_CALL not in _custom_calls(_decode_step(), "cuda")


def test_a_cpu_process_without_native_kernels_keeps_xla(monkeypatch) -> None:
    monkeypatch.setattr(native, "available", lambda: False)
    assert _custom_calls(_decode_step(), "cpu") == set()  # XLA's own ops only, no kernel traced
