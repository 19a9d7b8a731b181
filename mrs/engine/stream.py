"""The event stream of one request, fed by the engine thread.

Created inside a running asyncio loop it is an async iterator (events cross over
with ``call_soon_threadsafe``, the loop never blocks); created outside one it is a
plain blocking iterator. It ends after the last choice's ``Finish``.
"""

from __future__ import annotations

import asyncio
import queue
from typing import AsyncIterator, Iterator

from mrs.engine.types import Event, Finish


class RequestStream:
    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self._open = n  # choices not finished yet
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._async_queue: asyncio.Queue[Event | None] | None = asyncio.Queue() if self._loop else None
        self._sync_queue: queue.Queue[Event | None] = queue.Queue()

    def push(self, event: Event) -> None:
        """Called from the engine thread."""
        items: list[Event | None] = [event]
        if isinstance(event, Finish):
            self._open -= 1
            if self._open == 0:
                items.append(None)  # end of stream
        for item in items:
            if self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._async_queue.put_nowait, item)
                except RuntimeError:  # the caller's loop is closed: nobody is listening
                    return
            else:
                self._sync_queue.put(item)

    @property
    def finished(self) -> bool:
        return self._open == 0

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._async_queue is None:
            raise TypeError("this stream was created outside an event loop; iterate it with `for`")
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        while (event := await self._async_queue.get()) is not None:
            yield event

    def __iter__(self) -> Iterator[Event]:
        if self._loop is not None:
            raise TypeError("this stream was created inside an event loop; iterate it with `async for`")
        while (event := self._sync_queue.get()) is not None:
            yield event
