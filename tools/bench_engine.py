"""Continuous batching under load: SmolLM2-135M at 1, 8 and 32 concurrent requests.

    python tools/bench_engine.py [--tokens 128] [--concurrency 1 8 32] [--packed]

Each request generates ``--tokens`` new tokens (greedy, EOS ignored) from its own
prompt; all requests of a level are submitted at once. Prints one table: aggregate
decode tok/s (all new tokens over the level's wall time), time to first token
p50/p95, mean slot occupancy, and the speed-up over the single request. Where
llama-cpp-python is importable, its batch-1 decode (Python API, same GGUF) is added.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import numpy as np

from mrs.config.schema import GGUF, EngineConfig, ModelEntry, ModelSource
from mrs.engine.engine import Engine
from mrs.engine.types import GenerationRequest, SamplingParams, TokenDelta
from mrs.fetch import DEMO_MODELS, fetch, models_dir
from mrs.loading.load import load_checkpoint

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = [
    "a lighthouse keeper", "the first snow of winter", "a robot learning to paint", "an old map",
    "a city under the sea", "a lost violin", "the last train home", "a garden on the moon",
    "a clockmaker's apprentice", "a dragon who fears fire", "a library that never closes", "two rival bakers",
    "a ship in a bottle", "the smell of rain", "a forgotten birthday", "a cat who runs a hotel",
    "a mountain village festival", "a letter from the future", "the quietest street", "a broken compass",
    "a night market", "an astronaut's dream", "a desert well", "a paper boat race",
    "the tallest tree in the forest", "a museum at midnight", "a tiny island", "a stubborn goat",
    "the king's cook", "a windmill", "a secret staircase", "the lantern festival",
]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def run_level(engine: Engine, prompts: list[list[int]], tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    occupancy: list[int] = []
    begin = time.perf_counter()
    streams = [engine.submit(GenerationRequest(ids, params)) for ids in prompts]

    async def consume(stream) -> tuple[float, int]:
        first, count = None, 0
        async for event in stream:
            if isinstance(event, TokenDelta):
                first = first or time.perf_counter()
                count += len(event.token_ids)
        return first - begin, count

    async def sample_occupancy(done: asyncio.Event) -> None:
        while not done.is_set():
            occupancy.append(engine.stats()["slots_busy"])
            await asyncio.sleep(0.05)

    done = asyncio.Event()
    sampler = asyncio.create_task(sample_occupancy(done))
    results = await asyncio.gather(*(consume(s) for s in streams))
    wall = time.perf_counter() - begin
    done.set()
    await sampler
    ttfts = [r[0] for r in results]
    return {
        "agg": sum(r[1] for r in results) / wall,
        "ttft50": percentile(ttfts, 50),
        "ttft95": percentile(ttfts, 95),
        "occupancy": statistics.mean(occupancy) / engine.max_batch if occupancy else float("nan"),
        "wall": wall,
    }


def llama_cpp_batch1(tokens: int, prompt: str) -> float | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(models_dir() / GGUF_FILE), n_ctx=512, n_threads=2, verbose=False)
    llm(prompt, max_tokens=4)  # warm-up
    # mrs decodes all `tokens` (ignore_eos); ban the end tokens so llama.cpp does too.
    no_end = {llm.token_eos(): -1e9, 0: -1e9}
    first, count = None, 0
    for _ in llm(prompt, max_tokens=tokens, temperature=0.0, stream=True, stop=[], logit_bias=no_end):
        first = first or time.perf_counter()
        count += 1
    return (count - 1) / (time.perf_counter() - first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--packed", action="store_true", help="keep GGUF tensors packed instead of float32")
    args = parser.parse_args()
    for model in DEMO_MODELS:
        fetch(model, models_dir())
    entry = ModelEntry(
        model_id="smollm2", dequantize_gguf=not args.packed,
        model=ModelSource(kind=GGUF, quantized_model_id=str(models_dir()), quantized_filename=GGUF_FILE),
    )
    checkpoint = load_checkpoint(entry)
    tok = checkpoint.tokenizer
    texts = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(max(args.concurrency))]
    prompts = [tok.encode(t) for t in texts]
    max_batch = max(args.concurrency)
    config = EngineConfig(max_batch=max_batch, max_seq_len=64 + args.tokens, prefill_buckets=[32, 64])
    engine = Engine(checkpoint, config).start()
    print(f"warm-up {engine.stats()['warmup_s']:.1f}s, {max_batch} slots, "
          f"weights {'packed GGUF' if args.packed else 'float32'}")
    rows = {c: asyncio.run(run_level(engine, prompts[:c], args.tokens)) for c in args.concurrency}
    engine.shutdown()
    base = rows[min(rows)]["agg"]
    print(f"\nSmolLM2-135M-Instruct, {args.tokens} new tokens per request")
    print("| engine | concurrent | aggregate tok/s | vs 1 | TTFT p50 s | TTFT p95 s | slot occupancy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c, r in rows.items():
        print(f"| mrs | {c} | {r['agg']:.1f} | {r['agg'] / base:.2f}x | {r['ttft50']:.2f} | "
              f"{r['ttft95']:.2f} | {r['occupancy']:.0%} |")
    llama = llama_cpp_batch1(args.tokens, texts[0])
    if llama is not None:
        print(f"| llama.cpp (Python API, 2 threads) | 1 | {llama:.1f} | | | | |")
    else:
        print("(llama-cpp-python not installed: no llama.cpp row)")


if __name__ == "__main__":
    main()
