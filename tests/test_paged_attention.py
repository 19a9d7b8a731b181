"""The Pallas paged decode-attention kernel (mrs.models.paged_attention) against XLA's
attention (``mrs.models.layers._attend``) on the same pages.

On CPU the kernel runs in Pallas's interpreter; ``MRS_PALLAS_COMPILED=1`` (tools/gpu_check.sh)
compiles it with Triton instead, which needs a GPU.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mrs.models import paged_attention
from mrs.models.kv_cache import NO_PAGE
from mrs.models.layers import PAD_POSITION, _attend

COMPILED = os.environ.get("MRS_PALLAS_COMPILED") == "1"


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

