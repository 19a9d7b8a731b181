"""Load checks against a running mrs server (issue 4's "done when" figures).

    python tools/load_test.py --url http://127.0.0.1:1234 concurrent --clients 32 --max-tokens 32
    python tools/load_test.py --url http://127.0.0.1:1234 sequential --requests 500 --pid <server pid>

``concurrent``: N streaming chat/completion clients at once, split round-robin over
every loaded model; each must end with ``[DONE]``, no error event, and usage whose
completion_tokens equals the tokens it streamed (``logprobs`` gives one entry per token).
``sequential``: N requests one after the other, sampling the server's RSS (from
/proc/<pid>/status) every 50 requests, to show memory stays flat.
``soak``: a fixed number of streaming requests from up to 256 concurrent clients, with
random models, endpoints, prompt and output lengths, some clients hanging up mid-stream
(deliberately); then every slot and queue must drain, and RSS must stay flat:

    python tools/load_test.py soak --clients 256 --requests 3000 --pid <server pid>
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import time

import httpx
from servers import rss_mib


async def _stream_one(client: httpx.AsyncClient, model: str, chat: bool, max_tokens: int, i: int) -> dict:
    body: dict = {"model": model, "max_tokens": max_tokens, "temperature": 0.7, "seed": i, "stream": True,
                  "stream_options": {"include_usage": True}, "logprobs": True if chat else 0}
    if chat:
        body["messages"] = [{"role": "user", "content": f"Tell me a fact about the number {i}."}]
    else:
        body["prompt"] = f"Fact {i}: the number {i} is"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    begin, first, tokens, usage, done, error = time.perf_counter(), None, 0, None, False, None
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {await r.aread()!r}"}
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            event = json.loads(line.removeprefix("data: "))
            if "error" in event:
                error = event["error"]
            for choice in event.get("choices", []):
                lp = choice.get("logprobs")
                count = len(lp["content"]) if chat and lp else len(lp["tokens"]) if lp else 0
                tokens += count
                if count and first is None:
                    first = time.perf_counter()
            usage = event.get("usage") or usage
    end = time.perf_counter()
    if error or not done or usage is None or usage["completion_tokens"] != tokens:
        return {"error": error or f"done={done} usage={usage} streamed tokens={tokens}"}
    return {"ttft": (first or end) - begin, "latency": end - begin, "tokens": tokens}


async def concurrent(url: str, clients: int, max_tokens: int) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"] if m["status"] == "loaded"]
        chat = {m: (await client.post("/tokenize", json={"model": m, "messages": [{"role": "user", "content": "x"}]})
                    ).status_code == 200 for m in models}
        begin = time.perf_counter()
        results = await asyncio.gather(*[
            _stream_one(client, models[i % len(models)], chat[models[i % len(models)]], max_tokens, i)
            for i in range(clients)])
        wall = time.perf_counter() - begin
    errors = [r["error"] for r in results if "error" in r]
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    print(f"{clients} streaming clients over {models}: {len(ok)} ok, {len(errors)} errors, wall {wall:.1f}s, "
          f"{tokens} tokens ({tokens / wall:.1f} tok/s aggregate)")
    if ok:
        print(f"  ttft median {statistics.median(r['ttft'] for r in ok):.2f}s, "
              f"latency median {statistics.median(r['latency'] for r in ok):.2f}s max {max(r['latency'] for r in ok):.2f}s")
    for e in errors[:5]:
        print("  error:", e)
    return 1 if errors else 0


def sequential(url: str, requests: int, pid: int, max_tokens: int) -> int:
    samples = []
    with httpx.Client(base_url=url, timeout=600) as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"] if m["status"] == "loaded"]
        for i in range(requests):
            model = models[i % len(models)]
            r = client.post("/v1/completions", json={"model": model, "prompt": f"Request {i}:", "max_tokens": max_tokens,
                                                     "temperature": 0.8, "seed": i})
            if r.status_code != 200:
                print(f"request {i} failed: {r.status_code} {r.text}")
                return 1
            if i % 50 == 0 or i == requests - 1:
                samples.append((i, rss_mib(pid)))
                print(f"  after {i + 1:4d} requests: RSS {samples[-1][1]:.0f} MiB", flush=True)
    growth = samples[-1][1] - samples[1][1] if len(samples) > 2 else 0.0
    print(f"RSS growth from request 51 to {requests}: {growth:+.0f} MiB")
    return 0


async def _soak_one(client: httpx.AsyncClient, model: str, chat: bool, rng: random.Random, hang_up: bool) -> str:
    """One random streaming request; returns "ok", "hung up" (deliberate) or an error description."""
    words = " ".join(rng.choice(["red", "river", "stone", "seven", "quiet", "moon"]) for _ in range(rng.randint(1, 300)))
    body: dict = {"model": model, "max_tokens": rng.randint(1, 64), "temperature": rng.choice([0.0, 0.8]),
                  "seed": rng.randrange(2**32), "stream": True}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    stop_after = rng.randint(0, 8)
    async with client.stream("POST", "/v1/chat/completions" if chat else "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        events, done = 0, False
        async for line in r.aiter_lines():
            if not line:
                continue
            if line == "data: [DONE]":
                done = True
                continue
            if "error" in json.loads(line.removeprefix("data: ")):
                return f"error event: {line[:200]}"
            events += 1
            if hang_up and events > stop_after:
                return "hung up"  # leaving the block closes the connection mid-stream
    return "ok" if done else "stream ended without [DONE]"


async def _drained(client: httpx.AsyncClient, timeout: float = 60.0) -> dict[str, float]:
    """Busy slots and queue depth summed over models, once both reach 0 (or at the timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        text = (await client.get("/metrics")).text
        totals = {name: sum(float(v) for v in re.findall(rf"^mrs_{name}\{{[^}}]*\}} ([\d.]+)$", text, re.M))
                  for name in ("busy_slots", "queue_depth")}
        if not any(totals.values()) or time.monotonic() > deadline:
            return totals
        await asyncio.sleep(0.2)


async def soak(url: str, clients: int, requests: int, pid: int | None, hang_up: float, seed: int) -> int:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    errors: list[str] = []
    rss: list[tuple[int, float]] = []
    done = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        models = [m["id"] for m in (await client.get("/v1/models")).json()["data"] if m["status"] == "loaded"]
        chat = {m: (await client.post("/tokenize", json={"model": m, "messages": [{"role": "user", "content": "x"}]})
                    ).status_code == 200 for m in models}
        plan = [(rng.choice(models), rng.random() < hang_up, random.Random(rng.randrange(2**32)))
                for _ in range(requests)]
        queue: asyncio.Queue = asyncio.Queue()
        for item in plan:
            queue.put_nowait(item)

        async def worker() -> None:
            nonlocal done
            while not queue.empty():
                model, hang, r = queue.get_nowait()
                use_chat = chat[model] and r.random() < 0.5
                try:
                    outcome = await _soak_one(client, model, use_chat, r, hang)
                except httpx.HTTPError as e:
                    outcome = f"{type(e).__name__}: {e}"
                key = outcome if outcome in ("ok", "hung up") else "error"
                outcomes[key] = outcomes.get(key, 0) + 1
                if key == "error":
                    errors.append(outcome)
                done += 1
                if pid and (done % max(1, requests // 10) == 0):
                    rss.append((done, rss_mib(pid)))
                    print(f"  {done:5d}/{requests} requests, RSS {rss[-1][1]:.0f} MiB", flush=True)

        begin = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(clients)])
        wall = time.perf_counter() - begin
        left = await _drained(client)
    print(f"soak: {requests} streaming requests, {clients} concurrent clients, models {models}, {wall:.0f} s")
    print(f"  completed {outcomes.get('ok', 0)}, hung up on purpose {outcomes.get('hung up', 0)}, "
          f"errors {outcomes.get('error', 0)}")
    print(f"  afterwards: busy slots {left['busy_slots']:.0f}, queued {left['queue_depth']:.0f}")
    if len(rss) > 1:
        print(f"  RSS {rss[0][1]:.0f} MiB after {rss[0][0]} requests, {rss[-1][1]:.0f} MiB after {rss[-1][0]} "
              f"({rss[-1][1] - rss[0][1]:+.0f} MiB)")
    for e in errors[:5]:
        print("  error:", e)
    return 1 if errors or any(left.values()) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:1234")
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("concurrent")
    c.add_argument("--clients", type=int, default=32)
    c.add_argument("--max-tokens", type=int, default=32)
    s = sub.add_parser("sequential")
    s.add_argument("--requests", type=int, default=500)
    s.add_argument("--pid", type=int, required=True, help="the server's process id (for its RSS)")
    s.add_argument("--max-tokens", type=int, default=8)
    k = sub.add_parser("soak")
    k.add_argument("--clients", type=int, default=256)
    k.add_argument("--requests", type=int, default=3000)
    k.add_argument("--pid", type=int, help="the server's process id (for its RSS)")
    k.add_argument("--hang-up", type=float, default=0.1, help="fraction of clients that disconnect mid-stream")
    k.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.mode == "concurrent":
        return asyncio.run(concurrent(args.url, args.clients, args.max_tokens))
    if args.mode == "soak":
        return asyncio.run(soak(args.url, args.clients, args.requests, args.pid, args.hang_up, args.seed))
    return sequential(args.url, args.requests, args.pid, args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
