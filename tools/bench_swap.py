"""Models that come and go: time to first token of a cold load, of a reload, and of requests
that alternate between the two demo models on a server that holds one at a time.

    python tools/bench_swap.py [--requests 6] [--cold-cache]

Starts ``mrs-server`` with both demo models (SmolLM2-135M and Gemma 3 270M, default engine)
as lazy entries, then for each model: a streamed request that loads it (cold: the first
load in this process), an unload, the same request again (reload). A second server with
``--max-loaded-models 1`` then serves ``--requests`` requests alternating between the
models, each of which evicts the other. ``--cold-cache`` points JAX's persistent
compilation cache at an empty directory (every load compiles); by default the user's
cache is used, as a restarted server would. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from servers import free_port, running

from mrs.fetch import DEMO_MODELS, fetch, models_dir

BIN = Path(sys.executable).parent
MODELS = {"smollm2-135m": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3-270m": "gemma-3-270m-q4_k_m.gguf"}
PROMPT = "The capital of France is"


@contextlib.contextmanager
def server(config: Path, extra: list[str], env: dict[str, str]) -> Iterator[str]:
    """A running ``mrs-server`` serving ``config``; its output goes to a log file next to it."""
    port = free_port()
    command = [str(BIN / "mrs-server"), "--port", str(port), *extra, "--multi-model", "--multi-model-config", str(config)]
    with running(command, port, config.with_name(f"server-{port}.log"), env) as proc:
        yield proc.url


def ttft(url: str, model: str) -> float:
    """Seconds from sending a streamed completion to its first token (a load included)."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True}
    print(f"request to {model} ...", file=sys.stderr, flush=True)
    begin = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=900) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                return time.perf_counter() - begin
    raise RuntimeError(f"{model}: no token streamed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6, help="alternating requests (default 6)")
    parser.add_argument("--cold-cache", action="store_true", help="an empty JAX compilation cache")
    args = parser.parse_args()
    cache = models_dir()
    for model in DEMO_MODELS:
        fetch(model, cache)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.cold_cache:
            env["JAX_COMPILATION_CACHE_DIR"] = str(Path(tmp) / "jax-cache")
        config = Path(tmp) / "models.json"
        config.write_text(json.dumps([  # both lazy: nothing loads before the first request
            {"model_id": m, "lazy": True, "model": {"Gguf": {"quantized_model_id": str(cache), "quantized_filename": f}}}
            for m, f in MODELS.items()]))
        rows = []
        with server(config, [], env) as url:
            for model in MODELS:
                cold = ttft(url, model)
                httpx.post(f"{url}/v1/models/unload", json={"model_id": model}, timeout=600).raise_for_status()
                warm = ttft(url, model)
                rows.append((model, cold, warm))
        with server(config, ["--max-loaded-models", "1"], env) as url:
            order = [list(MODELS)[i % 2] for i in range(args.requests)]
            swaps = [ttft(url, model) for model in order]
    print("\n| model | cold load TTFT s | reload TTFT s |\n|---|---:|---:|")
    for model, cold, warm in rows:
        print(f"| {model} | {cold:.1f} | {warm:.1f} |")
    print(f"\nalternating {args.requests} requests with --max-loaded-models 1 (each evicts the other): "
          f"TTFT median {statistics.median(swaps):.1f} s, min {min(swaps):.1f} s, max {max(swaps):.1f} s "
          f"({', '.join(f'{s:.1f}' for s in swaps)})")
    print(f"compilation cache: {'empty at start' if args.cold_cache else 'as it was (JAX_COMPILATION_CACHE_DIR or ~/.cache/mrs/jax)'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
