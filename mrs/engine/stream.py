"""The event stream of one request, fed by the engine thread.

Iterate it with ``async for`` inside the event loop that submitted it (the loop
never blocks: the engine thread wakes it with ``call_soon_threadsafe``), or with a
plain ``for`` anywhere (blocking, e.g. notebooks, whose kernel runs a loop too).
It ends after the last choice's ``Finish``.
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
        self._queue: queue.Queue[Event | None] = queue.Queue()
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._arrived = asyncio.Event() if self._loop else None

    def push(self, event: Event) -> None:
        """Called from the engine thread."""
        self._queue.put(event)
        if isinstance(event, Finish):
            self._open -= 1
            if self._open == 0:
                self._queue.put(None)  # end of stream
        if self._loop is not None and not self._arrived.is_set():  # set and not yet cleared: the reader will look
            try:
                self._loop.call_soon_threadsafe(self._arrived.set)
            except RuntimeError:  # that loop is closed; a sync reader may still drain the queue
                pass

    @property
    def finished(self) -> bool:
        return self._open == 0

    def __aiter__(self) -> AsyncIterator[Event]:
        if self._loop is None:
            raise TypeError("this stream was created outside an event loop; iterate it with `for`")
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[Event]:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                self._arrived.clear()
                try:  # re-check after clearing, so a push in between is not missed
                    item = self._queue.get_nowait()
                except queue.Empty:
                    await self._arrived.wait()
                    continue
            if item is None:
                return
            yield item

    def __iter__(self) -> Iterator[Event]:
        while (item := self._queue.get()) is not None:
            yield item
