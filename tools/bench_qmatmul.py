"""The native quantized matmul against XLA's dequantize-then-GEMM, by activation rows.

    python tools/bench_qmatmul.py [--rows 1 4 8 16 24 32 64]

``QArray.linear`` sends up to ``mrs.quant.native.MAX_ROWS`` activation rows to the native
kernel (``mrs_qmatmul``) and more to XLA, which dequantizes the weight and runs a float32
GEMM. This times both on one jitted chain of a decoder's seven projections (q, k, v, o,
gate, up, down) over 30 layers, each layer's weights its own, at the demo models' widths and formats (SmolLM2's Q4_1;
Gemma 3's Q5_0 and Q8_0), and prints milliseconds per chain (best of 5 rounds) and
which is faster, so the crossover that ``MAX_ROWS`` encodes can be checked on a machine.
The native kernel runs twice: one call per weight, and grouped as the decoder calls it
(q, k and v in one call, gate and up in one: 4 calls a layer instead of 7).
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from mrs.quant import QArray, native
from mrs.quant.isq import quantize_array

LAYERS = 30
# (model, format, hidden, intermediate, key/value width)
CASES = (("smollm2-135m", "Q4_1", 576, 1536, 192), ("gemma3-270m", "Q5_0", 640, 2048, 256),
         ("gemma3-270m", "Q8_0", 640, 2048, 256))


def _weights(fmt: str, hidden: int, inner: int, kv: int) -> list[list[QArray]]:
    """Each layer's seven weights, in buffers of their own: XLA would dequantize a weight that
    every layer shares once per call, which a real model never can."""
    rng = np.random.default_rng(0)
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inner, hidden), (inner, hidden),
              (hidden, inner)]
    layer = [quantize_array(rng.standard_normal(s).astype(np.float32) * 0.05, fmt) for s in shapes]
    return [jax.tree.map(jnp.copy, layer) for _ in range(LAYERS)]


def _chain(matmuls: Callable[[jax.Array, list[QArray]], list[jax.Array]]) -> Callable[..., jax.Array]:
    """The 30 layers' projections, each group of weights that share an input in one ``matmuls``."""
    def run(x: jax.Array, layers: list[list[QArray]]) -> jax.Array:
        hidden, kv = x.shape[1], layers[0][1].shape[0]
        for ws in layers:
            q, k, v = matmuls(x, ws[:3])
            (o,) = matmuls(q + jnp.pad(k + v, ((0, 0), (0, hidden - kv))), ws[3:4])
            gate, up = matmuls(o, ws[4:6])
            (down,) = matmuls(jax.nn.silu(gate) * up, ws[6:7])
            x = x + 0.01 * down
        return x
    return jax.jit(run)


def _best_ms(fn: Callable[..., Any], *args: Any) -> float:
    """Best of 5 rounds of calls, about 0.5 s a round (20 calls at most, 1 at least)."""
    fn(*args).block_until_ready()  # compiles
    begin = time.perf_counter()
    fn(*args).block_until_ready()
    calls = max(1, min(20, round(0.5 / (time.perf_counter() - begin))))
    best = float("inf")
    for _ in range(5):
        begin = time.perf_counter()
        for _ in range(calls):
            out = fn(*args)
        out.block_until_ready()
        best = min(best, (time.perf_counter() - begin) / calls)
    return best * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 64, 128, 256, 512])
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("the native kernels are not available here")
    kernels = {"native": _chain(lambda x, ws: [native.qmatmul(x, [w])[0] for w in ws]),
               "grouped": _chain(native.qmatmul),
               "xla": _chain(lambda x, ws: [x @ w.dequantize(x.dtype).T for w in ws])}
    print(f"\nMAX_ROWS = {native.MAX_ROWS}\n")
    print("| model | format | rows | native ms | native grouped ms | XLA ms | faster |")
    print("|---|---|---:|---:|---:|---:|---|")
    for model, fmt, hidden, inner, kv in CASES:
        ws = _weights(fmt, hidden, inner, kv)
        for rows in args.rows:
            x = jnp.ones((rows, hidden), jnp.float32)
            ms = {name: _best_ms(fn, x, ws) for name, fn in kernels.items()}
            print(f"| {model} | {fmt} | {rows} | {ms['native']:.2f} | {ms['grouped']:.2f} | {ms['xla']:.1f} | "
                  f"{min(ms, key=ms.get)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
