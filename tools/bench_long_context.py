"""An 8,192-token context for the demo SmolLM2 from the default KV pool (no 8k rows per slot).

    python tools/bench_long_context.py [--prompt-tokens 7800]

Starts ``mrs-server --max-seq-len 8192 gguf`` on the demo SmolLM2 Q4_1 with the default
engine otherwise (16 slots sharing one 8,192-token pool), reads the model's context and
KV pool from ``/v1/models/status``, then sends one completion request whose prompt is
about ``--prompt-tokens`` tokens (streamed, greedy, 16 tokens) and prints its prompt
tokens, time to first token and total time, and the RSS of the server afterwards. It does
not wait for the background compile: a prompt this long runs in the largest variants,
which are compiled before the model reports ready.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from servers import free_port, rss_mib, running

from mrs.fetch import DEMO_MODELS, fetch, models_dir

BIN = Path(sys.executable).parent
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _prompt(lines: int) -> str:
    return "\n".join(f"line {i}: the river runs past stone {i % 97}" for i in range(lines)) + "\nline 0:"


def _count(url: str, model: str, prompt: str) -> tuple[int, int]:
    """The prompt's tokens and the model's context, from the server's tokenizer."""
    reply = httpx.post(f"{url}/tokenize", json={"model": model, "prompt": prompt}).json()
    return reply["count"], reply["max_model_len"]


def _sized_prompt(url: str, model: str, tokens: int) -> str:
    """Numbered lines, as many as make at most ``tokens`` tokens."""
    lines = tokens // 10
    count, _ = _count(url, model, _prompt(lines))
    lines = lines * tokens // count
    while _count(url, model, _prompt(lines))[0] > tokens:
        lines -= 10
    return _prompt(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=7800)
    args = parser.parse_args()
    fetch(next(m for m in DEMO_MODELS if m.name == GGUF_FILE), models_dir())
    port = free_port()
    command = [str(BIN / "mrs-server"), "--port", str(port), "--max-seq-len", "8192",
               "gguf", "-m", str(models_dir()), "-f", GGUF_FILE]
    with tempfile.TemporaryDirectory() as tmp, running(command, port, Path(tmp) / "server.log") as proc:
        model = httpx.get(f"{proc.url}/v1/models").json()["data"][0]["id"]
        memory = httpx.post(f"{proc.url}/v1/models/status", json={"model_id": model}).json()["memory"]
        prompt = _sized_prompt(proc.url, model, args.prompt_tokens)
        _, context = _count(proc.url, model, prompt)
        body = {"model": model, "prompt": prompt, "max_tokens": 16, "temperature": 0.0,
                "stream": True, "stream_options": {"include_usage": True}}
        begin, first, usage, text = time.perf_counter(), None, None, ""
        with httpx.stream("POST", f"{proc.url}/v1/completions", json=body, timeout=1800) as reply:
            if reply.status_code != 200:
                raise RuntimeError(f"{reply.status_code}: {reply.read().decode()}")
            for line in reply.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                for choice in event["choices"]:
                    if choice.get("text") and first is None:
                        first = time.perf_counter() - begin
                    text += choice.get("text") or ""
                usage = event.get("usage") or usage
        total = time.perf_counter() - begin
        rss = rss_mib(proc.pid)
    print("\n| context | KV pool | prompt tokens | completion tokens | TTFT s | total s | server RSS MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    print(f"| {context} | "
          f"{memory['kv_cache_bytes'] / 2**20:.0f} MiB ({memory['kv_pages_total']} x {memory['kv_page_size']} tokens) | "
          f"{usage['prompt_tokens']} | {usage['completion_tokens']} | {first:.1f} | {total:.1f} | {rss:,.0f} |")
    print(f"\nreply: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
