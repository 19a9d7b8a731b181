"""How far error-compensating quantization (GPTQ) takes ISQ Q4_0 on SmolLM2-135M.

    python tools/q4_0_ceiling.py [--tokens 512] [--calibration-tokens 256]

Evidence for the README's Q4_0 row, not a feature: mrs's ISQ quantizes each block on
its own (``mrs.quant.blockfit``). GPTQ (Frantar et al., 2022) instead rounds a weight
matrix one input column at a time and moves each column's rounding error onto the
columns not yet rounded, weighted by the inverse Hessian ``X^T X`` of that layer's
inputs over calibration text, so the layer's *outputs* stay close to float. Here it
keeps Q4_0's format exactly (blocks of 32, one float16 scale each, fitted by
blockfit to the block's weights as they stand when the block is reached); the
table stays Q8_0 and the Hessians come from the float32 model in one pass.

Rows (teacher-forced over ``--tokens`` tokens of tests/data's text, against the
float32 model, as ``tools/bench_quant.py`` scores them):
- ISQ Q4_0 as mrs ships it (blockfit, no calibration);
- GPTQ with calibration text the float32 model samples itself (16 prompts,
  temperature 0.8): a fair setting, the scored text is never seen;
- GPTQ calibrated on the scored text itself: an optimistic ceiling, not a fair figure.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_quant import TEXT, load_models
from gguf import GGMLQuantizationType as T

import mrs
from mrs.models.kv_cache import init_cache
from mrs.models.layers import Linear
from mrs.models.registry import build_model
from mrs.quant import param_bytes, quantize_params
from mrs.quant.blockfit import GRIDS, fit_blocks
from mrs.quant.ggml import encode, repack
from mrs.quant.gguf import to_device
from mrs.quant.quality import teacher_forced

BLOCK = 32
PROMPTS = ["Once upon a time", "The history of science", "In mathematics,", "Dear Sir,", "The weather today",
           "Chapter 1", "A recipe for bread:", "The city council met", "Scientists have discovered",
           "My favourite book", "The war began", "How to learn a language", "The river flowed", "In the beginning",
           "The economy of", "She said"]


def sampled_calibration(length: int) -> list[list[int]]:
    """Token ids the float32 model writes itself, one sequence per prompt, ``length`` tokens each."""
    engine = {"max_batch": len(PROMPTS), "max_seq_len": 2 * length, "prefill_buckets": [64]}
    with mrs.load("smollm2-135m", engine=engine, dequantize_gguf=True) as pipe:
        results = pipe.generate(PROMPTS, max_tokens=length, temperature=0.8, seed=0, ignore_eos=True)
    return [(r.prompt_ids + r.token_ids)[:length] for r in results]


def input_gram_matrices(model: Any, params: Any, config: Any, sequences: list[list[int]]) -> tuple[dict, int]:
    """``X^T X`` of every Linear's inputs over ``sequences`` (equal lengths), by module path; token count."""

    def record(next_fun: Any, args: Any, kwargs: Any, context: Any) -> Any:
        if isinstance(context.module, Linear) and context.method_name == "__call__":
            x = args[0].astype(jnp.float32).reshape(-1, args[0].shape[-1])
            context.module.sow("intermediates", "gram", x.T @ x)
        return next_fun(*args, **kwargs)

    @jax.jit
    def grams(params: Any, ids: jax.Array) -> Any:
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1], dtype=jnp.int32), ids.shape)
        cache = init_cache(config, ids.shape[0], ids.shape[1])
        with nn.intercept_methods(record):
            _, state = model.apply({"params": params}, ids, positions, cache, mutable=["intermediates"])
        return state["intermediates"]

    ids = jnp.asarray(sequences, jnp.int32)
    return jax.device_get(grams(params, ids)), int(ids.size)


def gptq_q4_0(w: np.ndarray, gram: np.ndarray, tokens: int, damp: float = 0.01) -> Any:
    """``w [out, in]`` as a Q4_0 QArray, rounded column by column with GPTQ's error feedback."""
    grid = GRIDS[T.Q4_0]
    w = w.astype(np.float64).copy()
    h = gram.astype(np.float64) / tokens
    dead = np.diag(h) == 0  # inputs that never fire: their weights cannot matter
    h[dead, dead], w[:, dead] = 1, 0
    h += damp * np.mean(np.diag(h)) * np.eye(len(h))
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    rows, cols = w.shape
    q = np.zeros((rows, cols), np.int16)
    d = np.zeros((rows, cols // BLOCK), np.float16)
    for start in range(0, cols, BLOCK):
        end = start + BLOCK
        d[:, start // BLOCK] = fit_blocks(w[:, start:end].astype(np.float32), grid).d
        scale = d[:, start // BLOCK].astype(np.float64)
        inverse = np.where(scale == 0, 0, 1 / np.where(scale == 0, 1, scale))
        errors = np.zeros((rows, BLOCK))
        for j in range(BLOCK):
            c = start + j
            q[:, c] = np.clip(np.rint(w[:, c] * inverse), grid.lo, grid.hi)
            errors[:, j] = (w[:, c] - q[:, c] * scale) / u[c, c]
            w[:, c:end] -= np.outer(errors[:, j], u[c, c:end])  # feed the error to this block's later columns
        w[:, end:] -= errors @ u[start:end, end:]  # ... and to every later block at once
    raw = encode(q.reshape(-1, BLOCK), d.reshape(-1), None, T.Q4_0)
    return to_device(repack(raw.reshape(rows, -1), T.Q4_0, w.shape))


def gptq_params(dense: Any, grams: dict, tokens: int) -> Any:
    """The float32 tree with every decoder Linear GPTQ-quantized to Q4_0, the table Q8_0."""
    params = quantize_params(dense, None, embeddings="Q8_0")
    for name, layer in params["model"].items():
        if not name.startswith("layers_"):
            continue
        for block in ("self_attn", "mlp"):
            for proj, module in layer[block].items():
                gram = grams["model"][name][block][proj]["gram"][0]
                module["weight"] = gptq_q4_0(np.asarray(module["weight"], np.float32), np.asarray(gram), tokens)
    return params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="teacher-forced tokens scored")
    parser.add_argument("--calibration-tokens", type=int, default=256, help="tokens per sampled sequence")
    args = parser.parse_args()

    shipped, dense, config, source = load_models()
    model = build_model(config)
    scored = shipped.tokenizer.encode(TEXT.read_text())[: args.tokens + 1]
    baseline = teacher_forced(model, dense, config, scored)
    calibrations = {"sampled by the float32 model": sampled_calibration(args.calibration_tokens),
                    "the scored text itself (ceiling)": [scored[:-1]]}
    variants = [("ISQ Q4_0 (blockfit), isq_embeddings Q8_0", lambda: quantize_params(dense, "Q4_0", embeddings="Q8_0"))]
    for label, sequences in calibrations.items():
        grams, tokens = input_gram_matrices(model, dense, config, sequences)
        variants.append((f"GPTQ Q4_0, calibrated on {label} ({tokens} tokens)",
                         lambda grams=grams, tokens=tokens: gptq_params(dense, grams, tokens)))

    print(f"float32 model: {source}; {len(scored) - 1} scored tokens")
    print("\n| variant | % of f32 | quantize s | top-1 agreement | KL vs f32 | ppl vs f32 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, make in variants:
        start = time.perf_counter()
        params = make()
        seconds = time.perf_counter() - start
        result = teacher_forced(model, params, config, scored)
        print(f"| {name} | {param_bytes(params) / param_bytes(dense):.1%} | {seconds:.1f} | "
              f"{result.agreement(baseline):.1%} | {result.kl_from(baseline):.4f} | "
              f"{result.perplexity / baseline.perplexity - 1:+.2%} |", flush=True)


if __name__ == "__main__":
    main()
