"""Start a server process for a benchmark and wait until its ``/health`` answers 200; read its RSS."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Running:
    url: str
    ready_s: float  # from starting the process to the first 200 from /health
    pid: int
    started: float  # time.perf_counter() when the process started

    def all_compiled_s(self, timeout_s: float = 1800) -> float:
        """Wait until every model of this mrs server has compiled all its step variants (they
        compile in the background after ready); seconds from the process start."""
        deadline = time.monotonic() + timeout_s
        while True:
            cards = httpx.get(f"{self.url}/v1/models", timeout=10).json()["data"]
            if all(c.get("compiled") and c["compiled"]["variants"] == c["compiled"]["total"] for c in cards):
                return time.perf_counter() - self.started
            if time.monotonic() > deadline:
                raise TimeoutError(f"step variants not compiled after {timeout_s:.0f} s")
            time.sleep(0.2)


def rss_mib(pid: int) -> float:
    """A process's resident memory (``VmRSS``), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def running(command: list[str], port: int, log: Path, env: dict[str, str] | None = None,
            timeout_s: float = 900) -> Iterator[Running]:
    """Run ``command`` (which must listen on ``port``), its output to ``log``; the log's tail is
    printed if anything fails, and the process is stopped on exit."""
    url = f"http://127.0.0.1:{port}"
    begin = time.perf_counter()
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{command[0]} not healthy after {timeout_s:.0f} s")
            time.sleep(0.2)
        yield Running(url, time.perf_counter() - begin, proc.pid, begin)
    except BaseException:
        print(f"--- last lines of {log} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-60:]),
              file=sys.stderr)
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
