"""How long the quickstart server takes to serve, from an empty and from a warm compilation cache.

    python tools/bench_startup.py

Starts ``mrs serve models=[smollm2-135m,gemma3-270m]`` (the quickstart, default engine)
four times: with empty caches (JAX's compilation cache and mrs's tokenizer cache), then
again with the caches that start filled, each with the default (the largest step variants
compiled before a model reports ready, the rest in the background) and with
``engine.compile_in_background=false`` (every variant before ready; ``--compile`` picks
one of the two). For each start it prints the seconds from the process start to
``/health`` answering 200, to every model loaded, and to every model's step variants
compiled (the model cards' ``compiled`` field), and the RSS then.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx
from servers import free_port, rss_mib, running

from mrs.fetch import DEMO_MODELS, fetch, models_dir

BIN = Path(sys.executable).parent
QUICKSTART = ["models=[smollm2-135m,gemma3-270m]", "default_model_id=smollm2-135m"]


def _until(condition, timeout_s: float = 1800) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not get there")
        time.sleep(0.2)


def _cards(url: str) -> list[dict]:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"]


def start(cache: Path, background: bool, log: Path) -> dict:
    port = free_port()
    command = [str(BIN / "mrs"), "serve", *QUICKSTART, f"server.port={port}",
               f"engine.compile_in_background={str(background).lower()}"]
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache / "jax"),
           "MRS_TOKENIZER_CACHE_DIR": str(cache / "tokenizers")}
    with running(command, port, log, env=env, timeout_s=1800) as proc:
        healthy = proc.ready_s
        _until(lambda: all(card.get("status") == "loaded" for card in _cards(proc.url)))
        loaded = time.perf_counter() - proc.started
        compiled = proc.all_compiled_s()
        variants = {c["id"]: c["compiled"]["total"] for c in _cards(proc.url)}
        return {"healthy": healthy, "loaded": loaded, "compiled": compiled, "rss": rss_mib(proc.pid),
                "variants": variants}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile", choices=("background", "first", "both"), default="both",
                        help="which compile mode(s) to start: in the background (the default), everything first")
    args = parser.parse_args()
    modes = {"background": (True,), "first": (False,), "both": (True, False)}[args.compile]
    for model in DEMO_MODELS:
        fetch(model, models_dir())
    rows = []
    with tempfile.TemporaryDirectory(prefix="mrs-bench-startup-") as tmp:
        for background in modes:
            cache = Path(tmp) / f"caches-{background}"  # each mode fills its own
            for state in ("empty", "warm"):
                name = "background (default)" if background else "everything first"
                print(f"starting: {name}, {state} cache", file=sys.stderr, flush=True)
                rows.append((name, state, start(cache, background, Path(tmp) / f"server-{background}-{state}.log")))
    print("\n| compile | cache | /health 200 s | all models loaded s | all variants compiled s | RSS then MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for name, state, row in rows:
        print(f"| {name} | {state} | {row['healthy']:.1f} | {row['loaded']:.1f} | {row['compiled']:.1f} | "
              f"{row['rss']:,.0f} |")
    print(f"\nstep variants per model: {rows[0][2]['variants']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
