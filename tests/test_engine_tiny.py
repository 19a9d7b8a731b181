"""The engine on a tiny random Llama: parity with HF transformers, continuous
batching invariance, seeds, stops, logprobs, cancellation, errors, no recompiles."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import jax
import jax.monitoring
import numpy as np
import pytest
import torch
from tiny_llama import BOS, tiny_llama

from mrs.config.schema import EngineConfig
from mrs.engine.engine import Engine
from mrs.engine.types import Finish, GenerationRequest, SamplingParams, TokenDelta
from mrs.errors import ContextLengthExceeded, InvalidRequest, Overloaded
from mrs.quant import native, param_bytes

# Every compiled variant stays in memory: the tests that check which variant runs must not
# depend on how long the module has run (an idle variant leaves otherwise).
CONFIG = EngineConfig(max_batch=16, max_seq_len=128, max_queue=64, prefill_buckets=[16, 64], variant_idle_s=None)


@pytest.fixture(scope="module")
def tiny():
    return tiny_llama()


@pytest.fixture(scope="module")
def engine(tiny):
    engine = Engine(tiny[0], CONFIG).start()
    assert engine.wait_compiled(600)  # every variant, not only the largest it serves with first
    yield engine
    engine.shutdown()


def prompt(n: int, seed: int = 0) -> list[int]:
    return [BOS] + np.random.default_rng(seed).integers(0, 256, n - 1).tolist()


def run(engine: Engine, ids: list[int], **sampling) -> tuple[list[int], list, Finish]:
    tokens, deltas, finish = [], [], None
    for event in engine.submit(GenerationRequest(ids, SamplingParams(**sampling))):
        if isinstance(event, TokenDelta):
            tokens += event.token_ids
            deltas.append(event)
        else:
            finish = event
    return tokens, deltas, finish


def run_many(engine: Engine, requests: list[GenerationRequest]) -> list[list[int]]:
    """Submit all at once (they share decode steps) and collect each one's tokens."""

    async def collect(stream):
        return [t async for e in stream if isinstance(e, TokenDelta) for t in e.token_ids]

    async def main():
        streams = [engine.submit(r) for r in requests]
        return await asyncio.gather(*(collect(s) for s in streams))

    return asyncio.run(main())


def hf_greedy(reference, ids: list[int], steps: int) -> tuple[list[int], np.ndarray]:
    """HF transformers' greedy continuation and the log-softmax at each step."""
    with torch.no_grad():
        # An explicit mask: with pad_token_id 0, generate would mask out every 0 in a random prompt.
        out = reference.generate(
            torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
            max_new_tokens=steps, do_sample=False, output_scores=False,
            output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )
    logits = torch.stack(out.logits, 1)[0].float()
    return out.sequences[0, len(ids):].tolist(), torch.log_softmax(logits, -1).numpy()


def test_greedy_tokens_and_logprobs_equal_hf_transformers(engine, tiny) -> None:
    ids = prompt(21, seed=3)
    expected, ref_logprobs = hf_greedy(tiny[1], ids, 24)
    tokens, deltas, finish = run(engine, ids, temperature=0.0, max_tokens=24, ignore_eos=True,
                                 logprobs=True, top_logprobs=5)
    assert tokens == expected
    assert finish.reason == "length" and finish.usage.completion_tokens == 24
    logprobs = [lp for d in deltas for lp in d.logprobs]
    chosen = np.array([lp.logprob for lp in logprobs])
    np.testing.assert_allclose(chosen, ref_logprobs[np.arange(24), expected], atol=2e-4)
    for step, lp in enumerate(logprobs):
        top = np.argsort(-ref_logprobs[step])[:5]
        assert [t for t, _, _ in lp.top] == top.tolist()
        np.testing.assert_allclose([v for _, _, v in lp.top], ref_logprobs[step][top], atol=2e-4)


def test_batch_invariance_and_chunked_prompts(engine, tiny) -> None:
    target = prompt(21, seed=3)
    alone, _, _ = run(engine, target, temperature=0.0, max_tokens=24, ignore_eos=True)
    # 15 neighbours with other lengths, one longer than the largest prefill bucket (chunked)
    lengths = [3, 9, 17, 30, 64, 65, 100, 5, 12, 40, 7, 2, 50, 33, 11]
    others = [GenerationRequest(prompt(n, seed=10 + i), SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
              for i, n in enumerate(lengths)]
    mine = GenerationRequest(target, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))
    results = run_many(engine, others[:7] + [mine] + others[7:])
    assert results[7] == alone
    # the chunked 100-token prompt continues exactly like HF transformers
    expected, _ = hf_greedy(tiny[1], others[6].prompt_ids, 24)
    assert results[6] == expected


def test_seeded_sampling_same_across_batch_compositions(engine) -> None:
    ids = prompt(13, seed=5)
    params = dict(temperature=1.0, top_p=0.95, seed=4242, max_tokens=20, ignore_eos=True)
    alone, _, _ = run(engine, ids, **params)
    crowd = [GenerationRequest(prompt(n, seed=n), SamplingParams(temperature=0.8, top_k=7, max_tokens=20))
             for n in (4, 30, 70)]
    results = run_many(engine, crowd[:2] + [GenerationRequest(ids, SamplingParams(**params))] + crowd[2:])
    assert results[2] == alone
    other_seed, _, _ = run(engine, ids, **{**params, "seed": 4243})
    assert other_seed != alone


def test_several_tokens_per_decode_call_equal_one_per_call(engine, tiny) -> None:
    """The module's engine makes up to 4 tokens per decode call (the default decode_steps):
    the same tokens and logprobs as calls of one, where requests end mid-call (a stop
    string, max_tokens that 4 does not divide) and penalties count each token."""
    one = Engine(tiny[0], dataclasses.replace(CONFIG, max_batch=4, decode_steps=1, warmup=False)).start()
    try:
        ids = prompt(11, seed=8)
        # (first: a call dispatched before its request's last token was seen ends after it)
        before = engine.stats()
        run(engine, ids, temperature=0.0, max_tokens=17, ignore_eos=True)  # the prefill's token, then 16
        after = engine.stats()
        assert after["decode_calls"] - before["decode_calls"] == 4
        assert after["decode_steps"] - before["decode_steps"] == 16
        tok = tiny[0].tokenizer
        letters = {tok.convert_tokens_to_ids(c): 100.0 for c in "abcdefghijklmnopqrstuvwxyz"}  # printable output
        printable = dict(temperature=0.0, max_tokens=14, ignore_eos=True, logit_bias=letters)
        text, _, _ = run(one, ids, **printable)
        requests = [
            dict(temperature=0.0, max_tokens=23, ignore_eos=True, logprobs=True, top_logprobs=3),
            dict(temperature=0.9, seed=7, max_tokens=18, frequency_penalty=0.5, presence_penalty=0.3, ignore_eos=True),
            printable | {"stop": [tok.decode(text[6:9])]},  # ends mid-call: after the 6th token
            printable | {"stop_token_ids": [text[9]]},
        ]
        for sampling in requests:
            (want, want_deltas, want_end), (got, got_deltas, got_end) = (run(e, ids, **sampling) for e in (one, engine))
            assert got == want and got_end.reason == want_end.reason, sampling
            assert "".join(d.text for d in got_deltas) == "".join(d.text for d in want_deltas)
            if sampling.get("logprobs"):
                np.testing.assert_allclose([lp.logprob for d in got_deltas for lp in d.logprobs],
                                           [lp.logprob for d in want_deltas for lp in d.logprobs], atol=1e-6)
    finally:
        one.shutdown()


def test_top_k_one_equals_greedy(engine) -> None:
    ids = prompt(10, seed=6)
    greedy, _, _ = run(engine, ids, temperature=0.0, max_tokens=16, ignore_eos=True)
    top1, _, _ = run(engine, ids, temperature=1.5, top_k=1, seed=1, max_tokens=16, ignore_eos=True)
    assert top1 == greedy


def test_stop_strings_and_stop_tokens(engine, tiny) -> None:
    ids = prompt(10, seed=8)
    tok = tiny[0].tokenizer
    letters = {tok.convert_tokens_to_ids(c): 100.0 for c in "abcdefghijklmnopqrstuvwxyz"}  # printable output
    params = dict(temperature=0.0, max_tokens=30, ignore_eos=True, logit_bias=letters)
    tokens, deltas, _ = run(engine, ids, **params)
    text = "".join(d.text for d in deltas)
    # a stop string built from the output's own bytes 4..7 (spans four byte tokens)
    stop = tok.decode(tokens[4:8])
    assert len(stop) == 4 and stop.isalpha()
    _, deltas, finish = run(engine, ids, **params, stop=[stop])
    assert finish.reason == "stop"
    assert "".join(d.text for d in deltas) == text[: text.index(stop)]
    # a stop token id ends generation at its first occurrence (excluded from text)
    stop_id = tokens[5]
    stopped, deltas, finish = run(engine, ids, **params | {"stop_token_ids": [stop_id]})
    assert finish.reason == "stop" and stopped == tokens[: tokens.index(stop_id) + 1]


def test_n_parallel_samples(engine) -> None:
    events = list(engine.submit(GenerationRequest(prompt(8, seed=9), SamplingParams(n=3, seed=11, max_tokens=12, ignore_eos=True))))
    finishes = [e for e in events if isinstance(e, Finish)]
    assert sorted(f.index for f in finishes) == [0, 1, 2]
    per_choice = [[t for e in events if isinstance(e, TokenDelta) and e.index == i for t in e.token_ids] for i in range(3)]
    assert all(len(c) == 12 for c in per_choice)
    assert len({tuple(c) for c in per_choice}) == 3  # independent samples


def test_cancellation_frees_the_slot(engine) -> None:
    request = GenerationRequest(prompt(8), SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True))
    stream = engine.submit(request)
    events = iter(stream)
    first = next(events)
    assert isinstance(first, TokenDelta)
    engine.cancel(request.request_id)
    rest = list(events)
    assert isinstance(rest[-1], Finish) and rest[-1].reason == "cancelled"
    assert rest[-1].usage.completion_tokens < 100
    deadline = time.time() + 5
    while engine.stats()["slots_busy"] and time.time() < deadline:
        time.sleep(0.01)
    assert engine.stats()["slots_busy"] == 0


def test_bad_requests_raise_before_queueing(engine) -> None:
    with pytest.raises(ContextLengthExceeded) as err:
        engine.submit(GenerationRequest(prompt(100), SamplingParams(max_tokens=40)))
    assert "128" in err.value.message and "100" in err.value.message and "40" in err.value.message
    with pytest.raises(ContextLengthExceeded):
        engine.submit(GenerationRequest(prompt(128)))
    with pytest.raises(InvalidRequest) as err:
        engine.submit(GenerationRequest([]))
    assert err.value.param == "prompt"
    for field, value in [("top_p", 0.0), ("temperature", -1.0), ("top_logprobs", 21), ("n", 17),
                         ("logit_bias", {999: 1.0}), ("max_tokens", 0)]:
        with pytest.raises(InvalidRequest) as err:
            engine.submit(GenerationRequest(prompt(5), SamplingParams(**{field: value})))
        assert err.value.param == field
    assert engine.stats()["queue_depth"] == 0


def test_queue_overflow_raises_overloaded(tiny) -> None:
    # not started: nothing drains the queue, so the bound is hit deterministically
    checkpoint = tiny[0]
    idle = Engine.from_parts(checkpoint.config, checkpoint.params, checkpoint.tokenizer, checkpoint.eos_token_ids,
                             EngineConfig(max_batch=2, max_seq_len=64, max_queue=2, prefill_buckets=[16]))
    idle.submit(GenerationRequest(prompt(5)))
    idle.submit(GenerationRequest(prompt(5)))
    with pytest.raises(Overloaded):
        idle.submit(GenerationRequest(prompt(5)))
    assert idle.stats()["queue_depth"] == 2


def test_engine_survives_failures_inside_steps(engine, monkeypatch) -> None:
    real_prefill, real_decode = engine._steps.prefill, engine._steps.decode
    calls = {"decode": 0}

    def failing_prefill(*args, **kwargs):
        raise RuntimeError("injected prefill failure")

    def failing_decode(*args, **kwargs):
        calls["decode"] += 1
        if calls["decode"] == 3:
            raise RuntimeError("injected decode failure")
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(engine._steps, "prefill", failing_prefill)
    _, _, finish = run(engine, prompt(6), max_tokens=5)
    assert finish.reason == "error" and "injected prefill" in str(finish.error)
    monkeypatch.setattr(engine._steps, "prefill", real_prefill)
    monkeypatch.setattr(engine._steps, "decode", failing_decode)
    _, _, finish = run(engine, prompt(6), max_tokens=10, ignore_eos=True)
    assert finish.reason == "error" and "injected decode" in str(finish.error)
    monkeypatch.setattr(engine._steps, "decode", real_decode)
    # the engine is still serving, with correct output
    ids = prompt(21, seed=3)
    tokens, _, finish = run(engine, ids, temperature=0.0, max_tokens=8, ignore_eos=True)
    assert finish.reason == "length" and len(tokens) == 8 and engine.healthy


def test_no_recompile_after_warmup(engine, monkeypatch) -> None:
    """Nothing traces, lowers or compiles again: the warm-up compiles without running, and
    a real call must find those executables (JAX's caches no longer hold them)."""
    jitted: list[str] = []
    for name in ("prefill", "decode"):
        step = getattr(engine._steps, name)
        monkeypatch.setattr(step, "_jitted", lambda *a, _real=step._jitted, _name=name, **k: jitted.append(_name) or _real(*a, **k))
    compiled: list[str] = []
    work = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _seconds, **_: compiled.append(event) if event in work else None)
    before = dict(engine._steps.traces)
    for n in (4, 15, 16, 17, 63, 64, 65, 127):  # new lengths in every known bucket, and chunked
        run(engine, prompt(n, seed=n), temperature=0.7, top_k=3, seed=n, max_tokens=1 if n == 127 else 3,
            presence_penalty=0.5, logit_bias={5: 2.0}, logprobs=True, top_logprobs=2,
            prompt_logprobs=1 if n in (17, 65) else None)  # scoring runs in its largest prefill, warmed up too
    assert dict(engine._steps.traces) == before
    assert compiled == [] and jitted == []
    stats = engine.stats()
    assert stats["tokens_generated"] > 0


def test_decode_variants_follow_the_attention_kernel(tiny, monkeypatch) -> None:
    """Decode compiles one attention length per batch bucket where its kernel reads each
    sequence's length at run time (the native CPU kernel); every attention bucket where
    XLA's attention, whose cost follows the static length, runs instead."""
    config = dataclasses.replace(CONFIG, max_seq_len=512, warmup=False)

    def lengths(engine: Engine) -> set[int]:
        return {kwargs["kv_len"] for step, _, kwargs in sum(engine._variants(), []) if step == "decode"}

    kernel = Engine(tiny[0], config)
    assert kernel._kv_buckets == [256, 512]
    assert lengths(kernel) == {512} and kernel._decode_shape(5, 1) == (512, 1)
    monkeypatch.setattr(native, "available", lambda: False)
    xla = Engine(tiny[0], config)
    assert lengths(xla) == {256, 512} and xla._decode_shape(5, 1) == (256, 1)


def test_serving_before_the_background_compile_runs_the_largest_variants(engine, tiny) -> None:
    """An engine whose background compile has not run yet serves every kind of request in
    the largest variants (compiled before it reports ready) and answers as the fully
    compiled engine does. (Engines of one shape share their jitted steps, so traces cannot
    tell which variants ran: the shape choices are checked instead.)"""
    early = Engine(tiny[0], CONFIG)
    early._compiler.stop()  # as if the background compile had not reached any other variant
    early.start()
    try:
        stats = early.stats()
        assert stats["variants_compiled"] == 3 < stats["variants_total"] == engine.stats()["variants_total"]
        assert engine.stats()["variants_compiled"] == engine.stats()["variants_total"]
        top_kv, top_rows = early._kv_buckets[-1], CONFIG.max_batch
        for start, length, scored in ((0, 16, False), (64, 64, False), (0, 16, True)):
            assert early._prefill_shape(start, length, scored, False) == (CONFIG.prefill_buckets[-1], top_kv)
        assert engine._prefill_shape(0, 16, False, False) == (16, 16)
        assert early._decode_shape(5, 1) == (top_kv, top_rows) and engine._decode_shape(5, 1) == (top_kv, 1)
        for n in (4, 17, 65, 120):  # one chunk of every bucket, and chunked
            sampling = dict(temperature=0.0, max_tokens=4, logprobs=True, prompt_logprobs=1 if n == 17 else None)
            got, want = run(early, prompt(n, seed=n), **sampling), run(engine, prompt(n, seed=n), **sampling)
            assert got[0] == want[0]
            np.testing.assert_allclose([lp.logprob for d in got[1] for lp in d.logprobs],
                                       [lp.logprob for d in want[1] for lp in d.logprobs], atol=1e-4)
        requests = [GenerationRequest(prompt(n, seed=n), SamplingParams(temperature=0.8, seed=n, max_tokens=6))
                    for n in (3, 9, 30, 50, 70)]
        assert run_many(early, requests) == run_many(engine, requests)
    finally:
        early.shutdown()


def _until(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.05)
    return condition()


def test_idle_step_variants_leave_memory_and_come_back_without_tracing(engine, tiny) -> None:
    """A variant not run for ``variant_idle_s`` is dropped (the executable cache holds it;
    the largest stay); a request that wants it runs in a larger one while it loads again,
    with the same tokens, and nothing traces. A variant that another engine of the same
    shape holds stays in memory."""
    config = dataclasses.replace(CONFIG, max_batch=4, max_seq_len=64, prefill_buckets=[16, 32],
                                 compile_in_background=False, variant_idle_s=3.0)
    idle, shared = Engine(tiny[0], config).start(), None
    try:
        executables = idle._steps.decode._executables
        total, pinned = idle.stats()["variants_total"], 3  # the largest decode, prefill and scored prefill
        small, largest = idle._decode_shape(5, 1), (idle._decode_kv_buckets[-1], idle._batch_buckets[-1])
        assert idle.stats()["variants_in_memory"] == total == len(idle._steps.prefill._executables) + len(executables)
        before = dict(idle._steps.traces)
        ids, sampling = prompt(5, seed=1), dict(temperature=0.0, max_tokens=6, ignore_eos=True)
        first = run(idle, ids, **sampling)[0]
        assert _until(lambda: idle.stats()["variants_in_memory"] == pinned)
        assert len(executables) == 1 and idle._decode_shape(5, 1) == largest != small  # wanted: it loads
        assert run(idle, ids, **sampling)[0] == first
        assert _until(lambda: idle._compiler.ready(("decode", *small)))
        assert idle._decode_shape(5, 1) == small and idle.stats()["variants_loaded_again"] >= 1
        assert run(idle, ids, **sampling)[0] == first
        assert dict(idle._steps.traces) == before

        shared = Engine(tiny[0], dataclasses.replace(CONFIG, variant_idle_s=0.5)).start()  # engine's shape
        assert _until(lambda: shared.stats()["variants_in_memory"] == pinned)
        assert len(engine._steps.prefill._executables) + len(engine._steps.decode._executables) == \
            engine.stats()["variants_total"]  # the fixture engine still holds them all
        traces = dict(engine._steps.traces)
        assert run(engine, prompt(20, seed=2), **sampling)[0] == run(shared, prompt(20, seed=2), **sampling)[0]
        assert dict(engine._steps.traces) == traces
    finally:
        idle.shutdown()
        if shared is not None:
            shared.shutdown()


def test_memory_measured_from_device_arrays(engine, tiny) -> None:
    stats, config = engine.stats(), tiny[0].config
    assert stats["param_bytes"] == param_bytes(tiny[0].params) > 0
    # one (k, v) pair per layer, every slot holding the whole context, float32
    kv = config.num_layers * 2 * CONFIG.max_batch * engine.context_limit * config.num_kv_heads * config.head_dim * 4
    assert stats["kv_cache_bytes"] == kv


def test_prompt_logprobs_equal_hf_transformers(engine, tiny) -> None:
    """Echo with logprobs: every prompt token scored given the ones before it, across chunks."""
    ids = prompt(100, seed=21)  # two chunks of the largest prefill bucket (64)
    with torch.no_grad():
        reference = torch.log_softmax(tiny[1](torch.tensor([ids])).logits[0].float(), -1).numpy()
    _, deltas, _ = run(engine, ids, temperature=0.0, max_tokens=2, prompt_logprobs=3)
    scored = deltas[0].prompt_logprobs
    assert [t.token_id for t in scored] == ids and scored[0].logprob is None and scored[0].top == []
    expected = reference[np.arange(len(ids) - 1), ids[1:]]
    np.testing.assert_allclose([t.logprob for t in scored[1:]], expected, atol=2e-4)
    for position, item in enumerate(scored[1:]):
        assert [t for t, _, _ in item.top] == np.argsort(-reference[position])[:3].tolist()
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_a_failing_detokenizer_ends_only_its_request(engine, monkeypatch) -> None:
    """Fault injection: turning token POISON into text raises. The request forced onto it
    ends with an error; the one sharing its decode steps (banned from it) is untouched."""
    from mrs.engine.detokenizer import IncrementalDetokenizer

    poison, real_add = 7, IncrementalDetokenizer.add

    def add(self, token: int) -> str:
        if token == poison:
            raise UnicodeError("injected detokenizer failure")
        return real_add(self, token)

    def request(bias: float) -> GenerationRequest:
        return GenerationRequest(prompt(12, seed=5), SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                                    logit_bias={poison: bias}))

    alone, _, _ = run(engine, request(-100.0).prompt_ids, temperature=0.0, max_tokens=12, ignore_eos=True,
                      logit_bias={poison: -100.0})
    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    victim, bystander = request(100.0), request(-100.0)

    async def events(stream) -> list:
        return [event async for event in stream]

    async def both():
        return await asyncio.gather(events(engine.submit(victim)), events(engine.submit(bystander)))

    victim_events, bystander_events = asyncio.run(both())
    assert victim_events[-1].reason == "error" and "injected detokenizer" in str(victim_events[-1].error)
    assert bystander_events[-1].reason == "length"
    assert [t for e in bystander_events if isinstance(e, TokenDelta) for t in e.token_ids] == alone
    monkeypatch.setattr(IncrementalDetokenizer, "add", real_add)
    assert not engine._scheduler.has_requests  # nothing of either request is left behind (forgotten before its last event)
    stats = engine.stats()
    assert stats["slots_busy"] == 0 and stats["queue_depth"] == 0 and engine.healthy


def test_a_queue_longer_than_the_slots_drains_without_new_submits(tiny) -> None:
    """Requests that finish in a step's collection free their slots after that iteration's
    admission; the engine must then admit the waiting ones instead of sleeping until the next
    submit (it used to: 20 requests on 2 slots stopped after 4)."""
    checkpoint = tiny[0]
    small = Engine.from_parts(checkpoint.config, checkpoint.params, checkpoint.tokenizer, checkpoint.eos_token_ids,
                              EngineConfig(max_batch=2, max_seq_len=64, prefill_buckets=[16], variant_idle_s=None)).start()
    try:
        requests = [GenerationRequest(prompt(6, seed=i), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
                    for i in range(20)]

        async def all_of_them():
            return await asyncio.wait_for(asyncio.gather(*(events(small.submit(r)) for r in requests)), 60)

        async def events(stream) -> list:
            return [event async for event in stream]

        finished = asyncio.run(all_of_them())
        assert [e[-1].reason for e in finished] == ["length"] * 20
    finally:
        small.shutdown()


def test_warm_up_logs_its_progress(tiny, caplog) -> None:
    """Minutes of compiling on a slow machine must not be silent: the last progress line
    counts every step variant (the insert step is compiled before them)."""
    checkpoint = tiny[0]
    with caplog.at_level("INFO", logger="mrs.engine"):
        small = Engine.from_parts(checkpoint.config, checkpoint.params, checkpoint.tokenizer, checkpoint.eos_token_ids,
                                  EngineConfig(max_batch=2, max_seq_len=64, prefill_buckets=[16])).start()
        small.wait_compiled(600)  # the last line comes from the background compile
    small.shutdown()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("warm-up of in-memory parameters")]
    # Compiled or loaded from the executable cache (a loaded variant is never traced).
    variants = len(small._steps.prefill._executables) + len(small._steps.decode._executables)
    assert lines and lines[-1].startswith(f"warm-up of in-memory parameters: {variants}/{variants} step variants")
