"""Quantization quality, size and speed on SmolLM2-135M: float32 vs ISQ vs the GGUF as shipped.

    python tools/bench_quant.py [--tokens 512] [--steps 32] [--batches 1 16]

The float32 model is the Plain checkpoint (``<models_dir>/SmolLM2-135M-Instruct``)
when present, else the demo GGUF expanded to float32 (the same weights the GGUF
rows are quantized from, so agreement isolates the quantization). Agreement and
perplexity are teacher-forced over ``--tokens`` tokens of tests/data's public-domain
text (the demo's float weights are themselves the Q4_1 grid, so Q4_1-family
ISQ recovers them almost exactly while Q4_0 compounds two roundings); KL is the mean
KL divergence (nats) of each next-token distribution from float32's, the least noisy
of the three. "reference quantizer" rows quantize with gguf-py's max-abs quantizer
instead of mrs's least-squares search (``mrs.quant.blockfit``); "quantize s" is the
wall time of quantizing the float32 tree. Decode tok/s is a jitted one-token step
with a donated cache, ``--steps`` steps after a warm-up, tokens fed back on device.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import gguf
import jax
import jax.numpy as jnp

from mrs.config.schema import GGUF, PLAIN, ModelEntry, ModelSource
from mrs.fetch import DEMO_MODELS, fetch, models_dir
from mrs.loading.load import load_checkpoint
from mrs.models.kv_cache import init_cache
from mrs.models.registry import build_model
from mrs.quant import QArray, param_bytes, quantize_params
from mrs.quant.quality import TeacherForced, teacher_forced

TEXT = Path(__file__).resolve().parents[1] / "tests" / "data" / "pride_and_prejudice_ch1.txt"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PLAIN_DIR = "SmolLM2-135M-Instruct"


@dataclass
class Row:
    name: str
    mb: float
    share: float  # of float32's bytes
    quantize_s: float
    agreement: float
    kl: float
    ppl: float
    ppl_delta: float
    tok_s: dict[int, float]


def dequantize_tree(params: Any) -> Any:
    is_q = lambda leaf: isinstance(leaf, QArray)  # noqa: E731
    return jax.tree.map(lambda a: a.dequantize(jnp.float32) if is_q(a) else a, params, is_leaf=is_q)


def load_models() -> tuple[Any, Any, Any, str]:
    """(checkpoint as shipped (GGUF, packed), float32 params, config, float32 source)."""
    cache = models_dir()
    for model in DEMO_MODELS:
        fetch(model, cache)
    gguf_entry = ModelEntry(model_id="gguf", model=ModelSource(kind=GGUF, quantized_model_id=str(cache / GGUF_FILE)))
    shipped = load_checkpoint(gguf_entry)
    plain = cache / PLAIN_DIR
    if (plain / "config.json").exists():
        dense = load_checkpoint(ModelEntry(model_id="plain", model=ModelSource(kind=PLAIN, model_id=str(plain)))).params
        return shipped, dense, shipped.config, f"Plain {plain}"
    return shipped, dequantize_tree(shipped.params), shipped.config, f"{GGUF_FILE} expanded to float32"


def decode_tok_s(model: Any, params: Any, config: Any, batch: int, steps: int) -> float:
    """Tokens per second of a batch-``batch`` greedy decode loop (all slots busy)."""

    @partial(jax.jit, donate_argnums=1)
    def step(params, cache, tokens, position):
        positions = jnp.full((batch, 1), position, jnp.int32)
        logits, cache = model.apply({"params": params}, tokens, positions, cache)
        return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None], cache

    cache = init_cache(config, batch, steps + 2)
    tokens = jnp.full((batch, 1), 1, jnp.int32)
    tokens, cache = step(params, cache, tokens, jnp.int32(0))  # compile + warm-up
    tokens.block_until_ready()
    start = time.perf_counter()
    for position in range(1, steps + 1):
        tokens, cache = step(params, cache, tokens, jnp.int32(position))
    tokens.block_until_ready()
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512, help="teacher-forced tokens scored")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per batch size")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()

    shipped, dense, config, source = load_models()
    model = build_model(config)
    tokens = shipped.tokenizer.encode(TEXT.read_text())[: args.tokens + 1]
    if len(tokens) < args.tokens + 1:
        raise SystemExit(f"{TEXT} has only {len(tokens)} tokens; lower --tokens")

    reference = gguf.quants.quantize
    variants: list[tuple[str, Callable[[], Any]]] = [
        ("float32", lambda: dense),
        ("ISQ Q8_0, reference quantizer", lambda: quantize_params(dense, "Q8_0", quantizer=reference)),
        ("ISQ Q8_0", lambda: quantize_params(dense, "Q8_0")),
        ("ISQ Q8_0, isq_embeddings Q8_0", lambda: quantize_params(dense, "Q8_0", embeddings="Q8_0")),
        ("ISQ Q4_0, reference quantizer", lambda: quantize_params(dense, "Q4_0", quantizer=reference)),
        ("ISQ Q4_0", lambda: quantize_params(dense, "Q4_0")),
        ("ISQ Q4_0, isq_embeddings Q8_0", lambda: quantize_params(dense, "Q4_0", embeddings="Q8_0")),
        ("ISQ Q4K (= Q4_1)", lambda: quantize_params(dense, "Q4K")),
        ("ISQ Q4K, isq_embeddings Q8_0", lambda: quantize_params(dense, "Q4K", embeddings="Q8_0")),
        ("ISQ Q4K, isq_embeddings Q4K", lambda: quantize_params(dense, "Q4K", embeddings="Q4K")),
        ("ISQ Q4_0, isq_embeddings Q6K", lambda: quantize_params(dense, "Q4_0", embeddings="Q6K")),
        ("ISQ Q4K, isq_embeddings Q6K", lambda: quantize_params(dense, "Q4K", embeddings="Q6K")),
        ("GGUF as shipped (Q4_1, Q8_0 embeddings)", lambda: shipped.params),
    ]
    print(f"float32 model: {source}; {len(tokens) - 1} scored tokens; device {jax.devices()[0]}", flush=True)
    rows: list[Row] = []
    baseline: TeacherForced | None = None
    base_bytes = param_bytes(dense)
    for name, make in variants:
        start = time.perf_counter()
        params = make()
        build_s = time.perf_counter() - start
        scored = teacher_forced(model, params, config, tokens)
        baseline = baseline or scored
        speeds = {b: decode_tok_s(model, params, config, b, args.steps) for b in args.batches}
        rows.append(Row(
            name, param_bytes(params) / 2**20, param_bytes(params) / base_bytes, build_s,
            scored.agreement(baseline), scored.kl_from(baseline), scored.perplexity,
            scored.perplexity / baseline.perplexity - 1, speeds,
        ))
        print(f"  {rows[-1]}", flush=True)

    speed_cols = " | ".join(f"decode tok/s b={b}" for b in args.batches)
    print(f"\n| variant | params MB | % of f32 | quantize s | top-1 agreement | KL vs f32 | perplexity | "
          f"ppl vs f32 | {speed_cols} |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(args.batches))
    for r in rows:
        speeds = " | ".join(f"{r.tok_s[b]:.1f}" for b in args.batches)
        print(f"| {r.name} | {r.mb:.1f} | {r.share:.1%} | {r.quantize_s:.1f} | {r.agreement:.1%} | {r.kl:.4f} | "
              f"{r.ppl:.3f} | {r.ppl_delta:+.2%} | {speeds} |")


if __name__ == "__main__":
    main()
