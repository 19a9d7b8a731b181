"""The native CPU kernels (mrs.quant.native) against XLA's ops on the same inputs."""

from __future__ import annotations

import os
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mrs.models.kv_cache import NO_PAGE
from mrs.models.layers import PAD_POSITION, Context, cached_attention
from mrs.quant import QArray, native
from mrs.quant.gguf import gguf_tensor_to_jax
from mrs.quant.isq import quantize_array

BUILDABLE = native._compiler() is not None and all(f in native.cpu_flags() for f in native.REQUIRED_CPU_FLAGS)


def test_kernels_build_where_a_compiler_and_avx2_exist() -> None:
    if not BUILDABLE:
        pytest.skip("no C++ compiler or no AVX2/FMA/F16C: callers keep XLA's ops")
    assert native.available()


def test_env_switch_turns_them_off() -> None:
    env = {**os.environ, "MRS_NATIVE_KERNELS": "0"}
    code = "from mrs.quant import native; print(native.available())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


needs_kernels = pytest.mark.skipif(not BUILDABLE, reason="native kernels cannot be built here")


def _qarray(name: str, rows: int, cols: int = 256) -> QArray:
    rng = np.random.default_rng(rows)
    w = rng.standard_normal((rows, cols)).astype(np.float32) * rng.uniform(0.05, 1.0, (rows, 1)).astype(np.float32)
    w[:, :7] += 0.3  # offsets exercise the formats with a min
    if name in ("Q4_K", "Q6_K"):  # gguf-py has no K-quant quantizer: random blocks, repacked
        block, size = gguf.GGML_QUANT_SIZES[T[name]]
        raw = np.random.default_rng(1).integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
        scale_bytes = {"Q4_K": (0, 4), "Q6_K": (208, 210)}[name]  # keep d (and dmin) finite and small
        raw[:, scale_bytes[0]:scale_bytes[1]] = np.frombuffer(np.float16(0.01).tobytes() * 2, np.uint8)[
            : scale_bytes[1] - scale_bytes[0]]
        return gguf_tensor_to_jax(raw, T[name], (cols, rows), keep_quantized=True, dtype=jnp.float32)
    return quantize_array(w, name)


@needs_kernels
@pytest.mark.parametrize("name", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K", "Q6K"])
@pytest.mark.parametrize("rows", [64, 37])  # 37: odd, so 4- and 6-bit values keep a byte each
@pytest.mark.parametrize("m", [1, 3, 4, 7, 11, 32])  # 5 up: float panels in tiles of 3 or 6 rows
def test_qmatmul_equals_dequantize_then_matmul(name: str, rows: int, m: int) -> None:
    q = _qarray(name, rows)
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, q.shape[1])), jnp.float32)
    got = jax.jit(lambda x, q: native.qmatmul(x, [q])[0])(x, q)
    want = np.asarray(x @ q.dequantize(jnp.float32).T)
    # Float32 sums in another order: rounding relative to the outputs' scale.
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


@needs_kernels
@pytest.mark.parametrize("m", [1, 3, 7, 32])
def test_one_call_for_several_weights_equals_a_call_each(m: int) -> None:
    """Mixed formats (4, 6 and 8 bits, blocks of 32 and 16) split over the threads together
    give each weight exactly what a call of its own gives."""
    assert native.available()
    qs = [_qarray("Q4_1", 64), _qarray("Q6_K", 37), _qarray("Q8_0", 20), _qarray("Q6K", 64)]
    x = jnp.asarray(np.random.default_rng(m).standard_normal((m, 256)), jnp.float32)
    together = jax.jit(native.qmatmul)(x, qs)
    for q, got in zip(qs, together, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(jax.jit(native.qmatmul)(x, [q])[0]))


@needs_kernels
def test_linear_uses_the_kernel_for_decode_sizes_only() -> None:
    q = _qarray("Q4_1", 64)
    hlo = lambda m: jax.jit(lambda w, x: w.linear(x)).lower(q, jnp.ones((m, 256))).as_text()  # noqa: E731
    assert "mrs_qmatmul" in hlo(1) and "mrs_qmatmul" in hlo(native.MAX_ROWS)
    assert "mrs_qmatmul" not in hlo(native.MAX_ROWS + 1)  # prefill: dequantize once, then a GEMM
    with native.xla_only():  # as mesh steps trace
        assert "mrs_qmatmul" not in hlo(1)
    assert "mrs_qmatmul" in hlo(2)  # the switch ends with the block


@needs_kernels
def test_qmatmul_names_a_shape_mismatch() -> None:
    q = _qarray("Q8_0", 64)
    with pytest.raises(Exception, match="qmatmul: data, scale and x shapes disagree"):
        jax.block_until_ready(native.qmatmul(jnp.ones((1, 128)), [q]))


def _attention_inputs(slots: int, kv_heads: int, group: int, dim: int, seq: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    cache = (f(slots + 1, kv_heads, dim, seq), f(slots + 1, kv_heads, seq, dim))  # one slot more than run
    return f(slots, 1, kv_heads * group, dim), f(slots, 1, kv_heads, dim), f(slots, 1, kv_heads, dim), cache


def _paged(cache: tuple, page: int, seed: int = 1) -> tuple[tuple, jax.Array]:
    """The contiguous ``cache``'s rows scattered over a shuffled pool of ``page``-row pages
    (two spare pages), and the block tables that find them again."""
    k, v = (np.asarray(a) for a in cache)
    slots, heads, dim, seq = k.shape
    n = -(-seq // page)
    pool = slots * n + 2
    order = np.random.default_rng(seed).permutation(pool)[: slots * n].reshape(slots, n)
    k_pool = np.zeros((pool, heads, dim, page), np.float32)
    v_pool = np.zeros((pool, heads, page, dim), np.float32)
    for s in range(slots):
        for j in range(n):
            rows = slice(j * page, min((j + 1) * page, seq))
            width = rows.stop - rows.start
            k_pool[order[s, j], :, :, :width] = k[s, :, :, rows]
            v_pool[order[s, j], :, :width] = v[s, :, rows]
    return (jnp.asarray(k_pool), jnp.asarray(v_pool)), jnp.asarray(order, jnp.int32)


def _attend(q, k, v, cache, positions, pages=None, **kwargs):
    return cached_attention(q, k, v, cache, Context(positions, kwargs.pop("kv_len"), None, pages), **kwargs)


@needs_kernels
@pytest.mark.parametrize("page", [None, 32, 16])
@pytest.mark.parametrize(
    "kv_heads, group, dim, seq, kv_len, window, softcap",
    [
        (3, 3, 64, 320, 256, None, None),  # SmolLM2's shape, a kv bucket below the cache size
        (1, 4, 256, 96, None, 8, None),  # Gemma 3 270M: one kv head, sliding window
        (2, 1, 24, 37, 37, None, 30.0),  # no GQA, head_dim % 32 != 0, odd cache, softcap
    ],
)
def test_decode_attention_equals_xla(kv_heads, group, dim, seq, kv_len, window, softcap, page) -> None:
    q, k, v, contiguous = _attention_inputs(4, kv_heads, group, dim, seq)
    cache, pages = (contiguous, None) if page is None else _paged(contiguous, page)
    last = min(kv_len or seq, seq) - 1
    positions = jnp.asarray([[0], [5], [last], [PAD_POSITION]], jnp.int32)  # the last slot is idle
    kwargs = dict(scale=dim**-0.5, window=window, softcap=softcap, kv_len=kv_len)
    run = lambda *a: jax.jit(lambda *b: _attend(*b, **dict(kwargs)))(*a)  # noqa: E731
    got, got_cache = run(q, k, v, cache, positions, pages)
    os.environ["MRS_NATIVE_KERNELS"] = "0"
    native.available.cache_clear()
    try:
        want, want_cache = run(q, k, v, cache, positions, pages)
        if page is not None:  # the same rows behind a shuffled table attend as the contiguous cache does
            dense, _ = run(q, k, v, contiguous, positions)
            np.testing.assert_allclose(np.asarray(want)[:3], np.asarray(dense)[:3], rtol=1e-5, atol=1e-5)
    finally:
        del os.environ["MRS_NATIVE_KERNELS"]
        native.available.cache_clear()
    assert native.available()
    np.testing.assert_allclose(np.asarray(got)[:3], np.asarray(want)[:3], rtol=1e-5, atol=1e-5)
    assert np.isfinite(np.asarray(got)).all()  # the idle slot too
    for a, b in zip(got_cache, want_cache):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@needs_kernels
def test_decode_attention_refuses_a_position_without_a_page() -> None:
    q, k, v, contiguous = _attention_inputs(1, 1, 2, 16, 64)
    cache, pages = _paged(contiguous, 16)
    pages = pages[:1].at[0, 1].set(NO_PAGE)  # position 20 lies in the second page
    assert native.available()  # built and registered
    with pytest.raises(Exception, match="has no page in its table"):
        jax.block_until_ready(native.decode_attention(q.reshape(1, 1, 2, 16), *cache, pages, jnp.asarray([20]),
                                                      kv_len=64, window=None, scale=0.25, softcap=None))


@needs_kernels
def test_decode_step_calls_the_attention_kernel() -> None:
    q, k, v, cache = _attention_inputs(1, 3, 3, 64, 64)
    positions = jnp.asarray([[3]], jnp.int32)
    hlo = lambda: jax.jit(  # noqa: E731  (a new function each time: jit caches traces per function)
        lambda *a: _attend(*a, scale=0.125, window=None, kv_len=32)).lower(q, k, v, cache, positions).as_text()
    assert "mrs_decode_attention" in hlo()
    with native.xla_only():  # as mesh steps trace
        assert "mrs_decode_attention" not in hlo()
    prefill = jax.jit(lambda *a: _attend(*a, scale=0.125, window=None, kv_len=32))
    q2, k2, v2 = (jnp.concatenate([a, a], axis=1) for a in (q, k, v))
    assert "mrs_decode_attention" not in prefill.lower(q2, k2, v2, cache, jnp.asarray([[3, 4]])).as_text()
