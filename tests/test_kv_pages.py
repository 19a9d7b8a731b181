"""The paged KV cache: the host's page bookkeeping (no model), and the engine on a tiny
random Llama with pools small enough that sequences span many pages and must queue."""

from __future__ import annotations

import asyncio
import ctypes
import mmap
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine_tiny import hf_greedy, prompt, run, run_many
from tiny_llama import tiny_llama

from mrs.config.schema import EngineConfig
from mrs.config.validate import check_kv_cache
from mrs.engine.engine import Engine
from mrs.engine.kv_pages import PagePool, prefix_hashes
from mrs.engine.types import Finish, GenerationRequest, SamplingParams, TokenDelta
from mrs.errors import ConfigError
from mrs.models.config import ModelConfig
from mrs.models.kv_cache import NO_PAGE, KVGeometry, discard, geometry


def _held(pool: PagePool) -> list[int]:
    return [int(p) for p in pool.tables.ravel() if p != NO_PAGE]


def test_pages_are_reserved_grown_and_returned_exactly() -> None:
    pool = PagePool(KVGeometry(pages=10, page_size=4, context=16, dtype="float32"), slots=3)
    assert pool.fits(40) and not pool.fits(41)
    pool.reserve(0, 13)  # 4 pages promised, none taken yet
    assert pool.free == 6 and pool.used == 0
    pool.grow(0, 5)
    assert pool.used == 2 and pool.free == 6 and list(pool.tables[0, :2]) == [0, 1]
    pool.grow(0, 13)
    assert pool.used == 4 and pool.tables[0, 3] != NO_PAGE
    with pytest.raises(RuntimeError, match="past its reservation"):
        pool.grow(0, 17)
    with pytest.raises(RuntimeError, match="do not fit"):
        pool.reserve(1, 40)
    pool.reserve(1, 24)
    assert pool.free == 0 and not pool.fits(1)
    pool.release(0)
    assert pool.free == 4 and (pool.tables[0] == NO_PAGE).all()


def test_a_thousand_random_sequences_leak_no_page() -> None:
    rng = np.random.default_rng(0)
    geo = KVGeometry(pages=64, page_size=8, context=128, dtype="float32")
    pool, lengths = PagePool(geo, slots=8), {}
    for _ in range(1000):
        slot = int(rng.integers(8))
        if slot in lengths:
            pool.release(slot)
            del lengths[slot]
            continue
        budget = int(rng.integers(1, 129))
        if not pool.fits(budget):
            continue
        pool.reserve(slot, budget)
        lengths[slot] = budget
        pool.grow(slot, int(rng.integers(1, budget + 1)))
        held = _held(pool)
        assert len(held) == len(set(held)) == pool.used  # no page in two places
    for slot in list(lengths):
        pool.release(slot)
    assert pool.used == 0 and pool.free == geo.pages and sorted(pool._free) == list(range(geo.pages))


def test_prefix_pages_are_shared_kept_while_idle_and_reused_least_recent_first() -> None:
    pool = PagePool(KVGeometry(pages=6, page_size=4, context=24, dtype="float32"), slots=2)
    a, b = list(range(10)), list(range(9)) + [99]  # the same first two pages, then not
    names_a, names_b = prefix_hashes(a, 4), prefix_hashes(b, 4)
    assert len(names_a) == 2 and names_a[:2] == names_b[:2] and prefix_hashes(a[:8], 4) == names_a
    assert prefix_hashes([1, 0, 2, 3], 4) != prefix_hashes([0, 1, 2, 3], 4)
    assert pool.match(names_a, len(a)) == []
    pool.reserve(0, 12)
    pool.grow(0, 10)
    pool.register(0, names_a)
    assert pool.cached == 2 and pool.match(names_b, len(b)) == [0, 1]
    assert pool.match(names_a, 8) == [0]  # the prompt's last token is always prefilled
    shared = pool.match(names_b, len(b))
    assert pool.fits(17, shared) and not pool.fits(21, shared)  # 3 held, 3 free: 5 pages with the 2 shared fit
    pool.reserve(1, 12, shared)
    pool.grow(1, 10)
    assert list(pool.tables[1, :3]) == [0, 1, 3] and pool.used == 4
    pool.release(0)
    assert pool.used == 3 and pool.cached == 2  # pages 0 and 1 still held by slot 1
    pool.release(1)
    assert pool.used == 0 and pool.free == 6 and pool.cached == 2  # cached, idle, and counted free
    pool.reserve(0, 24)  # every page: the free ones first, then the cached ones, least recent first
    pool.grow(0, 16)
    assert pool.cached == 2
    pool.grow(0, 24)
    assert pool.cached == 0 and pool.match(names_a, len(a)) == []
    pool.release(0)
    assert pool.free == 6


def test_freed_pages_that_held_tokens_are_stale_until_their_memory_goes() -> None:
    pool = PagePool(KVGeometry(pages=6, page_size=4, context=24, dtype="float32"), slots=2)
    assert pool.resident == 0 and pool.take_stale() == []  # a new pool's memory is the OS's
    pool.reserve(0, 12)
    pool.grow(0, 12)
    pool.register(0, prefix_hashes(list(range(8)), 4))  # its first two pages stay cached
    assert pool.resident == 3
    pool.release(0)
    assert pool.resident == 3 and pool.take_stale() == [2] and pool.resident == 2 and pool.take_stale() == []
    pool.reserve(1, 24)
    pool.grow(1, 24)  # the four never used, then the two cached ones
    assert pool.resident == 6 and pool.take_stale() == []
    pool.release(1)
    assert pool.take_stale() == list(range(6)) and pool.resident == 0
    pool.reserve(0, 4)
    pool.grow(0, 4)
    with pytest.raises(RuntimeError, match="holds pages"):
        pool.unmap_all()
    pool.reset()
    assert pool.unmap_all() == list(range(6)) and pool.resident == 0 and pool.take_stale() == []


def _resident(array: jax.Array, page_bytes: int, page: int) -> np.ndarray:
    """mincore's answer for each whole OS page inside pool page ``page`` of ``array``'s buffer:
    whether it is in memory."""
    base = array.unsafe_buffer_pointer() + page * page_bytes
    start = -(-base // mmap.PAGESIZE) * mmap.PAGESIZE
    count = (base + page_bytes - start) // mmap.PAGESIZE
    vector = (ctypes.c_ubyte * count)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(start, count * mmap.PAGESIZE, vector) == 0, ctypes.get_errno()
    return np.frombuffer(vector, np.uint8) & 1 == 1


@pytest.mark.skipif(sys.platform != "linux", reason="madvise and mincore as Linux has them")
def test_discarded_pages_leave_memory_read_back_as_zeros_and_fill_again() -> None:
    pages, page_bytes = 64, 4 * 64 * 32 * 4  # 8 OS pages each
    cache = ((jnp.ones((pages, 4, 64, 32), jnp.float32), jnp.ones((pages, 4, 32, 64), jnp.float32)),)
    jax.block_until_ready(cache)
    assert discard(cache, [3, 4, 5, 10]) >= 2 * 4 * page_bytes - 2 * 2 * mmap.PAGESIZE  # less the unaligned ends
    k, v = cache[0]
    for pool in (k, v):
        assert not any(_resident(pool, page_bytes, page).any() for page in (3, 4, 5, 10))
        assert all(_resident(pool, page_bytes, page).all() for page in (0, 2, 6, 9, 11, 63))
        host = np.asarray(pool)
        assert (host[4] == 0).all() and (host[[3, 5, 10]].mean(axis=(1, 2, 3)) < 0.2).all()  # zeros but the unaligned ends
        assert (host[[0, 1, 2, 6, 9, 11, 63]] == 1).all()
    write = jax.jit(lambda pool: pool.at[4].set(2.0), donate_argnums=0)
    k = write(k)
    assert (np.asarray(k)[4] == 2).all() and _resident(k, page_bytes, 4).all()


def test_geometry_from_the_engine_config() -> None:
    model = ModelConfig(arch="llama", vocab_size=10, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=4096)
    geo = geometry(EngineConfig(max_batch=16, max_seq_len=2048), model)
    assert (geo.pages, geo.page_size, geo.context, geo.table_width) == (256, 32, 2048, 64)
    # never more than max_batch full contexts; a pool smaller than a context caps the context
    assert geometry(EngineConfig(max_batch=2, max_seq_len=100), model).tokens == 224
    assert geometry(EngineConfig(max_batch=4, max_seq_len=2048, kv_tokens=1000), model).context == 1024
    # 2 layers x (k, v) x 2 heads x 16 dims x 4 bytes = 512 bytes a token
    assert geometry(EngineConfig(kv_memory="64KiB"), model).tokens == 128
    assert geometry(EngineConfig(kv_memory="64KiB", kv_dtype="bfloat16"), model).tokens == 256


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


def _engine(tiny, **config) -> Engine:
    checkpoint = tiny[0]
    config = EngineConfig(**{"max_batch": 4, "max_seq_len": 128, "prefill_buckets": [16, 64], "warmup": False,
                             "variant_idle_s": None, **config})  # which variant runs must not depend on time
    return Engine.from_parts(checkpoint.config, checkpoint.params, checkpoint.tokenizer, checkpoint.eos_token_ids,
                             config).start()


def test_sequences_over_many_small_pages_equal_hf_transformers(tiny) -> None:
    engine = _engine(tiny, kv_page_size=4)
    try:
        for n in (7, 70):  # 70: a chunked prompt; both grow over page boundaries while decoding
            ids = prompt(n, seed=n)
            expected, ref_logprobs = hf_greedy(tiny[1], ids, 40)
            tokens, deltas, _ = run(engine, ids, temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=True)
            assert tokens == expected
            got = [lp.logprob for d in deltas for lp in d.logprobs]
            np.testing.assert_allclose(got, ref_logprobs[np.arange(40), expected], atol=2e-4)
        assert engine.stats()["kv_pages_used"] == 0
    finally:
        engine.shutdown()


def test_a_full_pool_queues_requests_instead_of_failing(tiny) -> None:
    """A pool that holds one request's budget at a time: four submitted together all finish,
    one after the other, with the tokens each gets alone."""
    engine = _engine(tiny, kv_tokens=64, kv_page_size=8)  # 8 pages; each request needs 5
    try:
        requests = [GenerationRequest(prompt(12, seed=i), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
                    for i in range(4)]
        alone = [run(engine, r.prompt_ids, temperature=0.0, max_tokens=24, ignore_eos=True)[0] for r in requests]

        async def timed(stream) -> list[tuple[float, object]]:
            return [(time.perf_counter(), event) async for event in stream]

        async def main():
            return await asyncio.gather(*(timed(engine.submit(r)) for r in requests))

        results = asyncio.run(main())
        for events, expected in zip(results, alone):
            assert [t for _, e in events if isinstance(e, TokenDelta) for t in e.token_ids] == expected
            assert isinstance(events[-1][1], Finish) and events[-1][1].reason == "length"
        spans = sorted((events[0][0], events[-1][0]) for events in results)
        assert all(later[0] >= earlier[1] for earlier, later in zip(spans, spans[1:]))  # never two at once
        stats = engine.stats()
        assert stats["kv_pages_used"] == 0 and stats["kv_pages_total"] == 8 and engine.context_limit == 64
    finally:
        engine.shutdown()


def test_a_thousand_requests_of_random_lengths_return_every_page(tiny) -> None:
    engine = _engine(tiny, kv_tokens=256, kv_page_size=8, max_queue=256)
    rng = np.random.default_rng(1)
    try:
        for batch in range(10):
            requests = [GenerationRequest(prompt(int(rng.integers(1, 60)), seed=batch * 100 + i),
                                          SamplingParams(temperature=1.0, seed=i, max_tokens=int(rng.integers(1, 9))))
                        for i in range(100)]

            async def main():
                async def drain(stream):
                    return [event async for event in stream][-1]

                return await asyncio.gather(*(drain(engine.submit(r)) for r in requests))

            finishes = asyncio.run(main())
            assert all(f.reason in ("stop", "length") for f in finishes)
        pool = engine._pages
        assert engine.stats()["kv_pages_used"] == 0
        # every page is free or cached with nobody holding it, and counted free
        assert sorted(pool._free + list(pool._idle)) == list(range(pool.geometry.pages))
        assert pool.free == pool.geometry.pages and (pool.tables == NO_PAGE).all()
        # once idle, the pool holds memory only for its cached pages
        page_bytes = engine.stats()["kv_cache_bytes"] // pool.geometry.pages
        deadline = time.monotonic() + 10
        while engine.stats()["kv_resident_bytes"] > pool.cached * page_bytes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert engine.stats()["kv_resident_bytes"] == pool.cached * page_bytes < engine.stats()["kv_cache_bytes"]
    finally:
        engine.shutdown()


def test_a_shared_prefix_prefills_once_and_answers_as_without_the_cache(tiny) -> None:
    cached, plain = _engine(tiny, kv_page_size=8), _engine(tiny, kv_page_size=8, prefix_cache=False)
    try:
        system = prompt(70, seed=5)
        questions = [system + prompt(12, seed=6 + i)[1:] for i in range(3)] + [system[:37] + [7, 7, 7]]
        sampling = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=True)
        first, _, finish = run(cached, questions[0], **sampling)
        assert finish.usage.cached_tokens == 0
        for ids in questions[1:]:
            tokens, deltas, finish = run(cached, ids, **sampling)
            want_tokens, want_deltas, want_finish = run(plain, ids, **sampling)
            assert tokens == want_tokens
            np.testing.assert_allclose([lp.logprob for d in deltas for lp in d.logprobs],
                                       [lp.logprob for d in want_deltas for lp in d.logprobs], atol=1e-5)
            common = next(i for i, (x, y) in enumerate(zip(ids, questions[0])) if x != y)
            assert finish.usage.cached_tokens == common // 8 * 8 > 0 and want_finish.usage.cached_tokens == 0
        # all at once: sharing pages while they decode side by side changes nobody's tokens
        requests = [GenerationRequest(ids, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
                    for ids in questions]
        assert run_many(cached, requests) == run_many(plain, requests)
        stats = cached.stats()
        assert stats["kv_pages_used"] == 0 and stats["kv_pages_cached"] > 0
    finally:
        cached.shutdown()
        plain.shutdown()


def test_cached_prefixes_and_short_continuations_compile_nothing_after_warm_up(tiny) -> None:
    """A prompt's rest after a cached prefix (or a long prompt's last chunk) runs in short
    continuation chunks (the second bucket, 32 here) when they pad fewer tokens than the
    largest chunk, warmed up for every attention length."""
    engine = _engine(tiny, kv_page_size=8, prefill_buckets=[16, 32, 128], warmup=True)
    plain = _engine(tiny, kv_page_size=8, prefill_buckets=[16, 32, 128], prefix_cache=False)
    try:
        assert engine.wait_compiled(600)
        before = dict(engine._steps.traces)
        base = prompt(100, seed=11)
        for ids in (base[:50], base[:60] + [1, 2], base + [3], base[:9] + prompt(90, seed=12), prompt(70, seed=13)):
            got = run(engine, ids, temperature=0.0, max_tokens=4, ignore_eos=True)
            assert got[0] == run(plain, ids, temperature=0.0, max_tokens=4, ignore_eos=True)[0]
        assert got[2].usage.cached_tokens == 0
        chunks = []  # (start, tokens, padded length) of each prefill chunk
        real = engine._prefill_chunk
        engine._prefill_chunk = lambda slot, chunk, start, length, *rest: (
            chunks.append((start, len(chunk), length)) or real(slot, chunk, start, length, *rest))
        ids = base[:40] + prompt(45, seed=14)[1:]  # 40 cached, 44 to go: two short chunks, not the 128 one
        got = run(engine, ids, temperature=0.0, max_tokens=4, ignore_eos=True)
        assert got[0] == run(plain, ids, temperature=0.0, max_tokens=4, ignore_eos=True)[0]
        assert got[2].usage.cached_tokens == 40 and chunks == [(40, 32, 32), (72, 12, 32)]
        # Nothing traced while running: the short continuation's variant (32 tokens attending
        # 128 rows) was ready from the warm-up, compiled or loaded from the executable cache.
        assert dict(engine._steps.traces) == before
    finally:
        engine.shutdown()
        plain.shutdown()


def test_a_bfloat16_cache_halves_the_pool_and_still_decodes(tiny) -> None:
    half, full = _engine(tiny, kv_dtype="bfloat16"), _engine(tiny)
    try:
        assert half.stats()["kv_cache_bytes"] * 2 == full.stats()["kv_cache_bytes"] > 0
        ids = prompt(30, seed=4)
        tokens, deltas, _ = run(half, ids, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True)
        want, want_deltas, _ = run(full, ids, temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=True)
        assert tokens == want  # the tiny model's logits are peaked: bfloat16 keys and values keep its choices
        np.testing.assert_allclose([lp.logprob for d in deltas for lp in d.logprobs],
                                   [lp.logprob for d in want_deltas for lp in d.logprobs], atol=0.05)
    finally:
        half.shutdown()
        full.shutdown()


def test_n_choices_share_their_prompt(tiny) -> None:
    engine = _engine(tiny, kv_page_size=8)
    try:
        ids = prompt(40, seed=9)
        events = list(engine.submit(GenerationRequest(ids, SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=4))))
        finishes = sorted((e for e in events if isinstance(e, Finish)), key=lambda f: f.index)
        assert [f.usage.cached_tokens for f in finishes] == [0, 32, 32]
    finally:
        engine.shutdown()


def test_kv_settings_are_checked() -> None:
    for bad in (dict(kv_tokens=0), dict(kv_page_size=0), dict(kv_dtype="int8"), dict(kv_memory="lots")):
        with pytest.raises(ConfigError):
            check_kv_cache(EngineConfig(**bad))
