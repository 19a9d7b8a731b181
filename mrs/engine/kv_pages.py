"""The host side of a model's paged KV cache (``mrs.models.kv_cache``): which pages are
free, which slot holds which, and the block tables the steps read.

Plain Python and numpy, no device work: the engine thread asks it before each prefill and
decode step and passes a copy of the tables with the step.

Admission reserves: a sequence is admitted only when the pages for its whole budget
(prompt + ``max_tokens``, within the context) are free and unpromised, and it takes them
as it grows (``grow``). So a running sequence never finds the pool empty and nothing is
ever preempted; a request that does not fit waits in the queue until others finish (as a
llama-server slot's context is fixed, but shared rather than split evenly).
"""

from __future__ import annotations

import numpy as np

from mrs.models.kv_cache import NO_PAGE, KVGeometry, pages_for


class PagePool:
    """Free pages, each slot's pages and reservation, and the block tables ``[slots, width]``
    (``NO_PAGE`` where a slot has no page)."""

    def __init__(self, geometry: KVGeometry, slots: int) -> None:
        self.geometry = geometry
        self.tables = np.full((slots, geometry.table_width), NO_PAGE, np.int32)
        self._free = list(range(geometry.pages - 1, -1, -1))  # a stack: low pages first
        self._held: list[list[int]] = [[] for _ in range(slots)]
        self._promised = [0] * slots  # pages reserved for a slot and not yet taken

    @property
    def free(self) -> int:
        """Pages neither held nor promised."""
        return len(self._free) - sum(self._promised)

    @property
    def used(self) -> int:
        return self.geometry.pages - len(self._free)

    def fits(self, tokens: int) -> bool:
        return pages_for(tokens, self.geometry.page_size) <= self.free

    def reserve(self, slot: int, tokens: int) -> None:
        """Promise ``slot`` the pages for ``tokens`` tokens (``fits`` said they are there)."""
        need = pages_for(tokens, self.geometry.page_size)
        if self._held[slot] or self._promised[slot] or need > self.free:
            raise RuntimeError(f"KV pages: slot {slot} is taken or {need} pages do not fit ({self.free} free)")
        self._promised[slot] = need

    def grow(self, slot: int, tokens: int) -> None:
        """Give ``slot`` the pages that hold its first ``tokens`` tokens, from its reservation."""
        held = self._held[slot]
        while len(held) * self.geometry.page_size < tokens:
            if not self._promised[slot]:
                raise RuntimeError(f"KV pages: slot {slot} grew past its reservation ({tokens} tokens)")
            page = self._free.pop()
            self._promised[slot] -= 1
            self.tables[slot, len(held)] = page
            held.append(page)

    def release(self, slot: int) -> None:
        """Return the slot's pages and the rest of its reservation."""
        self._free.extend(reversed(self._held[slot]))
        self._held[slot] = []
        self._promised[slot] = 0
        self.tables[slot] = NO_PAGE

    def reset(self) -> None:
        for slot in range(len(self._held)):
            self.release(slot)
