"""One blob through the swarm: runs dfget's download in-process and exposes its verified,
digest-checked contiguous prefix so responses can stream it while pieces arrive.

The download writes pieces (each checked against the supernode's digest) into dfget's part
file; `Stats.on_piece` tells us which. The contiguous prefix of verified pieces is hashed
as it grows; readers send only hashed bytes, and hold back the last byte until the whole
blob has matched its digest, so a client never sees a complete body that did not match.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from common.errors import ContentDigestMismatch, DfError
from common.taskid import task_id as make_task_id
from dfget.config import DownloadConfig
from dfget.output import part_path
from dfget.progress import Stats

log = logging.getLogger("dfdaemon")
CHUNK = 1 << 20
Downloader = Callable[[DownloadConfig, Stats], Awaitable[None]]


class BlobFetch:
    def __init__(self, cfg: DownloadConfig, hexd: str | None, downloader: Downloader) -> None:
        self.cfg = cfg
        self.hex = hexd  # the content digest's hex, or None for a URL task (no whole check)
        self.key = hexd or make_task_id(cfg.url, identifier=cfg.identifier)
        self.task_id = make_task_id(cfg.url, identifier=cfg.identifier)
        self.stats = Stats(url=cfg.url, output=str(cfg.output), on_piece=self._on_piece)
        self._download = downloader
        self.length = -1
        self.hashed = 0  # bytes [0, hashed) are verified pieces and fed to the hasher
        self.state = "running"  # running | ok | bad | failed
        self.error: BaseException | None = None
        self._reach = 0
        self._ready: dict[int, int] = {}
        self._fd: int | None = None
        self._hasher = hashlib.sha256()
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self.task: asyncio.Task[None] | None = None

    # --- the download side ---------------------------------------------------------------
    def _on_piece(self, piece: int, start: int, end: int) -> None:
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(part_path(self.cfg.output, self.task_id), os.O_RDONLY)
        self._ready[start] = end + 1
        while self._reach in self._ready:
            self._reach = self._ready.pop(self._reach)
        self._wake.set()

    def start(self) -> None:
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        dl = asyncio.create_task(self._download(self.cfg, self.stats))
        dl.add_done_callback(lambda _: self._wake.set())
        try:
            while not dl.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.05)
                self._wake.clear()
                if self.length < 0 and self.stats.length >= 0:
                    self.length = self.stats.length
                    await self._notify()
                if self._fd is not None and self._reach > self.hashed:
                    await self._hash_to(self._reach)
            exc = dl.exception()
            if exc is not None:
                raise exc
            # Complete and every piece verified (or fetched whole from the origin): hash
            # what is left from the final file (a back-to-source may have rewritten it).
            self.length = self.stats.length
            if self._fd is not None:
                os.close(self._fd)
            self._fd = os.open(self.cfg.output, os.O_RDONLY)
            await self._hash_to(self.length)
            got = self._hasher.hexdigest()
            if self.hex is not None and got != self.hex:
                self.state = "bad"
                self.error = ContentDigestMismatch(f"blob bytes hash to sha256:{got}, not sha256:{self.hex}")
            else:
                self.state = "ok"
        except asyncio.CancelledError:
            dl.cancel()
            self.state, self.error = "failed", DfError("cancelled")
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure is reported to the readers
            self.state, self.error = "failed", exc
        finally:
            await self._notify()

    async def _hash_to(self, end: int) -> None:
        assert self._fd is not None
        fd, start = self._fd, self.hashed

        def work() -> int:
            pos = start
            while pos < end:
                chunk = os.pread(fd, min(CHUNK, end - pos), pos)
                if not chunk:
                    raise OSError(f"{self.cfg.output}: short read at {pos}")
                self._hasher.update(chunk)
                pos += len(chunk)
            return pos

        self.hashed = await asyncio.to_thread(work)
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the reader side -----------------------------------------------------------------
    async def wait(self, pred: Callable[[], bool]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: pred() or self.state != "running")

    async def wait_length(self) -> int:
        """The blob's length once known; -1 when the fetch ended before it was."""
        await self.wait(lambda: self.length >= 0)
        return self.length if self.state in ("running", "ok") else -1

    def reader_fd(self) -> int:
        """A descriptor of its own for one reader (a dup: the fetch may close or replace
        its descriptor meanwhile; the inode is the same after dfget's rename)."""
        if self._fd is not None:
            return os.dup(self._fd)
        return os.open(self.cfg.output, os.O_RDONLY)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def blob_paths(home: Path, hexd: str) -> tuple[Path, Path]:
    """(download output, verified cache entry): the same inode once verified (a hard link),
    so the peer server keeps serving the download path and the daemon serves the cache."""
    root = home / "dfdaemon"
    return root / "downloads" / hexd, root / "blobs" / "sha256" / hexd
