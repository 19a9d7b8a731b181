"""Time to ready of a quantized model: in-situ quantized from source vs restored from an mrs conversion.

    python tools/bench_load.py [--quant Q4_0] [--repeats 5]

Converts SmolLM2-135M Plain (safetensors, float32) with ``in_situ_quant`` into a
temporary directory (``mrs convert``'s code path), then times ``load_checkpoint`` for
both entries: parameters, tokenizer and metadata ready, parameters on the device. The
engine's warm-up compile comes after and is the same for both (and cached by JAX's
compilation cache). Every trial runs in a fresh process, as a server loads a model
once; trials alternate between the two entries so machine load hits both alike; the
files are read once before timing, so both come from the page cache.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import jax

from mrs.config.schema import ModelEntry, ModelSource, entry_from_dict
from mrs.convert import convert
from mrs.fetch import fetch_plain_copy, models_dir
from mrs.loading.load import load_checkpoint
from mrs.quant import param_bytes


def plain(model_dir: Path, **fields: str) -> ModelEntry:
    return ModelEntry(model_id=model_dir.name, model=ModelSource(model_id=str(model_dir)), **fields)


def one_trial(entry_json: str) -> None:
    """Child process: load the entry, print seconds and parameter bytes as JSON."""
    entry = entry_from_dict(json.loads(entry_json))
    begin = time.perf_counter()
    checkpoint = load_checkpoint(entry)
    jax.block_until_ready(checkpoint.params)
    seconds = time.perf_counter() - begin
    print(json.dumps({"seconds": seconds, "param_bytes": param_bytes(checkpoint.params)}))


def trial(entry: ModelEntry) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(asdict(entry))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quant", default="Q4_0", help="in_situ_quant of both entries")
    parser.add_argument("--repeats", type=int, default=5, help="fresh-process trials per entry")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one trial in this process
    args = parser.parse_args()
    if args.one:
        one_trial(args.one)
        return

    plain_dir = fetch_plain_copy(models_dir())
    with tempfile.TemporaryDirectory(prefix="mrs-bench-load-") as tmp:
        source = plain(plain_dir, in_situ_quant=args.quant)
        begin = time.perf_counter()
        conversion = convert(source, Path(tmp) / "conversion")
        print(f"converted {plain_dir} with {args.quant} to {conversion} in {time.perf_counter() - begin:.1f}s",
              flush=True)
        variants = {f"in-situ {args.quant} from safetensors": source, "mrs conversion (Orbax)": plain(conversion)}
        results: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for entry in variants.values():
            trial(entry)  # untimed: page cache and first-run effects
        for i in range(args.repeats):
            for name, entry in variants.items():
                results[name].append(trial(entry))
                print(f"  trial {i + 1} {name}: {results[name][-1]['seconds']:.2f}s", flush=True)

    medians = {name: statistics.median(r["seconds"] for r in runs) for name, runs in results.items()}
    slowest = max(medians.values())
    print(f"\n| load_checkpoint of SmolLM2-135M {args.quant} | median s | min s | params MiB | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for name, runs in results.items():
        print(f"| {name} | {medians[name]:.2f} | {min(r['seconds'] for r in runs):.2f} | "
              f"{runs[0]['param_bytes'] / 2**20:.1f} | {slowest / medians[name]:.1f}x |")


if __name__ == "__main__":
    main()
