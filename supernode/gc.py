"""Garbage collection: idle tasks, dead peers, cached files under disk pressure, freed
heap memory, and the supernode's own liveness record."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import time
from collections.abc import Callable

from common import errors

from .cdn.cache import PieceCache
from .state import SupernodeState
from .store.connection import raise_if_cancelled

log = logging.getLogger("supernode.gc")


async def collect_once(st: SupernodeState) -> dict[str, int]:
    s = st.settings
    stats = {"tasks": 0, "clients": 0, "files": 0, "blobs": 0}
    for tid in await st.repo.idle_tasks(int(s.task_expire_time * 1000)):
        if tid in st.cdn.running or await st.repo.lease_holder(tid):
            continue
        await st.repo.delete_task(tid)
        st.hub.forget(tid)
        stats["tasks"] += 1
    for tid in await st.repo.list_tasks(1000):
        clients = await st.repo.all_clients(tid)
        dead: list[str] = []
        alive: dict[str, bool] = {}
        for cid, info in clients.items():
            if info.kind not in ("peer", "peer-cdn"):
                continue
            if info.peer_id not in alive:
                alive[info.peer_id] = await st.repo.is_alive(info.peer_id)
            if not alive[info.peer_id]:
                dead.append(cid)
        await st.repo.remove_clients(tid, dead)
        stats["clients"] += len(dead)
    stats["files"] = await _disk(st)
    stats["blobs"] = await asyncio.to_thread(collect_blobs, st.cache, st.settings.blob_ttl,
                                             st.settings.disk_gc_threshold)
    return stats


def collect_blobs(cache: PieceCache, ttl: float, threshold: int, now: float | None = None) -> int:
    """Blobs (complete files by content) that nothing refers to any more, removed once
    unreferenced for `ttl` seconds, or at once while free space is below `threshold`
    (oldest first). A blob any task's entry refers to is never removed."""
    now = time.time() if now is None else now
    removed = 0
    for content, refs, changed, _size in sorted(cache.blobs(), key=lambda b: b[2]):
        if refs:
            continue
        if now - changed >= ttl or cache.free_bytes() < threshold:
            removed += cache.remove_blob(content)
    return removed


async def _disk(st: SupernodeState) -> int:
    """Below the free-space threshold, evict cached files of tasks nobody uses, oldest
    access first, never a file being fetched."""
    if st.cache.free_bytes() >= st.settings.disk_gc_threshold:
        return 0
    removed = 0
    for _atime, tid, _size in st.cache.on_disk():
        if st.cache.free_bytes() >= st.settings.disk_gc_threshold:
            break
        if tid in st.cdn.running or await st.repo.get_meta(tid) is not None:
            continue
        st.cache.remove(tid)
        removed += 1
    return removed


async def gc_loop(st: SupernodeState) -> None:
    await asyncio.sleep(st.settings.gc_initial_delay)
    while True:
        try:
            stats = await collect_once(st)
            if any(stats.values()):
                log.info("gc: %s", stats)
        except errors.StoreError as exc:
            log.warning("gc skipped: %s", exc.message)
        raise_if_cancelled()
        await asyncio.sleep(st.settings.gc_meta_interval)


HEAP_TRIM_INTERVAL = 30.0  # seconds between two returns of freed heap memory to the OS


def heap_trimmer() -> Callable[[], bool] | None:
    """glibc's malloc_trim(0), where the C library is glibc: it gives the pages of freed
    heap memory back to the OS. glibc returns on its own only what is free at the top of
    the heap; what a burst of requests freed below a block still in use stays in RSS.
    None elsewhere."""
    try:  # the symbols this process already has: no ldconfig run to find the C library
        fn = getattr(ctypes.CDLL(None), "malloc_trim", None)
    except OSError:
        return None
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int

    def trim() -> bool:
        return bool(fn(0))

    return trim


async def heap_trim_loop(interval: float = HEAP_TRIM_INTERVAL) -> None:
    """Forever: return freed heap memory every `interval` seconds (0.1-0.4 ms a pass with
    the soak's ~100 MiB heap: on the loop, not worth a thread)."""
    trim = heap_trimmer()
    if trim is None:
        return
    while True:
        await asyncio.sleep(interval)
        trim()


async def announce_loop(st: SupernodeState, ip: str, port: int, download_port: int, tls: bool = False) -> None:
    # The record lives two lease TTLs: a dead supernode's CDN copy is re-seeded elsewhere
    # (cdn.py) about as soon as a fetch it left would be taken over.
    ttl = st.settings.lease_ttl
    while True:
        try:
            await st.repo.announce_supernode(st.sn_id, ip, port, download_port, int(ttl * 2000), tls)
        except errors.StoreError as exc:
            log.warning("cannot announce this supernode: %s", exc.message)
        raise_if_cancelled()
        await asyncio.sleep(ttl / 3)
