"""The piece pipe: an origin body becomes verified pieces in the cache file.

The fetch (fetch.py) hands the body's chunks over as they arrive, in batches of about
BATCH bytes; each batch is hashed and written in a worker thread while the next one is
read, and every piece is published to the store the moment it is whole on disk (checked
against the digest already distributed for it, if any). Also the hashing helpers the
fetch uses to re-verify a cached file.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

from common import digest, errors
from supernode.store.repo import Repo

from .cache import CacheEntry, PieceCache

log = logging.getLogger("supernode.cdn")
BATCH = 1 << 20  # bytes of a piece handed to the hashing/writing thread at once
Patiently = Callable[[str, Callable[[], Awaitable[Any]]], Awaitable[Any]]


def write_and_hash(fd: int, hasher: Any, offset: int, chunks: list[bytes]) -> None:
    """One batch of a piece, as the chunks it arrived in: hashed and written unjoined."""
    for c in chunks:
        hasher.update(c)
    total = sum(len(c) for c in chunks)
    n = os.pwritev(fd, chunks, offset)
    if n < total:
        os.pwrite(fd, b"".join(chunks)[n:], offset + n)


def sha256_file(path: os.PathLike[str] | str, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def hash_range(fd: int, offset: int, size: int, algo: str) -> str:
    return digest.of(os.pread(fd, size, offset), algo)



class PiecePipe:
    """Hash + write a piece batch by batch in a worker thread while the loop reads on (one
    batch in the thread at a time, so a piece's hasher sees its bytes in order); publish
    each piece as it ends."""

    def __init__(self, repo: Repo, sn_id: str, cache: PieceCache, patiently: Patiently, task_id: str,
                 entry: CacheEntry, fd: int, published: dict[int, str]) -> None:
        self.repo, self.sn_id, self.cache, self.patiently = repo, sn_id, cache, patiently
        self.task_id, self.entry, self.fd, self.published = task_id, entry, fd, published
        self.pending: asyncio.Future[None] | None = None
        self.piece = -1
        self.hasher: Any = None
        self.last_save = time.monotonic()
        self.unpublished: list[tuple[int, str]] = []

    async def add(self, piece: int, offset: int, chunks: list[bytes]) -> None:
        await self._wait()
        if piece != self.piece:
            self.piece, self.hasher = piece, digest.new(self.entry.digest_algo)
        loop = asyncio.get_running_loop()
        self.pending = loop.run_in_executor(None, write_and_hash, self.fd, self.hasher, offset, chunks)

    async def _wait(self) -> None:
        if self.pending is not None:
            p, self.pending = self.pending, None
            await p

    async def flush(self) -> None:
        """Publish what a store outage held back (bounded wait, then StoreError)."""
        if self.unpublished:
            pieces = self.unpublished
            await self.patiently(f"task {self.task_id[:12]}: publishing pieces",
                                 lambda: self.repo.publish_pieces(self.task_id, self.sn_id, pieces))
            self.unpublished = []

    async def settle(self) -> None:
        """Wait for the batch in the thread, whatever its outcome (error paths)."""
        if self.pending is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.pending)
            self.pending = None

    async def end_piece(self, n: int) -> None:
        await self._wait()
        assert n == self.piece and self.hasher is not None
        d = str(self.hasher.hexdigest())
        self.piece, self.hasher = -1, None
        old = self.published.get(n)
        if old is not None and old != d:
            raise errors.OriginChanged(f"piece {n} differs from the version already distributed")
        self.entry.digests[n] = d
        self.unpublished.append((n, d))
        try:
            await self.repo.publish_pieces(self.task_id, self.sn_id, self.unpublished)
            self.unpublished = []
        except errors.StoreError as exc:
            # keep fetching through a store outage; these go out with the next piece
            log.info("task %s: cannot publish %d pieces yet: %s", self.task_id[:12],
                     len(self.unpublished), exc.message)
        if time.monotonic() - self.last_save > 1.0:
            self.last_save = time.monotonic()
            # a copy: a takeover's peer copier adds digests on the loop meanwhile
            snap = dataclasses.replace(self.entry, digests=dict(self.entry.digests))
            await asyncio.to_thread(self.cache.save, snap)
