"""What the paged KV cache saves: the idle quickstart server's memory, and the time to first
token of a request whose long prefix an earlier one already prefilled.

    python tools/bench_kv.py [--prefix-tokens 1500] [--trials 3]

1. The quickstart server (``mrs serve models=[smollm2-135m,gemma3-270m]``, default engine:
   16 slots, 2,048-token context) idle once both models are loaded: its RSS and each
   model's KV bytes and pages from ``/v1/models/status``, when every step variant has
   compiled and again once the idle ones have left memory (``engine.variant_idle_s``, 60 s
   by default); with the default pool (``engine.kv_tokens=8192``) and with a pool as large
   as the per-slot cache it replaces (16 x 2,048 = 32,768 tokens, what every model
   allocated before paging).
2. ``mrs-server gguf`` on the demo SmolLM2 (default engine), with the prefix cache and with
   ``--no-prefix-cache``: a streamed chat request whose system prompt is roughly
   ``--prefix-tokens`` tokens (a word-count estimate that runs low: 1,500 gave prompts of
   about 1,000 to 1,200 tokens; the table prints the real count), then a second one with the same system prompt and another
   question; the second's time to first token (median of ``--trials`` system prompts) and
   the ``cached_tokens`` its usage reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from servers import free_port, rss_mib, running

from mrs.config.schema import EngineConfig
from mrs.fetch import DEMO_MODELS, fetch, models_dir

BIN = Path(sys.executable).parent
QUICKSTART = ["models=[smollm2-135m,gemma3-270m]", "default_model_id=smollm2-135m"]
WORDS = ("river stone lantern orchard copper meadow harbor falcon glacier violin ember thistle canyon "
         "quartz willow beacon saffron tundra marble cobalt").split()


def _all_loaded(url: str, timeout_s: float = 900) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
        if all(m.get("status") == "loaded" for m in models):
            return
        time.sleep(1)
    raise TimeoutError("models not loaded")


def idle_memory(kv_tokens: int, log: Path) -> dict:
    port = free_port()
    command = [str(BIN / "mrs"), "serve", *QUICKSTART, f"server.port={port}", f"engine.kv_tokens={kv_tokens}"]
    with running(command, port, log) as proc:
        _all_loaded(proc.url)
        proc.all_compiled_s()  # idle: the background compile done too
        time.sleep(5)  # let the loads' transient buffers go
        models = [m["id"] for m in httpx.get(f"{proc.url}/v1/models").json()["data"]]
        memory = {m: httpx.post(f"{proc.url}/v1/models/status", json={"model_id": m}).json()["memory"] for m in models}
        compiled_rss = rss_mib(proc.pid)
        time.sleep(EngineConfig.variant_idle_s + 10)  # the idle variants leave memory
        cards = [card["compiled"] for card in httpx.get(f"{proc.url}/v1/models").json()["data"]]
        return {"rss_mib": compiled_rss, "idle_rss_mib": rss_mib(proc.pid), "memory": memory,
                "variants": sum(c["total"] for c in cards), "in_memory": sum(c["in_memory"] for c in cards)}


def _system_prompt(trial: int, tokens: int) -> str:
    # Words of one or two tokens each: about ``tokens`` tokens, different per trial from the first word.
    words = [WORDS[(trial * 7 + i * (trial + 3)) % len(WORDS)] for i in range(tokens * 2 // 3)]
    return f"Notes {trial}: " + " ".join(words)


def _ttft(url: str, system: str, question: str) -> tuple[float, int, int]:
    """Time to the first streamed content token, and the usage's prompt and cached tokens."""
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True}}
    begin, first, usage = time.perf_counter(), None, None
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if first is None and any(c["delta"].get("content") for c in event["choices"]):
                first = time.perf_counter() - begin
            usage = event.get("usage") or usage
    return first, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]


def shared_prefix(cache: bool, args: argparse.Namespace, log: Path) -> dict:
    port = free_port()
    command = [str(BIN / "mrs-server"), "--port", str(port), *([] if cache else ["--no-prefix-cache"]),
               "gguf", "-m", str(models_dir()), "-f", "SmolLM2-135M-Instruct.Q4_1.gguf"]
    second, cached, prompt = [], [], 0
    with running(command, port, log) as proc:
        proc.all_compiled_s()  # TTFT in the steady state, not in the background compile's padded variants
        for trial in range(args.trials):
            system = _system_prompt(trial, args.prefix_tokens)
            _ttft(proc.url, system, "What is the first word of the notes?")
            seconds, prompt, hit = _ttft(proc.url, system, "Which words appear twice in the notes?")
            second.append(seconds)
            cached.append(hit)
    return {"ttft": statistics.median(second), "all": second, "prompt": prompt, "cached": cached}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix-tokens", type=int, default=1500)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    for model in DEMO_MODELS:
        fetch(model, models_dir())
    with tempfile.TemporaryDirectory() as tmp:
        memory = {}
        for kv_tokens in (8192, 16 * 2048):
            print(f"quickstart server, engine.kv_tokens={kv_tokens} ...", file=sys.stderr, flush=True)
            memory[kv_tokens] = idle_memory(kv_tokens, Path(tmp) / f"quickstart-{kv_tokens}.log")
        prefix = {}
        for cache in (True, False):
            print(f"SmolLM2, prefix cache {'on' if cache else 'off'} ...", file=sys.stderr, flush=True)
            prefix[cache] = shared_prefix(cache, args, Path(tmp) / f"prefix-{cache}.log")
    print("\nThe idle quickstart server (both demo models loaded, 16 slots, 2,048-token context):\n")
    print("| KV pool per model | RSS MiB, every variant compiled | RSS MiB, idle variants left (in memory / "
          "compiled) | SmolLM2 KV MiB in memory of pool (pages) | Gemma 3 KV MiB in memory of pool (pages) |\n"
          "|---|---:|---:|---:|---:|")
    for kv_tokens, row in memory.items():
        cells = [f"{m['kv_resident_bytes'] / 2**20:.0f} of {m['kv_cache_bytes'] / 2**20:.0f} "
                 f"({m['kv_pages_total']} x {m['kv_page_size']})"
                 for m in row["memory"].values()]
        label = f"{kv_tokens} tokens" + (" (default)" if kv_tokens == 8192 else " (= the per-slot cache before paging)")
        print(f"| {label} | {row['rss_mib']:.0f} | {row['idle_rss_mib']:.0f} ({row['in_memory']} / {row['variants']}) | "
              + " | ".join(cells) + " |")
    on, off = prefix[True], prefix[False]
    print(f"\nSmolLM2 Q4_1, a second request sharing a {on['prompt']}-token chat prompt's system part "
          f"(median of {args.trials}):\n")
    print("| prefix cache | TTFT of the second request s | cached_tokens |\n|---|---:|---:|")
    for name, row in (("on", on), ("off", off)):
        print(f"| {name} | {row['ttft']:.3f} ({', '.join(f'{s:.3f}' for s in row['all'])}) | "
              f"{', '.join(map(str, row['cached']))} |")
    print(f"\nTTFT with the cache {off['ttft'] / on['ttft']:.1f}x lower")
    return 0


if __name__ == "__main__":
    sys.exit(main())
