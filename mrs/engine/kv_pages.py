"""The host side of a model's paged KV cache (``mrs.models.kv_cache``): which pages are
free, which slot holds which, the prefix cache, and the block tables the steps read.

Plain Python and numpy, no device work: the engine thread asks it before each prefill and
decode step and passes a copy of the tables with the step.

Admission reserves: a sequence is admitted only when the pages for its whole budget
(prompt + ``max_tokens``, within the context) are free and unpromised, and it takes them
as it grows (``grow``). So a running sequence never finds the pool empty and nothing is
ever preempted; a request that does not fit waits in the queue until others finish (as a
llama-server slot's context is fixed, but shared rather than split evenly).

Prefix caching: every full page of a prompt is named by a hash of all the tokens up to
its end (``prefix_hashes``). After a prompt's prefill, its full pages are registered under
those names; a later prompt that starts with the same tokens takes the same pages
(``match``) and prefills only the rest. Shared pages are never written again: a sequence
writes only past its prompt's full pages, and a match leaves the prompt's last token to
prefill (its logits start the reply). When no sequence holds a registered page it stays
cached, least recently used first in line to be reused for new tokens.

Memory: a free page that held tokens is stale until the engine hands its memory back to
the OS (``take_stale``, once the engine is idle; ``mrs.models.kv_cache.discard``), so the
pool's resident pages (``resident``) are those in use, cached, or freed since.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

from mrs.models.kv_cache import NO_PAGE, KVGeometry, pages_for


def prefix_hashes(ids: list[int], page_size: int) -> list[bytes]:
    """One name per full page of ``ids``: a digest of every token up to that page's end."""
    digest, names = hashlib.blake2b(digest_size=16), []
    tokens = np.asarray(ids, np.int64)
    for end in range(page_size, len(ids) + 1, page_size):
        digest.update(tokens[end - page_size : end].tobytes())
        names.append(digest.copy().digest())
    return names


class PagePool:
    """Free pages, each slot's pages and reservation, the prefix cache's pages, and the block
    tables ``[slots, width]`` (``NO_PAGE`` where a slot has no page)."""

    def __init__(self, geometry: KVGeometry, slots: int) -> None:
        self.geometry = geometry
        self.tables = np.full((slots, geometry.table_width), NO_PAGE, np.int32)
        self._free = list(range(geometry.pages - 1, -1, -1))  # no content worth keeping; low pages first
        self._held: list[list[int]] = [[] for _ in range(slots)]
        self._promised = [0] * slots  # pages reserved for a slot and not yet taken
        self._holders = [0] * geometry.pages  # slots holding each page
        self._page_of: dict[bytes, int] = {}  # prefix cache: a full page's name -> its page
        self._name_of: dict[int, bytes] = {}
        self._idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld; LRU first
        self._stale: set[int] = set()  # free pages that held tokens, their memory not yet handed back
        self._unmapped: set[int] = set(range(geometry.pages))  # free pages whose memory is the OS's

    @property
    def free(self) -> int:
        """Pages neither held nor promised (cached pages no sequence holds count: they can be reused)."""
        return len(self._free) + len(self._idle) - sum(self._promised)

    @property
    def used(self) -> int:
        """Pages some sequence holds."""
        return self.geometry.pages - len(self._free) - len(self._idle)

    @property
    def cached(self) -> int:
        """Pages registered in the prefix cache (held or not)."""
        return len(self._page_of)

    @property
    def resident(self) -> int:
        """Pages whose memory the pool holds: in use, cached, or stale."""
        return self.geometry.pages - len(self._unmapped)

    def take_stale(self) -> list[int]:
        """The stale free pages (sorted), counted as unmapped from now: the caller hands their
        memory back before any step runs."""
        stale = sorted(self._stale)
        self._unmapped.update(stale)
        self._stale.clear()
        return stale

    def unmap_all(self) -> list[int]:
        """Every page, counted as unmapped: the engine's state is new (its pool zeros, no slot
        holding a page) and the caller hands the whole pool's memory back."""
        if any(self._held):
            raise RuntimeError("KV pages: the pool's memory cannot go while a slot holds pages")
        self._stale.clear()
        self._unmapped = set(range(self.geometry.pages))
        return list(range(self.geometry.pages))

    def match(self, names: list[bytes], prompt_len: int) -> list[int]:
        """The cached pages a prompt of ``prompt_len`` tokens (whose full pages are ``names``)
        starts with, leaving at least its last token to prefill."""
        pages = []
        for name in names[: (prompt_len - 1) // self.geometry.page_size]:
            page = self._page_of.get(name)
            if page is None:
                break
            pages.append(page)
        return pages

    def fits(self, tokens: int, shared: list[int] = ()) -> bool:
        """Whether a sequence of ``tokens`` tokens whose first pages are ``shared`` can be admitted."""
        waking = sum(1 for page in shared if not self._holders[page])  # cached pages it takes out of reuse
        return pages_for(tokens, self.geometry.page_size) - len(shared) + waking <= self.free

    def reserve(self, slot: int, tokens: int, shared: list[int] = ()) -> None:
        """Give ``slot`` the ``shared`` pages and promise it the rest for ``tokens`` tokens
        (``fits`` said they are there)."""
        if self._held[slot] or self._promised[slot] or not self.fits(tokens, shared):
            raise RuntimeError(f"KV pages: slot {slot} is taken or {tokens} tokens do not fit ({self.free} pages free)")
        for page in shared:
            self._take(slot, page)
        self._promised[slot] = pages_for(tokens, self.geometry.page_size) - len(shared)

    def grow(self, slot: int, tokens: int) -> None:
        """Give ``slot`` the pages that hold its first ``tokens`` tokens, from its reservation."""
        while len(self._held[slot]) * self.geometry.page_size < tokens:
            if not self._promised[slot]:
                raise RuntimeError(f"KV pages: slot {slot} grew past its reservation ({tokens} tokens)")
            self._promised[slot] -= 1
            page = self._free.pop() if self._free else self._evict()
            self._stale.discard(page)
            self._unmapped.discard(page)
            self._take(slot, page)

    def register(self, slot: int, names: list[bytes]) -> None:
        """Name the slot's first full pages (its prompt's, now written) in the prefix cache."""
        for name, page in zip(names, self._held[slot]):
            if name not in self._page_of and page not in self._name_of:
                self._page_of[name], self._name_of[page] = page, name

    def release(self, slot: int) -> None:
        """Return the slot's pages and the rest of its reservation; named pages stay cached."""
        for page in self._held[slot]:
            self._holders[page] -= 1
            if self._holders[page]:
                continue
            if page in self._name_of:
                self._idle[page] = None
            else:
                self._free.append(page)
                self._stale.add(page)
        self._held[slot] = []
        self._promised[slot] = 0
        self.tables[slot] = NO_PAGE

    def reset(self) -> None:
        """Every slot released and the prefix cache forgotten (the pool's contents are gone)."""
        for slot in range(len(self._held)):
            self.release(slot)
        self._page_of.clear()
        self._name_of.clear()
        self._free.extend(reversed(self._idle))
        self._stale.update(self._idle)
        self._idle.clear()

    def _take(self, slot: int, page: int) -> None:
        self._idle.pop(page, None)
        self._holders[page] += 1
        self.tables[slot, len(self._held[slot])] = page
        self._held[slot].append(page)

    def _evict(self) -> int:
        """The least recently used cached page no sequence holds, forgotten by the prefix cache."""
        page, _ = self._idle.popitem(last=False)
        del self._page_of[self._name_of.pop(page)]
        return page
