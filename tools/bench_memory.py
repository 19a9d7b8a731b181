"""Where the quickstart models' memory goes: device arrays, compiled step variants, the rest.

    python tools/bench_memory.py

Loads the two demo models in this process as the quickstart server does (GGUF, default
engine), once with ``engine.warmup=false`` (nothing compiled ahead) and once compiling
every step variant before ready, each in a fresh subprocess, and prints one table: the
process RSS after ``import mrs``, after each model loads, the bytes of JAX's live arrays
(weights, KV pool, decode state) and the step variants compiled. The difference between
the two runs over the variants compiled is what one compiled variant holds in memory.
Uses the user's compilation cache (``~/.cache/mrs/jax`` or ``JAX_COMPILATION_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import jax

import mrs

MODELS = ("smollm2-135m", "gemma3-270m")


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def live_array_bytes() -> int:
    """Bytes of JAX's live device buffers, each once: an array's shards (``addressable_shards``,
    which memory accounting reads) are arrays of their own over the same buffer."""
    buffers = {}
    for array in jax.live_arrays():
        for shard in array.addressable_shards:
            buffers[(shard.device.id, shard.data.unsafe_buffer_pointer())] = shard.data.nbytes
    return sum(buffers.values())


def measure(warmup: bool) -> dict:
    """In this process: RSS after import and after each model, live array bytes, variants."""
    jax.numpy.zeros(1).block_until_ready()
    row = {"import": rss_mib(), "models": []}
    pipelines = []
    for model in MODELS:
        pipelines.append(mrs.load(model, engine={"warmup": warmup, "compile_in_background": False}))
        stats = pipelines[-1].engine.stats()
        row["models"].append({"model": model, "rss": rss_mib(), "variants": stats["variants_compiled"]})
    row["live_arrays"] = live_array_bytes() / 2**20
    for pipeline in pipelines:
        pipeline.engine.shutdown()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=("lazy", "warm"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child == "warm")))
        return 0
    rows = {}
    for mode in ("lazy", "warm"):
        print(f"measuring: {mode}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n| warm-up | RSS after import MiB | " + " | ".join(f"RSS after {m} MiB" for m in MODELS)
          + " | live JAX arrays MiB | step variants compiled |")
    print("|---|---:|" + "---:|" * (len(MODELS) + 2))
    for mode, row in rows.items():
        after = " | ".join(f"{m['rss']:,.0f}" for m in row["models"])
        variants = sum(m["variants"] for m in row["models"])
        print(f"| {'none' if mode == 'lazy' else 'every variant'} | {row['import']:,.0f} | {after} | "
              f"{row['live_arrays']:,.0f} | {variants} |")
    lazy, warm = rows["lazy"]["models"][-1]["rss"], rows["warm"]["models"][-1]["rss"]
    variants = sum(m["variants"] for m in rows["warm"]["models"])
    print(f"\ncompiled variants: {warm - lazy:,.0f} MiB of RSS for {variants}, {(warm - lazy) / variants:.0f} MiB each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
