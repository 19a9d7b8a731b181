"""The scheduler without a model: queue order, KV admission, cancellation, decode plans."""

from __future__ import annotations

import pytest
from tiny_llama import byte_tokenizer

from mrs.engine.detokenizer import IncrementalDetokenizer
from mrs.engine.kv_pages import PagePool, prefix_hashes
from mrs.engine.scheduler import Request, Scheduler, Seq
from mrs.engine.stream import RequestStream
from mrs.engine.types import GenerationRequest, SamplingParams
from mrs.errors import InvalidRequest, ModelUnavailable, Overloaded
from mrs.models.kv_cache import KVGeometry

TOKENIZER = byte_tokenizer()


def _request(prompt_len: int, max_tokens: int, n: int = 1, names: bool = False, rid: str | None = None) -> Request:
    ids = list(range(prompt_len))
    request = GenerationRequest(ids, SamplingParams(n=n, max_tokens=max_tokens), **({"request_id": rid} if rid else {}))
    req = Request(request, RequestStream(request.request_id, n), frozenset(), seed=0,
                  page_names=prefix_hashes(ids, 8) if names else [])
    req.seqs = [Seq(req, i, max_tokens, IncrementalDetokenizer(TOKENIZER, ids, [])) for i in range(n)]
    return req


def _scheduler(slots: int = 2, pages: int = 8, max_queue: int = 4) -> Scheduler:
    return Scheduler(slots, max_queue, PagePool(KVGeometry(pages, 8, 64, "float32"), slots))


def _running(*reqs: Request) -> Scheduler:
    """Four slots and 16 pages of 8, ``reqs`` admitted in order."""
    scheduler = _scheduler(slots=4, pages=16)
    for req in reqs:
        scheduler.enqueue(req)
        scheduler.admitted(*scheduler.next_admission(), [])
    return scheduler


def test_first_come_first_served_waits_for_pages_without_being_overtaken() -> None:
    scheduler = _scheduler()
    big, small = _request(20, 20), _request(4, 4)  # 5 pages, then 1
    first = _request(30, 10)  # 5 pages
    for req in (first, big, small):
        scheduler.enqueue(req)
    seq, slot = scheduler.next_admission()
    assert seq is first.seqs[0] and slot == 0
    scheduler.admitted(seq, slot, [])
    assert scheduler.next_admission() is None  # big does not fit beside first, and small may not overtake it
    assert not scheduler.admissible() and scheduler.queue_depth == 2
    scheduler.finish(seq)
    assert scheduler.admissible()
    seq, slot = scheduler.next_admission()
    assert seq is big.seqs[0] and slot == 0


def test_queue_limits_duplicates_and_closing() -> None:
    scheduler = _scheduler(max_queue=2)
    scheduler.enqueue(_request(4, 4, rid="a"))
    with pytest.raises(InvalidRequest, match="already in flight"):
        scheduler.enqueue(_request(4, 4, rid="a"))
    scheduler.enqueue(_request(4, 4, n=3))  # one request, three choices: one place in the queue
    with pytest.raises(Overloaded):
        scheduler.enqueue(_request(4, 4))
    scheduler.close()
    with pytest.raises(ModelUnavailable):
        scheduler.enqueue(_request(4, 4, rid="b"))
    assert len(scheduler.drain()) == 2 and scheduler.queue_depth == 0


def test_cancelled_requests_leave_the_queue() -> None:
    scheduler = _scheduler()
    keep, drop = _request(4, 4), _request(4, 4, n=2)
    scheduler.enqueue(drop)
    scheduler.enqueue(keep)
    scheduler.cancel(drop.request.request_id)
    scheduler.cancel("nobody")
    assert scheduler.take_cancelled() == [drop] and scheduler.take_cancelled() == []
    seq, _ = scheduler.next_admission()
    assert seq is keep.seqs[0]


def test_decode_plans_grow_pages_and_skip_what_cannot_step() -> None:
    scheduler = _running(_request(7, 4), _request(16, 1), _request(3, 30))
    plan = scheduler.plan_decode()
    # max_tokens 1: its prefill's token was its last, so that slot does not step
    assert list(plan.steps) == [1, 0, 1, 0] and plan.rows == 3 and plan.longest == 8
    assert scheduler.pages.tables[0, 0] != scheduler.pages.tables[2, 0]
    assert plan.owners[1] is None and plan.constrained == []
    held = scheduler.pages.used
    plan = scheduler.plan_decode()  # position 8 of the first needs its second page
    assert scheduler.pages.used == held + 1 and plan.longest == 9


def test_several_tokens_per_decode_call_stop_at_max_tokens_and_wait_for_a_grammar() -> None:
    scheduler = _running(_request(7, 4), _request(16, 1), _request(3, 30))
    plan = scheduler.plan_decode(4)
    # 3 tokens left after the prefill's, none, 29: each makes what is left, at most 4
    assert list(plan.steps) == [3, 0, 4, 0] and plan.longest == 10
    assert [seq.dispatched for seq in scheduler.running()] == [3, 0, 4]
    assert scheduler.pages.used == 3  # 10 tokens on two pages of 8, 7 on one
    assert scheduler.plan_decode(4).steps.tolist() == [0, 0, 4, 0]  # the first is at its max_tokens
    scheduler.running()[2].constraint = object()  # a grammar: one token per call, for every slot
    scheduler.running()[2].generated = 9  # the host has seen all of its tokens
    assert scheduler.plan_decode(4).steps.tolist() == [0, 0, 1, 0]


def test_choices_share_the_prompt_pages_the_first_registered() -> None:
    scheduler = _scheduler(slots=2, pages=8)
    req = _request(20, 4, n=2, names=True)  # 2 full pages of 8
    scheduler.enqueue(req)
    first, slot = scheduler.next_admission()
    assert first.cached == 0
    scheduler.pages.grow(slot, 20)  # as its prefill does
    scheduler.admitted(first, slot, req.page_names)
    second, slot = scheduler.next_admission()
    scheduler.pages.grow(slot, 20)
    assert second.cached == 16 and scheduler.pages.used == 4  # 3 pages each, 2 of them shared
