"""Continuous batching under load: SmolLM2-135M at 1, 8 and 32 concurrent requests.

    python tools/bench_engine.py [--tokens 128] [--concurrency 1 8 32] [--packed] [--dtype bfloat16]
                                 [--constrained 1 16] [--decode-steps 4]

Each request generates ``--tokens`` new tokens (greedy, EOS ignored) from its own
prompt; all requests of a level are submitted at once. Prints one table: aggregate
decode tok/s (all new tokens over the level's wall time), time to first token
p50/p95, mean slot occupancy, and the speed-up over the single request. Where
llama-cpp-python is importable, llama.cpp's figures on the same GGUF follow in the
same table: batch-1 decode through its Python API, and aggregate throughput through
its OpenAI-compatible server (``python -m llama_cpp.server``, 2 threads) at the same
concurrency levels, with the same prompts and token counts (end tokens banned).

``--constrained K ...`` adds rows of 16 concurrent requests of which K decode under a
grammar (JSON lines of objects, ``CONSTRAINED``: it never completes, so every request
makes all its tokens), with their aggregate against the unconstrained 16 of the same
run and the host time the grammar engine took per constrained token.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator

import jax
import numpy as np

from mrs.config.schema import GGUF, EngineConfig, ModelEntry, ModelSource
from mrs.engine.engine import Engine
from mrs.engine.grammar import JSON_OPTIONS
from mrs.engine.types import GenerationRequest, Grammar, SamplingParams, TokenDelta
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


# JSON lines of small records: a realistic extraction grammar that never completes, so a
# constrained request makes as many tokens as an unconstrained one.
RECORD = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
CONSTRAINED = Grammar("lark", f'start: (record "\\n")+\nrecord: %json {json.dumps({**RECORD, "x-guidance": JSON_OPTIONS})}')


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


async def timed(stream: AsyncIterator[int], begin: float) -> tuple[float, int]:
    """Time to the first token and the token count of one stream of per-event token counts."""
    first, count = None, 0
    async for tokens in stream:
        first = first or time.perf_counter()
        count += tokens
    return (first or time.perf_counter()) - begin, count


def level_row(results: list[tuple[float, int]], wall: float) -> dict:
    ttfts = [r[0] for r in results]
    return {"agg": sum(r[1] for r in results) / wall, "ttft50": percentile(ttfts, 50),
            "ttft95": percentile(ttfts, 95), "occupancy": float("nan")}


async def run_level(engine: Engine, prompts: list[list[int]], tokens: int, constrained: int = 0) -> dict:
    """All ``prompts`` at once; the first ``constrained`` of them under ``CONSTRAINED``."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    # The grammar allows EOS after each record (ignore_eos would end a constrained request there): ban it.
    no_end = {t: -100.0 for t in engine.checkpoint.eos_token_ids}
    grammared = SamplingParams(temperature=0.0, max_tokens=tokens, logit_bias=no_end, grammar=CONSTRAINED)
    occupancy: list[int] = []
    host_before = engine.stats()["grammar_host_s"]
    begin = time.perf_counter()
    streams = [engine.submit(GenerationRequest(ids, grammared if i < constrained else params))
               for i, ids in enumerate(prompts)]

    async def token_counts(stream) -> AsyncIterator[int]:
        async for event in stream:
            if isinstance(event, TokenDelta):
                yield len(event.token_ids)

    async def sample_occupancy(done: asyncio.Event) -> None:
        while not done.is_set():
            occupancy.append(engine.stats()["slots_busy"])
            await asyncio.sleep(0.05)

    done = asyncio.Event()
    sampler = asyncio.create_task(sample_occupancy(done))
    results = await asyncio.gather(*(timed(token_counts(s), begin) for s in streams))
    row = level_row(results, time.perf_counter() - begin)
    done.set()
    await sampler
    row["occupancy"] = statistics.mean(occupancy) / engine.max_batch if occupancy else float("nan")
    constrained_tokens = sum(r[1] for r in results[:constrained])
    row["grammar_us"] = 1e6 * (engine.stats()["grammar_host_s"] - host_before) / max(constrained_tokens, 1)
    return row


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_batch1(tokens: int, prompt: str, end_ids: list[int]) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(models_dir() / GGUF_FILE), n_ctx=512, n_threads=2, verbose=False)
    llm(prompt, max_tokens=4)  # warm-up
    # mrs decodes all `tokens` (ignore_eos); ban the end tokens so llama.cpp does too.
    no_end = {i: -1e9 for i in end_ids}
    first, count = None, 0
    for _ in llm(prompt, max_tokens=tokens, temperature=0.0, stream=True, stop=[], logit_bias=no_end):
        first = first or time.perf_counter()
        count += 1
    return (count - 1) / (time.perf_counter() - first)


@contextlib.contextmanager
def llama_cpp_server(n_ctx: int) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on a free port, queueing (not interrupting) requests."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(models_dir() / GGUF_FILE),
           "--n_ctx", str(n_ctx), "--n_threads", "2", "--host", "127.0.0.1", "--port", str(port),
           "--interrupt_requests", "False", "--verbose", "False"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server did not start: {' '.join(cmd)}")
            time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


async def llama_cpp_level(url: str, texts: list[str], tokens: int, end_ids: list[int]) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url, api_key="none", timeout=3600, max_retries=0)

    async def token_counts(text: str) -> AsyncIterator[int]:
        stream = await client.completions.create(
            model=GGUF_FILE, prompt=text, max_tokens=tokens, temperature=0.0, stream=True,
            logit_bias={str(i): -100 for i in end_ids},
        )
        async for chunk in stream:  # llama-cpp-python streams one token per chunk
            if chunk.choices and chunk.choices[0].text is not None:
                yield 1

    begin = time.perf_counter()
    results = await asyncio.gather(*(timed(token_counts(t), begin) for t in texts))
    row = level_row(results, time.perf_counter() - begin)
    await client.close()
    return row


def llama_cpp_server_rows(texts: list[str], tokens: int, levels: list[int], end_ids: list[int]) -> dict[int, dict]:
    with llama_cpp_server(n_ctx=512) as url:
        asyncio.run(llama_cpp_level(url, texts[:1], 4, end_ids))  # warm-up
        return {c: asyncio.run(llama_cpp_level(url, texts[:c], tokens, end_ids)) for c in levels}


def print_row(engine: str, concurrent: int, r: dict, base: float) -> None:
    occupancy = "" if np.isnan(r["occupancy"]) else f"{r['occupancy']:.0%}"
    print(f"| {engine} | {concurrent} | {r['agg']:.1f} | {r['agg'] / base:.2f}x | {r['ttft50']:.2f} | "
          f"{r['ttft95']:.2f} | {occupancy} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--packed", action="store_true", help="keep GGUF tensors packed instead of expanding them")
    parser.add_argument("--decode-steps", type=int, default=EngineConfig.decode_steps,
                        help="tokens per slot one decode call may make (engine.decode_steps)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="the model's dtype: expanded weights, activations and the KV cache")
    parser.add_argument("--constrained", type=int, nargs="*", default=[],
                        help="rows of 16 requests of which K are constrained by a grammar")
    args = parser.parse_args()
    if args.constrained:
        args.concurrency = sorted({*args.concurrency, 16})
    for model in DEMO_MODELS:
        fetch(model, models_dir())
    entry = ModelEntry(
        model_id="smollm2", dequantize_gguf=not args.packed, dtype=args.dtype,
        model=ModelSource(kind=GGUF, quantized_model_id=str(models_dir()), quantized_filename=GGUF_FILE),
    )
    checkpoint = load_checkpoint(entry)
    tok = checkpoint.tokenizer
    texts = [f"Write a short story about {TOPICS[i % len(TOPICS)]}." for i in range(max(args.concurrency))]
    prompts = [tok.encode(t) for t in texts]
    max_batch = max(args.concurrency)
    config = EngineConfig(max_batch=max_batch, max_seq_len=64 + args.tokens, prefill_buckets=[32, 64],
                          decode_steps=args.decode_steps,
                          compile_in_background=False)  # steady-state figures: everything compiled first
    engine = Engine(checkpoint, config).start()
    print(f"warm-up {engine.stats()['warmup_s']:.1f}s, {max_batch} slots, "
          f"weights {'packed GGUF' if args.packed else args.dtype}, activations and KV cache {args.dtype}, "
          f"up to {args.decode_steps} tokens per decode call, "
          f"on {jax.devices()[0].device_kind}")
    rows = {c: asyncio.run(run_level(engine, prompts[:c], args.tokens)) for c in args.concurrency}
    grammar_rows = {k: asyncio.run(run_level(engine, prompts[:16], args.tokens, k)) for k in args.constrained}
    engine.shutdown()
    end_ids = sorted(set(checkpoint.eos_token_ids) | {0})
    base = rows[min(rows)]["agg"]
    print(f"\nSmolLM2-135M-Instruct, {args.tokens} new tokens per request; 'vs 1' is against mrs at 1 request")
    print("| engine | concurrent | aggregate tok/s | vs 1 | TTFT p50 s | TTFT p95 s | slot occupancy |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c, r in rows.items():
        print_row("mrs (engine API)", c, r, base)
    if grammar_rows:
        free = rows[16]["agg"]
        print("\n| constrained of 16 | aggregate tok/s | vs unconstrained 16 | TTFT p50 s | grammar host us/token |")
        print("|---:|---:|---:|---:|---:|")
        for k, r in grammar_rows.items():
            print(f"| {k} | {r['agg']:.1f} | {r['agg'] / free:.0%} | {r['ttft50']:.2f} | {r['grammar_us']:.0f} |")
    if not llama_cpp_available():
        print("(llama-cpp-python not installed: no llama.cpp rows)")
        return
    batch1 = llama_cpp_batch1(args.tokens, texts[0], end_ids)
    print(f"| llama.cpp (Python API, 2 threads) | 1 | {batch1:.1f} | {batch1 / base:.2f}x | | | |")
    for c, r in llama_cpp_server_rows(texts, args.tokens, args.concurrency, end_ids).items():
        print_row("llama.cpp (llama_cpp.server, 2 threads)", c, r, base)


if __name__ == "__main__":
    main()
