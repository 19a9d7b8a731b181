"""Give memory this process no longer needs back to the operating system.

XLA compiles in the C heap, and glibc keeps the chunks a compile frees for later
allocations instead of returning them. After the quickstart models' warm-up that was
about 500 MiB of the server's RSS (``/proc/self/status`` VmRSS before and after a
``malloc_trim``: 3,862 -> 3,364 MiB). ``malloc_trim`` hands those pages back; where
the C library has none (musl, macOS), ``release_free_heap`` does nothing.

``discard_zeroed`` hands back the pages of a buffer whose bytes are zeros or no longer
matter (a KV pool's free pages): ``madvise(MADV_DONTNEED)`` on private anonymous memory
unmaps them, and the next touch maps a fresh zero page.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
from typing import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # the C library this process already uses
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Return the C heap's free pages to the OS (glibc; a no-op elsewhere). It walks the heap
    (about 50 ms after a warm-up): call it after a burst of frees, not per step."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _madvise() -> Callable[[int, int, int], int] | None:
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return madvise


def discard_zeroed(address: int, length: int) -> int:
    """Unmap the whole OS pages inside ``[address, address + length)`` of private anonymous
    memory; they read back as zeros. Bytes handed back (0 where the OS cannot)."""
    madvise = _madvise()
    start = -(-address // mmap.PAGESIZE) * mmap.PAGESIZE
    end = (address + length) // mmap.PAGESIZE * mmap.PAGESIZE
    if madvise is None or end <= start:
        return 0
    if madvise(start, end - start, mmap.MADV_DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), f"madvise of {end - start} bytes at {start:#x} failed")
    return end - start
