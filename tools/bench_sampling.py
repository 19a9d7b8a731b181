"""Cost of one jitted ``mrs.engine.sampling.sample`` call per batch size and sampling setting.

    python tools/bench_sampling.py [--vocab 49152] [--rows 1,8,32] [--calls 30]

SmolLM2's vocabulary by default; all-ones token mask, no penalties. Every parameter is a
traced argument, as in the engine's steps, so no branch is folded away at compile time.
Prints one table of milliseconds per call (the mean over ``--calls`` after a warm-up).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp

from mrs.engine.sampling import all_allowed, empty_rows, sample

SETTINGS = {
    "greedy": {},
    "temperature 0.8": {"temperature": 0.8},
    "top_k 40, top_p 0.95": {"temperature": 0.8, "top_k": 40, "top_p": 0.95},
    "top_p 0.9": {"temperature": 0.8, "top_p": 0.9},
    "min_p 0.05": {"temperature": 0.8, "min_p": 0.05},
}


def time_call(rows: int, vocab: int, setting: dict[str, float], calls: int) -> float:
    sp = empty_rows(rows, vocab)
    sp = sp._replace(**{name: jnp.full((rows,), value, getattr(sp, name).dtype) for name, value in setting.items()})
    logits = jax.random.normal(jax.random.key(0), (rows, vocab)) * 3
    args = (logits, sp, jnp.zeros((rows, vocab), jnp.int32), jnp.zeros((rows, vocab), bool),
            jnp.zeros((rows,), jnp.int32), jnp.asarray(all_allowed(rows, vocab)))
    step = jax.jit(sample)
    jax.block_until_ready(step(*args))
    begin = time.perf_counter()
    for _ in range(calls):
        out = step(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - begin) / calls * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    print(f"\nms per sample() call, vocabulary {args.vocab}\n")
    print("| setting | " + " | ".join(f"{r} rows" for r in args.rows) + " |\n|---|" + "---:|" * len(args.rows))
    for name, setting in SETTINGS.items():
        cells = [f"{time_call(rows, args.vocab, setting, args.calls):.2f}" for rows in args.rows]
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
