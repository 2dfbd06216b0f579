"""The supernode gives freed heap memory back to the OS (supernode/gc.py heap_trimmer)."""

from __future__ import annotations

import asyncio
import contextlib
import platform
import subprocess
import sys

import pytest

from supernode import gc as sngc
from supernode.gc import heap_trimmer

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's; elsewhere there is nothing to call")
def test_freed_heap_in_the_middle_goes_back_to_the_os() -> None:
    # In a fresh interpreter: 4 KiB blocks (below malloc's mmap threshold, so on the heap),
    # one block after them that stays, then the blocks freed: glibc keeps those pages
    # (they are below a live block) until malloc_trim returns them.
    code = """
from supernode.gc import heap_trimmer
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
blocks = [bytes(4096) + bytes([i % 256]) for i in range(50_000)]
pin = bytes(4096) + b'pin'
del blocks
before = rss()
assert heap_trimmer()()
print(before, rss())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, after = map(int, out.stdout.split())
    assert before >= 150, out.stdout  # the ~200 MiB freed are still held
    assert after <= before - 150, out.stdout  # and given back


def test_trimmer_is_none_or_callable() -> None:
    trim = heap_trimmer()
    assert (trim is None) != GLIBC
    if trim is not None:
        assert isinstance(trim(), bool)


async def test_the_loop_trims_every_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[float] = []
    monkeypatch.setattr(sngc, "heap_trimmer", lambda: lambda: calls.append(1.0) is None)
    task = asyncio.create_task(sngc.heap_trim_loop(0.02))
    await asyncio.sleep(0.15)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert 3 <= len(calls) <= 8, calls


async def test_the_loop_ends_where_there_is_nothing_to_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sngc, "heap_trimmer", lambda: None)
    await asyncio.wait_for(sngc.heap_trim_loop(0.01), 1.0)
