"""Background threads stopped before the interpreter tears XLA down.

A daemon thread still inside XLA when the interpreter finalizes (compiling a step, or
dropping a step's arrays) aborts the process ("FATAL: exception not rethrown"), e.g. at
the end of a one-shot ``mrs generate``. ``atexit`` runs the last registered hook first, so
a hook registered again each time a thread starts (JAX's backend exists by then) runs
before JAX's own clean-up.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Callable, Generic, TypeVar

Owner = TypeVar("Owner")


class StopAtExit(Generic[Owner]):
    """Calls ``stop`` on every owner added (and still alive) at interpreter exit."""

    def __init__(self, stop: Callable[[Owner], None]) -> None:
        self._stop = stop
        self._owners: weakref.WeakSet[Owner] = weakref.WeakSet()

    def add(self, owner: Owner) -> None:
        """``owner`` has started a thread: stop it at exit, before JAX's clean-up."""
        self._owners.add(owner)
        atexit.unregister(self._run)
        atexit.register(self._run)

    def _run(self) -> None:
        for owner in list(self._owners):
            self._stop(owner)
