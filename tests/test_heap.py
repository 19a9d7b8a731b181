"""Freed C-heap pages go back to the OS (what the warm-up does after compiling)."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from mrs.heap import release_free_heap


def rss_mib() -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_heap_returns_freed_pages() -> None:
    chunks = [bytearray(8192) for _ in range(32_768)]  # 256 MiB of malloc'd chunks, each under mmap's threshold
    kept = chunks[::64]  # a live chunk every 512 KiB: glibc's own trimming (top of heap only) cannot reach the rest
    del chunks
    before = rss_mib()
    release_free_heap()
    assert before - rss_mib() > 150, "freed heap pages stayed resident"
    assert len(kept) == 512
