"""Start a real ``mrs-server`` / ``mrs serve`` process on a free port and wait until it serves.

Every server the tests start shares one small engine shape (``SMALL_ENGINE``) and a
persistent JAX compilation cache, so only the first start of a model compiles.
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mrs.fetch import models_dir

BIN = Path(sys.executable).parent
# The same shape everywhere: a second server with it hits the compilation cache.
SMALL_ENGINE = ["--max-seqs", "4", "--max-seq-len", "512", "--prefill-buckets", "64,256"]
SMALL_ENGINE_HYDRA = ["engine=small"]  # conf/engine/small.yaml: the same numbers
# Tiny random-weight models: one prefill bucket and one attention length, two compiles.
TINY_ENGINE = ["--max-seqs", "2", "--max-seq-len", "128", "--prefill-buckets", "64"]
TINY_ENGINE_HYDRA = ["engine.max_batch=2", "engine.max_seq_len=128", "engine.prefill_buckets=[64]"]
TINY_ENGINE_CONFIG = {"max_batch": 2, "max_seq_len": 128, "prefill_buckets": [64]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def jax_cache_env() -> dict[str, str]:
    """The environment for server processes: a persistent JAX compilation cache (conftest's,
    else one next to the demo models), so repeated starts skip XLA compiles."""
    return {
        **os.environ,
        "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR")
        or str(models_dir().parent / "jax-test-cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
    }


@dataclass
class Server:
    proc: subprocess.Popen
    port: int
    log: Path
    ca: Path | None = None  # the certificate of a server started with TLS

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """httpx's ``verify=`` for this server."""
        return ssl.create_default_context(cafile=str(self.ca)) if self.ca else True

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=5, verify=self.verify).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.output()[-4000:]}")

    def wait_all_loaded(self, timeout: float = 900.0) -> None:
        """Until every model's status is ``loaded`` (the default one serves first)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = httpx.get(f"{self.url}/health", timeout=5, verify=self.verify).json()["models"]
            if set(statuses.values()) == {"loaded"}:
                return
            time.sleep(1.0)
        raise TimeoutError(f"models not loaded after {timeout}s: {statuses}\n{self.output()[-4000:]}")

    def wait_all_compiled(self, timeout: float = 900.0) -> None:
        """Until every model has compiled all its step variants (the background compile after
        ready), for tests that time requests."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            cards = httpx.get(f"{self.url}/v1/models", timeout=5, verify=self.verify).json()["data"]
            if all(c.get("compiled") and c["compiled"]["variants"] == c["compiled"]["total"] for c in cards):
                return
            time.sleep(1.0)
        raise TimeoutError(f"step variants not compiled after {timeout}s\n{self.output()[-4000:]}")

    def stop(self, timeout: float = 120.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start(argv: list[str], log: Path, env: dict[str, str], port: int | None = None, ca: Path | None = None) -> Server:
    """``argv`` is the command without the port: ``[mrs-server, ...]`` or ``[mrs, serve, ...]``;
    ``ca``: the certificate, when ``argv`` serves TLS."""
    port = port or free_port()
    argv = [*argv, f"server.port={port}"] if argv[1:2] == ["serve"] else [argv[0], "--port", str(port), *argv[1:]]
    out = open(log, "w")
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    out.close()  # the child holds its own descriptor
    return Server(proc, port, log, ca)
