"""The paged KV cache: the host's page bookkeeping (no model), and the engine on a tiny
random Llama with pools small enough that sequences span many pages and must queue."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
from test_engine_tiny import hf_greedy, prompt, run
from tiny_llama import tiny_llama

from mrs.config.schema import EngineConfig
from mrs.config.validate import check_kv_cache
from mrs.engine.engine import Engine
from mrs.engine.kv_pages import PagePool
from mrs.engine.types import Finish, GenerationRequest, SamplingParams, TokenDelta
from mrs.errors import ConfigError
from mrs.models.config import ModelConfig
from mrs.models.kv_cache import NO_PAGE, KVGeometry, geometry


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
                             **config})
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
            got = [d.logprobs[0].logprob for d in deltas]
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
        assert sorted(pool._free) == list(range(pool.geometry.pages)) and (pool.tables == NO_PAGE).all()
    finally:
        engine.shutdown()


def test_kv_settings_are_checked() -> None:
    for bad in (dict(kv_tokens=0), dict(kv_page_size=0), dict(kv_dtype="int8"), dict(kv_memory="lots")):
        with pytest.raises(ConfigError):
            check_kv_cache(EngineConfig(**bad))
