"""QArray, GGUF repacking and ISQ against gguf-py's reference quantizer/dequantizer."""

from __future__ import annotations

from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from mrs.errors import ConfigError
from mrs.models.kv_cache import init_cache
from mrs.models.llama import config_from_hf
from mrs.quant import QArray, blockfit, cache_bytes, param_bytes, quantize_params, resolve_scheme
from mrs.quant.gguf import gguf_tensor_to_jax
from mrs.quant.isq import SCHEMES, quantize_array

ROWS, COLS = 24, 512  # COLS: two Q4_K/Q6_K super-blocks, sixteen 32-blocks


def _weights(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Mixed scales per row and a few outliers, like real weights.
    w = rng.standard_normal((ROWS, COLS)).astype(np.float32) * rng.uniform(0.01, 1.0, (ROWS, 1)).astype(np.float32)
    w[3, 7] = 9.0
    w[5] += 0.5  # a row with an offset exercises the formats with a min
    return w


def _as_gguf(values: np.ndarray, ggml_type: T) -> tuple[np.ndarray, tuple[int, ...]]:
    """``values`` encoded as GGUF data plus the GGUF-order shape a ReaderTensor would report."""
    return gguf.quants.quantize(values, ggml_type), tuple(reversed(values.shape))


def _dense(x) -> np.ndarray:
    return np.asarray(x.dequantize(jnp.float32) if isinstance(x, QArray) else x)


@pytest.mark.parametrize("name", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_gguf_tensor_dequantizes_like_gguf_py(name: str) -> None:
    ggml_type = T[name]
    data, shape = _as_gguf(_weights(), ggml_type)
    reference = gguf.quants.dequantize(data, ggml_type).reshape(ROWS, COLS)
    kept = gguf_tensor_to_jax(data, ggml_type, shape, keep_quantized=True, dtype=jnp.float32)
    expanded = gguf_tensor_to_jax(data, ggml_type, shape, keep_quantized=False, dtype=jnp.float32)
    assert isinstance(kept, QArray) == name.startswith("Q")
    assert not isinstance(expanded, QArray)
    np.testing.assert_array_equal(_dense(kept), reference)
    np.testing.assert_array_equal(np.asarray(expanded), reference)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1"])
def test_four_bit_storage_packs_row_pairs_or_falls_back_on_odd_rows(name: str) -> None:
    for rows, bits in ((ROWS, 4), (ROWS - 1, 8)):
        values = _weights()[:rows]
        data, shape = _as_gguf(values, T[name])
        kept = gguf_tensor_to_jax(data, T[name], shape, keep_quantized=True, dtype=jnp.float32)
        assert kept.bits == bits
        np.testing.assert_array_equal(_dense(kept), gguf.quants.dequantize(data, T[name]).reshape(rows, COLS))
        ids = jnp.arange(rows)
        np.testing.assert_array_equal(np.asarray(kept.take_rows(ids, jnp.float32)), _dense(kept))


def _random_blocks(ggml_type: T, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random bytes in ``ggml_type``'s block layout (every bit pattern) with sane f16 scales.

    gguf-py cannot quantize K-quants, so random blocks exercise their unpacking.
    """
    block, size = gguf.GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    f16_offsets = {T.Q4_K: (0, 2), T.Q6_K: (208,), T.Q5_0: (0,), T.Q5_1: (0, 2)}[ggml_type]
    for offset in f16_offsets:
        scales = rng.uniform(-0.1, 0.1, raw.shape[:2]).astype(np.float16)
        raw[..., offset:offset + 2] = scales.view(np.uint8).reshape(*raw.shape[:2], 2)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("name", ["Q4_K", "Q6_K", "Q5_0", "Q5_1"])
def test_random_blocks_repack_losslessly(name: str) -> None:
    data = _random_blocks(T[name], ROWS, COLS, seed=7)
    reference = gguf.quants.dequantize(data, T[name])
    kept = gguf_tensor_to_jax(data, T[name], (COLS, ROWS), keep_quantized=True, dtype=jnp.float32)
    np.testing.assert_array_equal(_dense(kept), reference)


@pytest.fixture(scope="module")
def real_tensors(smollm2_gguf: Path, gemma3_gguf: Path) -> dict[str, gguf.ReaderTensor]:
    """The first tensor of each quantized type in the demo files (K-quants only exist there)."""
    found: dict[str, gguf.ReaderTensor] = {}
    for path in (smollm2_gguf, gemma3_gguf):
        for t in gguf.GGUFReader(str(path)).tensors:
            if t.tensor_type.name.startswith("Q") and t.tensor_type.name not in found and t.n_elements < 5_000_000:
                found[t.tensor_type.name] = t
    return found


@pytest.mark.parametrize("name", ["Q8_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_real_gguf_tensors_repack_losslessly(real_tensors: dict, name: str) -> None:
    t = real_tensors[name]
    reference = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
    kept = gguf_tensor_to_jax(t.data, t.tensor_type, tuple(t.shape), keep_quantized=True, dtype=jnp.float32)
    assert isinstance(kept, QArray) and kept.fmt == name
    np.testing.assert_array_equal(_dense(kept), reference)
    # Packed storage stays near the file's size (K-quant scales widen to float32 per block).
    bits_per_weight = kept.nbytes * 8 / reference.size
    assert bits_per_weight <= {"Q8_0": 8.5, "Q4_1": 5.0, "Q5_0": 8.5, "Q4_K": 6.0, "Q6_K": 8.0}[name]


@pytest.fixture(scope="module", params=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K_file", "Q6_K_file", "Q6K"])
def qarray(request, real_tensors: dict) -> QArray:
    """One QArray per storage variant: 8-bit, 4-bit with zero point, 4-bit with min, 6-bit, block 16."""
    if request.param == "Q6K":
        return quantize_array(jnp.asarray(_weights(1)), "Q6K")
    if request.param.endswith("_file"):
        t = real_tensors[request.param[: -len("_file")]]
        return gguf_tensor_to_jax(t.data, t.tensor_type, tuple(t.shape), keep_quantized=True, dtype=jnp.float32)
    data, shape = _as_gguf(_weights(1), T[request.param])
    return gguf_tensor_to_jax(data, T[request.param], shape, keep_quantized=True, dtype=jnp.float32)


def test_linear_equals_dequantize_then_matmul(qarray: QArray) -> None:
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, qarray.shape[1])), jnp.float32)
    got = jax.jit(lambda w, x: w.linear(x))(qarray, x)
    want = jnp.einsum("bti,oi->bto", x, qarray.dequantize(jnp.float32))
    assert got.shape == (3, 5, qarray.shape[0])
    # Float32 sums in another order (the native kernel folds zero points and mins into
    # sums of x): rounding relative to the outputs' scale.
    want = np.asarray(want)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_take_rows_and_permute_rows(qarray: QArray) -> None:
    dense = np.asarray(qarray.dequantize(jnp.float32))
    ids = jnp.asarray([[0, 5, 2], [qarray.shape[0] - 1, 1, 1]], jnp.int32)
    rows = jax.jit(lambda w, i: w.take_rows(i, jnp.float32))(qarray, ids)
    np.testing.assert_array_equal(np.asarray(rows), dense[np.asarray(ids)])
    perm = np.random.default_rng(3).permutation(qarray.shape[0])
    np.testing.assert_array_equal(_dense(qarray.permute_rows(perm)), dense[perm])
    # A float GGUF tensor (shape in GGUF order) takes the loader's row order too.
    plain = gguf_tensor_to_jax(dense, T.F32, dense.shape[::-1], keep_quantized=False, dtype=jnp.float32, rows=perm)
    np.testing.assert_array_equal(np.asarray(plain), dense[perm])


def test_bfloat16_dequantize_and_linear(qarray: QArray) -> None:
    x = jnp.ones((2, qarray.shape[1]), jnp.bfloat16)
    assert qarray.dequantize(jnp.bfloat16).dtype == jnp.bfloat16
    assert qarray.linear(x).dtype == jnp.bfloat16


@pytest.mark.parametrize("scheme", [name for name, t in SCHEMES.items() if t != T.Q6_K])
def test_isq_blocks_decode_under_gguf_py(scheme: str) -> None:
    """ISQ writes ggml's block format: gguf-py's dequantizer reads the bytes as the QArray does."""
    w = _weights(4)
    ggml_type = SCHEMES[scheme]
    raw = blockfit.quantize(w, ggml_type)
    assert raw.shape == gguf.quants.quantize(w, ggml_type).shape and raw.dtype == np.uint8
    decoded = gguf.quants.dequantize(raw, ggml_type).reshape(w.shape)
    np.testing.assert_array_equal(_dense(quantize_array(jnp.asarray(w), scheme)), decoded)
    step = {T.Q4_0: 0.2, T.Q4_1: 0.15, T.Q5_0: 0.1, T.Q5_1: 0.08, T.Q8_0: 0.01}[ggml_type]
    assert np.max(np.abs(decoded - w) / (np.abs(w).max(axis=1, keepdims=True))) < step


@pytest.mark.parametrize("rows", [ROWS, 6])  # 6: not a multiple of 4, so a byte per value
def test_isq_q6k_is_six_bit_storage(rows: int) -> None:
    w = _weights(4)[:rows]
    q = quantize_array(jnp.asarray(w), "Q6K")
    assert (q.bits, q.block, q.zero, q.fmt) == ((6, 32, 32, "Q6K") if rows % 4 == 0 else (8, 32, 32, "Q6K"))
    if rows % 4 == 0:
        assert q.nbytes * 8 / w.size == 6.5  # 6 bits and a float16 scale per 32
    decoded = _dense(q)
    assert np.max(np.abs(decoded - w) / np.abs(w).max(axis=1, keepdims=True)) < 0.04  # 1/31 of the range


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_isq_has_less_error_than_the_reference_quantizer_on_real_weights(real_tensors: dict, name: str) -> None:
    t = real_tensors["Q6_K"]  # Gemma 3's first FFN down projection, 1.3M weights
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed([int(d) for d in t.shape])))
    ggml_type = T[name]
    reference = gguf.quants.dequantize(gguf.quants.quantize(w, ggml_type), ggml_type).reshape(w.shape)
    ours = gguf.quants.dequantize(blockfit.quantize(w, ggml_type), ggml_type).reshape(w.shape)
    assert np.sum((ours - w) ** 2) < 0.9 * np.sum((reference - w) ** 2)


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_isq_degenerate_blocks(name: str) -> None:
    """All-zero and constant blocks, and a lone outlier, decode finite and close."""
    w = np.zeros((2, 96), np.float32)
    w[0, 32:64] = 0.25
    w[1, 64:96] = np.linspace(-0.01, 0.01, 32)
    w[1, 70] = 3.0
    ggml_type = T[name]
    decoded = gguf.quants.dequantize(blockfit.quantize(w, ggml_type), ggml_type).reshape(w.shape)
    assert np.all(np.isfinite(decoded))
    np.testing.assert_array_equal(decoded[:, :32], 0)
    np.testing.assert_allclose(decoded[0, 32:64], 0.25, rtol=1e-3)
    assert abs(decoded[1, 70] - 3.0) < 0.2


def test_scheme_names() -> None:
    assert resolve_scheme("q4_0") == T.Q4_0
    assert resolve_scheme("4") == resolve_scheme("Q4K") == T.Q4_1
    assert resolve_scheme("8") == resolve_scheme("Q8K") == T.Q8_0
    assert resolve_scheme("q6k") == T.Q6_K  # mrs's own 6-bit blocks (test_isq_q6k_is_six_bit_storage)
    with pytest.raises(ConfigError) as err:
        resolve_scheme("Q3_K_M")
    assert "'Q3_K_M'" in str(err.value) and "Q4_0" in str(err.value) and "Q8K" in str(err.value)
    assert err.value.param == "in_situ_quant"


def _tiny_params() -> tuple[dict, object]:
    hf = dict(
        model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
    )
    config = config_from_hf(hf)
    rng = np.random.default_rng(5)

    def mat(o: int, i: int) -> jax.Array:
        return jnp.asarray(rng.standard_normal((o, i)).astype(np.float32) * 0.2)

    layer = {
        "input_layernorm": {"weight": jnp.ones(64)},
        "post_attention_layernorm": {"weight": jnp.ones(64)},
        "self_attn": {
            "q_proj": {"weight": mat(64, 64)}, "k_proj": {"weight": mat(32, 64)},
            "v_proj": {"weight": mat(32, 64)}, "o_proj": {"weight": mat(64, 64)},
        },
        "mlp": {"gate_proj": {"weight": mat(128, 64)}, "up_proj": {"weight": mat(128, 64)},
                "down_proj": {"weight": mat(64, 128)}},
    }
    params = {
        "model": {"embed_tokens": {"weight": mat(96, 64)}, "norm": {"weight": jnp.ones(64)},
                  "layers_0": layer, "layers_1": jax.tree.map(lambda a: a * 0.9, layer)},
        "lm_head": {"weight": mat(96, 64)},
    }
    return params, config


def test_quantize_params_quantizes_linear_weights_only() -> None:
    params, config = _tiny_params()
    quantized = quantize_params(params, "Q8_0")
    attn = quantized["model"]["layers_1"]["self_attn"]
    assert all(isinstance(attn[p]["weight"], QArray) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert isinstance(quantized["model"]["layers_0"]["mlp"]["down_proj"]["weight"], QArray)
    for kept in (quantized["model"]["embed_tokens"]["weight"], quantized["lm_head"]["weight"],
                 quantized["model"]["norm"]["weight"], quantized["model"]["layers_0"]["input_layernorm"]["weight"]):
        assert not isinstance(kept, QArray) and kept.dtype == jnp.float32
    with_tables = quantize_params(params, "Q4_0", embeddings="Q4_0")
    assert isinstance(with_tables["model"]["embed_tokens"]["weight"], QArray)
    assert isinstance(with_tables["lm_head"]["weight"], QArray)
    assert with_tables["lm_head"]["weight"].fmt == "Q4_0"

    # The quantized model runs and stays close to the float one.
    from mrs.models.decoder import DecoderForCausalLM

    model = DecoderForCausalLM(config)
    tokens = jnp.asarray([[1, 5, 9, 33, 2]], jnp.int32)
    positions = jnp.arange(5, dtype=jnp.int32)[None]
    run = jax.jit(lambda p: model.apply({"params": p}, tokens, positions, init_cache(config, 1, 8))[0])
    ref, q8, q4 = run(params), run(quantized), run(with_tables)
    # Random weights amplify quantization noise through the layers; real-model quality
    # is measured on SmolLM2 (tests/test_quant_model.py, tools/bench_quant.py).
    error = lambda q: float(jnp.linalg.norm(q - ref) / jnp.linalg.norm(ref))  # noqa: E731
    assert 0 < error(q8) < 0.05
    assert error(q8) < error(q4) < 0.5


def test_embedding_scheme_is_separate_from_the_linear_one() -> None:
    params, _ = _tiny_params()
    tables_only = quantize_params(params, None, embeddings="q8_0")
    embed, head = tables_only["model"]["embed_tokens"]["weight"], tables_only["lm_head"]["weight"]
    assert (embed.fmt, head.fmt) == ("Q8_0", "Q8_0")
    assert not isinstance(tables_only["model"]["layers_0"]["self_attn"]["q_proj"]["weight"], QArray)
    mixed = quantize_params(params, "Q4_0", embeddings="Q8_0")
    assert mixed["model"]["layers_1"]["mlp"]["up_proj"]["weight"].fmt == "Q4_0"
    assert mixed["lm_head"]["weight"].fmt == "Q8_0"
    with pytest.raises(ConfigError) as err:
        quantize_params(params, "Q4_0", embeddings="F16")
    assert err.value.param == "isq_embeddings" and "'F16'" in err.value.message and "Q8_0" in err.value.message


def test_memory_accounting() -> None:
    params, config = _tiny_params()
    floats = param_bytes(params)
    assert floats == sum(np.asarray(leaf).nbytes for leaf in jax.tree_util.tree_leaves(params))
    q8 = quantize_params(params, "Q8_0", embeddings="Q8_0")
    q4 = quantize_params(params, "Q4_0", embeddings="Q4_0")
    norms = 64 * 4 * 5
    assert param_bytes(q8) == pytest.approx((floats - norms) * 8.5 / 32 + norms, rel=1e-6)
    assert param_bytes(q4) == pytest.approx((floats - norms) * 4.5 / 32 + norms, rel=1e-6)
    cache = init_cache(config, 2, 16)
    assert cache_bytes(cache) == 2 * 2 * 2 * 16 * config.num_kv_heads * config.head_dim * 4
