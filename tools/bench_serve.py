"""mrs against llama.cpp's own ``llama-server`` through HTTP, on the same GGUF, in one run.

    python tools/bench_serve.py [--clients 1,8,32,64] [--slots 32] [--max-tokens 128]

Builds nothing: run ``bash tools/build_llama_server.sh`` first (or pass ``--llama-server``).
Starts each server in turn on SmolLM2-135M-Instruct Q4_1 (the demo GGUF) with the same slot
count, context and threads (``llama-server -t 2 -tb 2 -np SLOTS -c SLOTS*CTX``;
``mrs-server --max-seqs SLOTS --max-seq-len CTX --kv-tokens SLOTS*CTX``), then at each client count sends the
same chat requests (different prompts, temperature 0.8, a seed each, end tokens ignored
so every request makes ``--max-tokens`` tokens), streamed and not. Each client sends its
requests one after the other, enough rounds for ``--min-requests`` per level. Prints one table: aggregate completion tok/s
(wall time from the first request sent to the last answer), time to first token and
inter-token latency (gaps between streamed content chunks, as vLLM's benchmark_serving
measures them) at p50/p95 per server, and mrs / llama-server; then each server's time
from process start to a healthy ``/health`` (and mrs's to every step variant compiled in
the background: the levels are measured after it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from servers import free_port, running

from mrs.fetch import DEMO_MODELS, fetch, models_dir

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOPICS = ["rivers", "volcanoes", "the moon", "bread", "chess", "owls", "glaciers", "trains", "bees", "copper",
          "tides", "maps", "violins", "deserts", "comets", "salt"]
DEFAULT_LLAMA_SERVER = Path.home() / ".cache/mrs/llama.cpp/build/bin/llama-server"


@dataclass
class Level:
    """What one server did at one client count, in one mode."""
    wall_s: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _body(model: str, i: int, max_tokens: int, stream: bool) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    body = {"model": model, "messages": [{"role": "user", "content": f"Write a few sentences about {topic} (note {i})."}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": i, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


async def _one(client: httpx.AsyncClient, model: str, i: int, max_tokens: int, stream: bool, level: Level) -> None:
    begin = time.perf_counter()
    if not stream:
        reply = await client.post("/v1/chat/completions", json=_body(model, i, max_tokens, stream))
        if reply.status_code != 200:
            level.errors.append(f"HTTP {reply.status_code}: {reply.text[:200]}")
            return
        level.tokens += reply.json()["usage"]["completion_tokens"]
        return
    stamps: list[float] = []
    usage = None
    async with client.stream("POST", "/v1/chat/completions", json=_body(model, i, max_tokens, stream)) as reply:
        if reply.status_code != 200:
            level.errors.append(f"HTTP {reply.status_code}: {(await reply.aread())[:200]!r}")
            return
        async for line in reply.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                level.errors.append(str(event["error"])[:200])
                return
            if any(c.get("delta", {}).get("content") for c in event.get("choices") or []):
                stamps.append(time.perf_counter())
            usage = event.get("usage") or usage
    if not stamps:
        level.errors.append("no content streamed")
        return
    level.tokens += usage["completion_tokens"] if usage else len(stamps)
    level.ttft.append(stamps[0] - begin)
    level.gaps.extend(b - a for a, b in zip(stamps, stamps[1:]))


async def drive(url: str, model: str, clients: int, rounds: int, max_tokens: int, stream: bool, offset: int) -> Level:
    """``clients`` concurrent clients, each sending ``rounds`` requests in turn."""
    level = Level()
    # A new connection per request: llama-server now and then closes a kept-alive connection
    # as the next request goes out ("Server disconnected without sending a response").
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=900, limits=limits) as client:
        async def client_loop(c: int) -> None:
            for r in range(rounds):
                await _one(client, model, offset + r * clients + c, max_tokens, stream, level)

        begin = time.perf_counter()
        await asyncio.gather(*[client_loop(c) for c in range(clients)])
        level.wall_s = time.perf_counter() - begin
    return level


def measure(name: str, url: str, args: argparse.Namespace) -> dict[tuple[bool, int], Level]:
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    asyncio.run(drive(url, model, 1, 1, 8, True, 10_000))  # one short request first: connections, caches
    results = {}
    for stream in (True, False):
        for clients in args.clients:
            rounds = max(1, args.min_requests // clients)
            print(f"{name}: {clients} clients x {rounds} {'streamed' if stream else 'whole'} requests ...",
                  file=sys.stderr, flush=True)
            level = asyncio.run(drive(url, model, clients, rounds, args.max_tokens, stream, 0))
            if level.errors:
                raise RuntimeError(f"{name}: {len(level.errors)} failed requests, e.g. {level.errors[0]}")
            results[stream, clients] = level
    return results


def _ms(values: list[float], q: float) -> str:
    return f"{_pct(values, q) * 1000:.0f}"


def report(results: dict[str, dict[tuple[bool, int], Level]], ready: dict[str, float], args: argparse.Namespace) -> None:
    """One row per mode and client count; per server tok/s, TTFT and ITL; mrs / llama-server when both ran."""
    names = list(results)
    both = len(names) == 2
    print(f"\nSmolLM2-135M-Instruct {GGUF_FILE.split('.')[-2]}, {args.slots} slots, {args.ctx} tokens per slot, "
          f"{args.max_tokens} tokens per request, temperature 0.8, end tokens ignored\n")
    per = ["tok/s", "TTFT p50 s", "TTFT p95 s", "ITL p50 ms", "ITL p95 ms"]
    header = ["mode", "clients"] + [f"{n} {c}" for n in names for c in per] + (["mrs / llama tok/s"] if both else [])
    print("| " + " | ".join(header) + " |\n|" + "---|" * 2 + "---:|" * (len(header) - 2))
    for stream, clients in results[names[0]]:
        cells = ["stream" if stream else "whole", str(clients)]
        for name in names:
            lv = results[name][stream, clients]
            cells.append(f"{lv.tok_s:.1f}")
            cells += ([f"{_pct(lv.ttft, .5):.2f}", f"{_pct(lv.ttft, .95):.2f}", _ms(lv.gaps, .5), _ms(lv.gaps, .95)]
                      if stream else [""] * 4)
        if both:
            cells.append(f"{results[names[1]][stream, clients].tok_s / results[names[0]][stream, clients].tok_s:.2f}x")
        print("| " + " | ".join(cells) + " |")
    print("\n| server | start to healthy s |\n|---|---:|")
    for name, seconds in ready.items():
        print(f"| {name} | {seconds:.1f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    parser.add_argument("--slots", type=int, default=32, help="parallel sequences of each server (default 32)")
    parser.add_argument("--ctx", type=int, default=512, help="context tokens per slot (default 512)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--min-requests", type=int, default=4,
                        help="requests per level at least; clients send in rounds (default 4)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER)
    parser.add_argument("--only", choices=("llama", "mrs"), help="run one server only (no ratios)")
    args = parser.parse_args()
    if args.only != "mrs" and not args.llama_server.exists():
        parser.error(f"{args.llama_server} not found: run `bash tools/build_llama_server.sh`")
    gguf_dir = models_dir()
    fetch(next(m for m in DEMO_MODELS if m.name == GGUF_FILE), gguf_dir)
    gguf = gguf_dir / GGUF_FILE
    ready: dict[str, float] = {}
    results: dict[str, dict[tuple[bool, int], Level]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.only != "mrs":
            port = free_port()
            command = [str(args.llama_server), "-m", str(gguf), "--port", str(port), "-t", str(args.threads),
                       "-tb", str(args.threads), "-np", str(args.slots), "-c", str(args.slots * args.ctx),
                       "--jinja", "--no-webui"]
            with running(command, port, Path(tmp) / "llama-server.log") as proc:
                ready["llama-server"] = proc.ready_s
                results["llama-server"] = measure("llama-server", proc.url, args)
        if args.only != "llama":
            port = free_port()
            command = [str(Path(sys.executable).parent / "mrs-server"), "--port", str(port), "--max-seqs", str(args.slots),
                       "--max-seq-len", str(args.ctx), "--kv-tokens", str(args.slots * args.ctx),
                       "gguf", "-m", str(gguf_dir), "-f", GGUF_FILE]
            with running(command, port, Path(tmp) / "mrs-server.log") as proc:
                ready["mrs-server"] = proc.ready_s
                compiled = proc.all_compiled_s()  # measure the steady state, not the background compile
                print(f"mrs-server: every step variant compiled {compiled:.1f} s after its start", file=sys.stderr)
                results["mrs"] = measure("mrs-server", proc.url, args)
            ready["mrs-server, every step variant compiled"] = compiled
    report(results, ready, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
