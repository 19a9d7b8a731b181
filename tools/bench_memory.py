"""Where the quickstart models' memory goes: device arrays, compiled step variants, the rest.

    python tools/bench_memory.py

Loads the two demo models in this process as the quickstart server does (GGUF, default
engine), once with ``engine.warmup=false`` (nothing compiled ahead), once compiling every
step variant before ready and keeping them all, and once more then waiting until the idle
ones leave memory (``engine.variant_idle_s``, here 1 s), each in a fresh subprocess, and
prints one table: the process RSS after ``import mrs``, after each model loads (for the
idle run: after the variants left), the bytes of JAX's live arrays (weights, KV pool,
decode state), the step variants compiled and those in memory. The difference between
the first two runs over the variants compiled is what one compiled variant holds in memory.
Uses the user's compilation cache (``~/.cache/mrs/jax`` or ``JAX_COMPILATION_CACHE_DIR``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import jax

import mrs

MODELS = ("smollm2-135m", "gemma3-270m")
IDLE_SECONDS = 1.0  # the idle run's engine.variant_idle_s
MODES = {"lazy": "none", "warm": "every variant", "idle": f"every variant, idle ones left ({IDLE_SECONDS:g} s)"}


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


def measure(mode: str) -> dict:
    """In this process: RSS after import and after each model, live array bytes, variants."""
    jax.numpy.zeros(1).block_until_ready()
    row = {"import": rss_mib(), "models": []}
    pipelines = []
    for model in MODELS:
        pipelines.append(mrs.load(model, engine={"warmup": mode != "lazy", "compile_in_background": False,
                                                 "variant_idle_s": IDLE_SECONDS if mode == "idle" else None}))
        if mode == "idle":  # until no more leave (the engine checks each idle_s)
            engine, counts = pipelines[-1].engine, []
            while len(counts) < 3 or counts[-1] != counts[-3]:
                time.sleep(IDLE_SECONDS)
                counts.append(engine.stats()["variants_in_memory"])
        stats = pipelines[-1].engine.stats()
        row["models"].append({"model": model, "rss": rss_mib(), "variants": stats["variants_compiled"],
                              "in_memory": stats["variants_in_memory"]})
    row["live_arrays"] = live_array_bytes() / 2**20
    for pipeline in pipelines:
        pipeline.engine.shutdown()
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child)))
        return 0
    rows = {}
    for mode in MODES:
        print(f"measuring: {mode}", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, __file__, "--child", mode], capture_output=True, text=True, check=True)
        rows[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n| warm-up | RSS after import MiB | " + " | ".join(f"RSS after {m} MiB" for m in MODELS)
          + " | live JAX arrays MiB | step variants compiled | in memory |")
    print("|---|---:|" + "---:|" * (len(MODELS) + 3))
    for mode, row in rows.items():
        after = " | ".join(f"{m['rss']:,.0f}" for m in row["models"])
        variants = sum(m["variants"] for m in row["models"])
        in_memory = sum(m["in_memory"] for m in row["models"])
        print(f"| {MODES[mode]} | {row['import']:,.0f} | {after} | {row['live_arrays']:,.0f} | {variants} | "
              f"{in_memory} |")
    lazy, warm = rows["lazy"]["models"][-1]["rss"], rows["warm"]["models"][-1]["rss"]
    variants = sum(m["variants"] for m in rows["warm"]["models"])
    print(f"\ncompiled variants: {warm - lazy:,.0f} MiB of RSS for {variants}, {(warm - lazy) / variants:.0f} MiB each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
