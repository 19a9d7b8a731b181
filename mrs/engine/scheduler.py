"""Which sequence runs where: the waiting queue, the decode slots and their KV pages.

Plain Python, no device work, testable without a model. The engine thread asks it what to
prefill next (``next_admission``) and which slots the next decode step runs (``plan_decode``)
and tells it when a sequence ends (``finish``); ``submit`` and ``cancel`` on other threads go
through its lock.

Policy: first come, first served. The head of the queue takes the lowest free slot once the
KV pool can promise its whole budget (``mrs.engine.kv_pages``); until then nobody overtakes
it. A constrained sequence (a grammar) is not stepped while its previous token is in flight:
its next token mask depends on that token.
"""

from __future__ import annotations

import collections
import threading
from dataclasses import dataclass, field

import numpy as np

from mrs.engine.detokenizer import IncrementalDetokenizer
from mrs.engine.grammar import Constraint
from mrs.engine.image_plan import Span
from mrs.engine.kv_pages import PagePool
from mrs.engine.stream import RequestStream
from mrs.engine.types import GenerationRequest, TokenLogprob
from mrs.errors import InvalidRequest, ModelUnavailable, Overloaded


@dataclass(eq=False)
class Request:
    request: GenerationRequest
    stream: RequestStream
    stop_ids: frozenset[int]
    seed: int
    spans: list[Span] = field(default_factory=list)  # its images' placeholder positions
    features: np.ndarray | None = None  # its images' encoder output, once its first choice prefills
    # Its prompt's full pages' names in the prefix cache; empty when it takes no part.
    page_names: list[bytes] = field(default_factory=list)
    seqs: list["Seq"] = field(default_factory=list)
    cancelled: bool = False


@dataclass(eq=False)
class Seq:
    """One of a request's ``n`` choices; owns a slot while it runs."""

    req: Request
    index: int
    max_tokens: int
    detok: IncrementalDetokenizer
    constraint: Constraint | None = None  # the request's grammar, this choice's state
    prompt_logprobs: list[TokenLogprob] | None = None  # scored at prefill; sent with the first token
    slot: int | None = None
    cached: int = 0  # prompt tokens whose KV came from the prefix cache
    generated: int = 0  # tokens seen on the host
    dispatched: int = 0  # decode steps dispatched after the prefill
    done: bool = False

    @property
    def prompt_len(self) -> int:
        return len(self.req.request.prompt_ids)

    @property
    def budget(self) -> int:
        """The most tokens it can hold in the KV cache: its prompt and every token it may sample."""
        return self.prompt_len + self.max_tokens

    @property
    def in_flight(self) -> bool:
        """A sampled token the host has not seen yet (the prefill's, or a dispatched step's)."""
        return self.generated < 1 + self.dispatched


@dataclass
class DecodePlan:
    """The slots one decode step runs."""

    steps: np.ndarray  # int32 [max_batch]: the tokens each slot makes (0: idle)
    owners: list[Seq | None]  # the sequence behind each active slot
    constrained: list[tuple[int, Seq]]  # (slot, sequence) with a grammar
    rows: int  # slots up to the highest active one
    longest: int  # tokens the longest active sequence holds after the step


class Scheduler:
    def __init__(self, max_batch: int, max_queue: int, pages: PagePool) -> None:
        self.pages = pages
        self.slots: list[Seq | None] = [None] * max_batch
        self._max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting: collections.deque[Seq] = collections.deque()
        self._requests: dict[str, Request] = {}
        self._cancels: set[str] = set()
        self._closed = False

    # ---- any thread ---------------------------------------------------------------------

    def enqueue(self, req: Request) -> None:
        """Queue ``req``'s choices; raises and queues nothing when closed, a duplicate or full."""
        with self._lock:
            if self._closed:
                raise ModelUnavailable("the engine is not running")
            if req.request.request_id in self._requests:
                raise InvalidRequest(f"request id {req.request.request_id!r} is already in flight", param="request_id")
            if self._queue_depth() >= self._max_queue:
                raise Overloaded(f"the queue is full ({self._max_queue} requests waiting); retry later")
            self._requests[req.request.request_id] = req
            self._waiting.extend(req.seqs)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._cancels.add(request_id)

    def close(self) -> None:
        """Refuse new requests from now on."""
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        with self._lock:
            return self._closed

    @property
    def queue_depth(self) -> int:
        with self._lock:
            return self._queue_depth()

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.slots)

    @property
    def has_requests(self) -> bool:
        """Whether any request is queued or running."""
        with self._lock:
            return bool(self._requests)

    # ---- the engine thread --------------------------------------------------------------

    def take_cancelled(self) -> list[Request]:
        """The requests cancelled since the last call (their waiting choices leave the queue)."""
        with self._lock:
            ids, self._cancels = self._cancels, set()
            reqs = [self._requests[i] for i in ids if i in self._requests]
            if reqs:
                self._waiting = collections.deque(s for s in self._waiting if s.req not in reqs)
        return reqs

    def next_admission(self) -> tuple[Seq, int] | None:
        """The next sequence to prefill and its slot, with its KV pages reserved (the prefix
        cache's shared ones given, ``seq.cached`` set); None when no slot is free, nobody
        waits, or the head's budget does not fit the pool yet."""
        while True:
            free = next((i for i, s in enumerate(self.slots) if s is None), None)
            with self._lock:
                if free is None or not self._waiting:
                    return None
                seq = self._waiting[0]
                shared = self.pages.match(seq.req.page_names, seq.prompt_len)
                if not seq.done and not self.pages.fits(seq.budget, shared):
                    return None
                self._waiting.popleft()
            if seq.done:
                continue
            self.pages.reserve(free, seq.budget, shared)
            seq.cached = len(shared) * self.pages.geometry.page_size
            return seq, free

    def admitted(self, seq: Seq, slot: int, names: list[bytes]) -> None:
        """``seq``'s prompt is prefilled (dispatched) in ``slot``: it runs, and its full prompt
        pages join the prefix cache (later prefills run after this one on the device)."""
        seq.slot = slot
        self.slots[slot] = seq
        self.pages.register(slot, names)

    def admissible(self) -> bool:
        """Someone waits, a slot is free and the head's budget fits: the engine must not sleep."""
        with self._lock:
            return (bool(self._waiting) and any(s is None for s in self.slots)
                    and self.pages.fits(self._waiting[0].budget))

    def plan_decode(self, most: int = 1) -> DecodePlan | None:
        """The next decode call's slots: every running sequence that may still sample, but a
        constrained one whose last token is in flight; each makes up to ``most`` tokens (one
        if any has a grammar: its mask needs each token first), never past its ``max_tokens``,
        and gets the pages they need."""
        steps = np.zeros(len(self.slots), np.int32)
        owners: list[Seq | None] = [None] * len(self.slots)
        constrained: list[tuple[int, Seq]] = []
        longest = last = 0
        running = [(i, seq) for i, seq in enumerate(self.slots)
                   if seq is not None and not seq.done and 1 + seq.dispatched < seq.max_tokens]
        if any(seq.constraint is not None for _, seq in running):
            most = 1
        for i, seq in running:
            if seq.constraint is not None:
                if seq.in_flight:  # its mask would be stale: wait for its token
                    continue
                constrained.append((i, seq))
            n = min(most, seq.max_tokens - 1 - seq.dispatched)
            steps[i], owners[i], last = n, seq, i
            seq.dispatched += n
            longest = max(longest, seq.prompt_len + seq.dispatched)
            self.pages.grow(i, seq.prompt_len + seq.dispatched)  # the rows these steps write
        if not steps.any():
            return None
        return DecodePlan(steps, owners, constrained, last + 1, longest)

    def finish(self, seq: Seq) -> None:
        """``seq`` is done: its slot and pages are free (steps in flight that still write there
        run before any reuse), and its request leaves once all its choices are done."""
        seq.done = True
        if seq.slot is not None and self.slots[seq.slot] is seq:
            self.slots[seq.slot] = None
            self.pages.release(seq.slot)
        if all(s.done for s in seq.req.seqs):
            with self._lock:
                self._requests.pop(seq.req.request.request_id, None)

    def release_unadmitted(self, slot: int) -> None:
        """A prefill into ``slot`` failed before its sequence ran: return the pages it took."""
        self.pages.release(slot)

    def running(self) -> list[Seq]:
        return [s for s in self.slots if s is not None]

    def reset(self) -> None:
        """After the device state is lost: no slot runs and the pool's contents are gone."""
        self.slots = [None] * len(self.slots)
        self.pages.reset()

    def drain(self) -> list[Request]:
        """Everything still queued or running, the queue emptied (the engine is stopping)."""
        with self._lock:
            self._waiting.clear()
            return list(self._requests.values())

    def _queue_depth(self) -> int:
        return len({id(seq.req) for seq in self._waiting})
