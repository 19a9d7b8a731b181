"""The on-disk cache of compiled steps (``mrs.engine.executable_cache``): a second start of
an engine loads its steps without tracing and generates the same tokens, the ones it needs
before ready read ahead of it (``mrs.engine.warm_start``); an executable that JAX read from
its own cache is never stored; entries are keyed by what shapes them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp

from mrs.engine import executable_cache
from mrs.quant import native

TESTS = Path(__file__).parent

# Three engine starts in one fresh process (JAX's cache in the test's folder), each with
# steps of its own (nothing compiled in memory carries over): the cache filled, the cache
# read, and the cache emptied while JAX's still holds the steps. Each start reports what
# it traced (the insert step too), the greedy tokens, the entries stored, those read ahead
# of the engine (noted by the start before) and those read ahead but never taken.
STARTS = textwrap.dedent("""
    import json, pathlib, sys
    from tiny_llama import BOS, tiny_llama
    from mrs.config.schema import EngineConfig
    from mrs.engine import executable_cache, placed, warm_start
    from mrs.engine.engine import Engine
    from mrs.engine.types import GenerationRequest, SamplingParams

    checkpoint = tiny_llama(layers=1)[0]
    config = EngineConfig(max_batch=2, max_seq_len=64, prefill_buckets=[16], compile_in_background=False)
    folder = pathlib.Path(sys.argv[1]) / executable_cache.FOLDER

    def start():
        placed._shared_steps.cache_clear()
        warm_start.read_ahead("tiny")
        read_ahead = len(executable_cache._prefetched)
        engine = Engine(checkpoint, config, warm_start_key="tiny").start()
        traced = dict(engine._steps.traces)
        request = GenerationRequest([BOS, 5, 6, 7], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
        tokens = [t for event in engine.submit(request) for t in getattr(event, "token_ids", [])]
        engine.shutdown()
        return {"traced": traced, "tokens": tokens, "stored": len(list(folder.rglob("*.bin"))),
                "read_ahead": read_ahead, "untaken": len(executable_cache._prefetched)}

    starts = [start(), start()]
    for entry in folder.rglob("*.bin"):
        entry.unlink()
    starts.append(start())
    print(json.dumps(starts))
""")


def test_a_restart_loads_the_steps_without_tracing(tmp_path) -> None:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(TESTS),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # JAX's cache keeps every step too
    done = subprocess.run([sys.executable, "-c", STARTS, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    filled, read, beside_jax = json.loads(done.stdout.strip().splitlines()[-1])
    assert filled["traced"] and filled["stored"] == sum(filled["traced"].values())
    # Read ahead: what the engine used before ready, here every step (nothing compiles in the background).
    assert read == {"traced": {}, "tokens": filled["tokens"], "stored": filled["stored"],
                    "read_ahead": filled["stored"], "untaken": 0}
    assert filled["read_ahead"] == 0 and len(filled["tokens"]) == 6
    # Read from JAX's cache, a step cannot be serialized again whole: nothing is stored.
    assert beside_jax["traced"] and beside_jax["tokens"] == filled["tokens"] and beside_jax["stored"] == 0
    # Its entries were read ahead from files since deleted: the steps compiled instead.
    assert beside_jax["read_ahead"] == filled["stored"] and beside_jax["untaken"] == 0


def test_an_entry_is_keyed_by_what_shapes_the_step(tmp_path, monkeypatch) -> None:
    def key(fingerprint: str = "a", shape: tuple[int, ...] = (4,), scale: int = 2) -> str | None:
        args = (jax.ShapeDtypeStruct(shape, jnp.float32),)
        return executable_cache.key(fingerprint, args, {"scale": scale}, frozenset({"scale"}))

    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        assert key() is None  # no cache directory: nothing cached
        jax.config.update("jax_compilation_cache_dir", str(tmp_path))
        assert key() == key() and key() is not None
        assert len({key(), key("b"), key(shape=(8,)), key(scale=3)}) == 4
        with_kernels = key()
        flipped = not native.available()
        monkeypatch.setattr(native, "available", lambda: flipped)
        assert key() != with_kernels
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


def test_only_the_most_recently_used_versions_are_kept(tmp_path) -> None:
    for age, name in enumerate("abcde"):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1_000_000 - age * 1000, 1_000_000 - age * 1000))
    executable_cache._prune(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"][: executable_cache.KEPT_VERSIONS]


def test_a_versioned_step_keeps_its_signature_and_names_the_version() -> None:
    def _decode(params, state, *, kv_len: int):
        return state + kv_len

    jitted = jax.jit(executable_cache.versioned(_decode), donate_argnums=(1,), static_argnames=("kv_len",))
    assert float(jitted(None, jnp.ones(()), kv_len=2)) == 3.0
    assert f"_decode_{executable_cache._source_digest()}" in jitted.lower(None, jnp.ones(()), kv_len=2).as_text()
