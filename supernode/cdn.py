"""The CDN: fetch each task's file from its origin once, cluster-wide, into the piece
cache, hashing every piece on the way and publishing it the moment it is on disk.

Exactly-once: a fetch runs only while its supernode holds the task's lease in Redis
(SET NX PX, renewed every third of its TTL). If that supernode dies the lease expires
and the next supernode that sees the task unfinished takes the fetch over.
Resumption: the sidecar records verified pieces and the origin's validators; a
restarted fetch asks for the rest with Range + If-Range, and re-verifies every piece it
recomputes against digests already published, so two versions are never spliced.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from common import digest, errors
from common.pieces import DEFAULT_PIECE_SIZE, piece_count, piece_size_for
from common.ranges import RangeSyntaxError, parse_content_range
from common.ratelimit import Throttle
from common.taskid import redact_url

from . import keys
from .cache import CacheEntry, PieceCache
from .origin import OriginClient, validators
from .repo import Repo, TaskMeta, now_ms

log = logging.getLogger("supernode.cdn")
BATCH = 1 << 20  # bytes of a piece handed to the hashing/writing thread at once


@dataclass(frozen=True)
class CdnSettings:
    max_file_size: int = 64 << 30
    min_rate: int = 64 << 10  # bytes/s averaged over `rate_window`
    rate_window: float = 30.0
    max_fetches: int = 16
    lease_ttl_ms: int = keys.LEASE_TTL_MS


def file_digest(digests: dict[int, str], count: int) -> str:
    """Digest of the whole file: sha256 over its piece digests in order (each piece is
    itself sha256-verified, so this pins the whole content without a second pass)."""
    h = hashlib.sha256()
    for n in range(count):
        h.update(digests[n].encode())
        h.update(b"\n")
    return h.hexdigest()


def _write_and_hash(fd: int, hasher: Any, offset: int, chunks: list[bytes]) -> None:
    """One batch of a piece, as the chunks it arrived in: hashed and written unjoined."""
    for c in chunks:
        hasher.update(c)
    total = sum(len(c) for c in chunks)
    n = os.pwritev(fd, chunks, offset)
    if n < total:
        os.pwrite(fd, b"".join(chunks)[n:], offset + n)


def _hash_range(fd: int, offset: int, size: int) -> str:
    return digest.of(os.pread(fd, size, offset))


class FetchAborted(Exception):
    """The lease was lost: another supernode owns the fetch now."""


class Cdn:
    def __init__(
        self, repo: Repo, origin: OriginClient, cache: PieceCache, sn_id: str,
        throttle: Throttle, settings: CdnSettings = CdnSettings(),
    ) -> None:
        self.repo = repo
        self.origin = origin
        self.cache = cache
        self.sn_id = sn_id
        self.throttle = throttle
        self.settings = settings
        self.running: dict[str, asyncio.Task[None]] = {}
        self._slots = asyncio.Semaphore(settings.max_fetches)
        self.bytes_fetched = 0

    async def ensure(self, meta: TaskMeta) -> None:
        """Start the fetch here if the task needs one and nobody holds its lease."""
        if meta.status in ("success", "failed") or meta.task_id in self.running:
            return
        if not await self.repo.take_lease(meta.task_id, self.sn_id, self.settings.lease_ttl_ms):
            # Our own lease from before a restart (same home, same id) is ours to resume.
            if await self.repo.lease_holder(meta.task_id) != self.sn_id:
                return
        if meta.task_id in self.running:
            return  # another registration in this process started it while we awaited
        task = asyncio.create_task(self._run(meta.task_id), name=f"cdn-{meta.task_id[:12]}")
        self.running[meta.task_id] = task
        task.add_done_callback(lambda _t, tid=meta.task_id: self.running.pop(tid, None))

    async def close(self) -> None:
        tasks = list(self.running.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t

    async def _run(self, task_id: str) -> None:
        keeper = asyncio.create_task(self._keep_lease(task_id, asyncio.current_task()))
        try:
            async with self._slots:
                meta = await self.repo.get_meta(task_id)
                if meta is None or meta.status in ("success", "failed"):
                    return
                await self._fetch(meta)
        except errors.DfError as exc:
            log.warning("task %s failed: %s (%s)", task_id[:12], exc.message, exc.code)
            await self._fail(task_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug must fail the task, not hang it
            log.exception("task %s: unexpected fetch failure", task_id[:12])
            await self._fail(task_id, errors.TaskFailed(f"internal error: {type(exc).__name__}"))
        finally:
            keeper.cancel()
            with contextlib.suppress(BaseException):
                await keeper
            entry = self.cache.entries.get(task_id)
            if entry is not None:
                with contextlib.suppress(OSError):
                    self.cache.save(entry)
            with contextlib.suppress(errors.DfError):
                await self.repo.keep_lease(task_id, self.sn_id, 0)

    async def _fail(self, task_id: str, exc: errors.DfError) -> None:
        with contextlib.suppress(errors.DfError):
            await self.repo.set_meta(
                task_id, status="failed", error=exc.code, error_message=exc.message, failed_ms=now_ms()
            )
        if isinstance(exc, (errors.OriginChanged, errors.OriginShortBody, errors.OriginLongBody)):
            self.cache.remove(task_id)

    async def _keep_lease(self, task_id: str, owner: asyncio.Task[Any] | None) -> None:
        period = self.settings.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(period)
            try:
                ok = await self.repo.keep_lease(task_id, self.sn_id, self.settings.lease_ttl_ms)
            except errors.StoreError:
                continue  # Redis blip: keep fetching; the next renewal decides
            if not ok and owner is not None:
                log.warning("task %s: lease lost, stopping the fetch", task_id[:12])
                owner.cancel()
                return

    # --- the fetch ------------------------------------------------------------------
    async def _fetch(self, meta: TaskMeta) -> None:
        tid = meta.task_id
        published = await self.repo.digests(tid)
        entry = self.cache.load(tid)
        headers = dict(meta.headers)
        if meta.range:
            headers["Range"] = meta.range
            entry = None  # ranged tasks are refetched whole; their validators are per range
        start = 0
        if entry is not None and (entry.etag or entry.last_modified):
            if entry.complete and await self._revalidate(meta, entry, headers, published):
                return
            if not entry.complete:
                start = await asyncio.to_thread(self._trusted_prefix, entry)
        attempt = 0
        while True:
            resp = await self._open(meta, entry, headers, start)
            try:
                if resp.status == 206 and not meta.range and start > 0:
                    entry = self._check_resume(resp, entry, start)
                else:
                    start = 0
                    entry = self._new_entry(meta, resp)
                self.cache.adopt(entry)
                await self._announce(meta, entry)
                await self._stream(meta, entry, resp, start, published)
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, errors.OriginShortBody,
                    errors.OriginUnavailable) as exc:
                attempt += 1
                resumable = entry is not None and bool(entry.etag or entry.last_modified) and not meta.range
                if attempt > self.origin.settings.retries or not resumable:
                    raise self._translate(exc, meta) from None
                assert entry is not None
                published.update(entry.digests)
                start = entry.verified_prefix()
                log.info("task %s: origin transfer broke (%s); resuming at piece %d",
                         tid[:12], type(exc).__name__, start)
                await asyncio.sleep(self.origin.settings.backoff * attempt)
            finally:
                resp.release()

    @staticmethod
    def _translate(exc: Exception, meta: TaskMeta) -> errors.DfError:
        if isinstance(exc, errors.DfError):
            return exc
        if isinstance(exc, aiohttp.ClientPayloadError):
            return errors.OriginShortBody(f"origin body ended early for {redact_url(meta.url)}")
        return errors.OriginUnavailable(f"origin transfer failed: {type(exc).__name__}")

    async def _open(self, meta: TaskMeta, entry: CacheEntry | None, headers: dict[str, str], start: int) -> Any:
        h = dict(headers)
        if entry is not None and start > 0:
            h["Range"] = f"bytes={start * entry.piece_size}-"
            h["If-Range"] = entry.etag or entry.last_modified
        resp = await self.origin.open(meta.url, h)
        if resp.status == 304:
            resp.release()
            raise errors.OriginStatus("origin answered 304 to an unconditional request", detail={"status": "304"})
        return resp

    def _new_entry(self, meta: TaskMeta, resp: Any) -> CacheEntry:
        if meta.range:
            if resp.status != 206:
                raise errors.OriginStatus("origin ignored the task's Range", detail={"status": str(resp.status)})
        length = resp.content_length if resp.content_length is not None else -1
        if "chunked" in resp.headers.get("Transfer-Encoding", "").lower():
            length = -1
        if length > self.settings.max_file_size:
            raise errors.OriginTooLarge(f"origin file of {length} bytes exceeds the {self.settings.max_file_size} limit")
        self.cache.remove(meta.task_id)
        entry = self.cache.create(meta.task_id)
        entry.length = length
        entry.piece_size = piece_size_for(length) if length >= 0 else DEFAULT_PIECE_SIZE
        entry.etag, entry.last_modified = validators(resp)
        return entry

    def _check_resume(self, resp: Any, entry: CacheEntry | None, start: int) -> CacheEntry:
        assert entry is not None
        try:
            a, _b, total = parse_content_range(resp.headers.get("Content-Range", ""))
        except RangeSyntaxError as exc:
            raise errors.OriginChanged(f"origin sent a bad Content-Range on resume: {exc}") from None
        etag, lm = validators(resp)
        if a != start * entry.piece_size or (total is not None and total != entry.length) or (
            entry.etag and etag and etag != entry.etag
        ):
            raise errors.OriginChanged("origin content changed while resuming")
        log.info("task %s: resuming at piece %d", entry.task_id[:12], start)
        return entry

    async def _announce(self, meta: TaskMeta, entry: CacheEntry) -> None:
        if meta.length >= 0 and entry.length >= 0 and meta.length != entry.length:
            raise errors.OriginChanged(f"origin length changed from {meta.length} to {entry.length}")
        if meta.piece_size and meta.piece_size != entry.piece_size and meta.length >= 0:
            raise errors.OriginChanged("piece size changed under the task")
        await self.repo.set_meta(
            meta.task_id, status="fetching", length=entry.length, piece_size=entry.piece_size,
            piece_count=piece_count(entry.length, entry.piece_size), cdn=self.sn_id,
        )
        if entry.digests:
            await self.repo.publish_pieces(meta.task_id, self.sn_id, sorted(entry.digests.items()))

    async def _revalidate(self, meta: TaskMeta, entry: CacheEntry, headers: dict[str, str],
                          published: dict[int, str]) -> bool:
        """A complete cached file is reused only if the origin says it did not change
        (304) and every piece still hashes to its recorded digest."""
        h = dict(headers)
        if entry.etag:
            h["If-None-Match"] = entry.etag
        if entry.last_modified:
            h["If-Modified-Since"] = entry.last_modified
        resp = await self.origin.open(meta.url, h)
        status = resp.status
        resp.release()
        if status != 304:
            return False
        count = piece_count(entry.length, entry.piece_size)
        ok = await asyncio.to_thread(self._verify_file, entry, count)
        if not ok or any(published.get(n, d) != d for n, d in entry.digests.items()):
            log.warning("task %s: cached file failed re-verification; refetching", meta.task_id[:12])
            self.cache.remove(meta.task_id)
            return False
        self.cache.adopt(entry)
        await self._announce(meta, entry)
        await self._finish(meta, entry, count)
        log.info("task %s: reused cached file after revalidation", meta.task_id[:12])
        return True

    def _trusted_prefix(self, entry: CacheEntry) -> int:
        """Re-hash the recorded prefix of a partial file; keep only what still matches
        (the sidecar may be ahead of what reached the disk before a crash)."""
        n = entry.verified_prefix()
        try:
            fd = os.open(self.cache.data_path(entry.task_id), os.O_RDONLY)
        except OSError:
            entry.digests.clear()
            return 0
        try:
            good = 0
            while good < n and _hash_range(fd, good * entry.piece_size, entry.piece_size) == entry.digests[good]:
                good += 1
        finally:
            os.close(fd)
        entry.digests = {k: v for k, v in entry.digests.items() if k < good}
        return good

    def _verify_file(self, entry: CacheEntry, count: int) -> bool:
        try:
            fd = os.open(self.cache.data_path(entry.task_id), os.O_RDONLY)
        except OSError:
            return False
        try:
            for n in range(count):
                size = min(entry.piece_size, entry.length - n * entry.piece_size)
                if entry.digests.get(n) != _hash_range(fd, n * entry.piece_size, size):
                    return False
            return True
        finally:
            os.close(fd)

    async def _stream(self, meta: TaskMeta, entry: CacheEntry, resp: Any, start: int,
                      published: dict[int, str]) -> None:
        ps = entry.piece_size
        path = self.cache.data_path(meta.task_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        pipe: _PiecePipe | None = None
        try:
            if entry.length >= 0:
                os.ftruncate(fd, entry.length)
            pipe = _PiecePipe(self, meta.task_id, entry, fd, published)
            # Chunks go on as aiohttp received them (no joining), in batches of about
            # BATCH bytes, each hashed and written in a worker while the next arrives:
            # a bytearray grown, sliced and shifted per piece cost three copies of every
            # byte on the event loop, and hashing a whole piece at its end read it back
            # from memory long after it had left the CPU caches.
            batch: list[bytes] = []
            batched = in_piece = 0
            piece = start
            received = start * ps
            window_start, window_bytes = time.monotonic(), 0
            async for chunk in resp.content.iter_any():
                size = len(chunk)
                received += size
                if entry.length >= 0 and received > entry.length:
                    raise errors.OriginLongBody("origin sent more bytes than its Content-Length")
                if entry.length < 0 and received > self.settings.max_file_size:
                    raise errors.OriginTooLarge("chunked origin body exceeds the maximum file size")
                self.bytes_fetched += size
                window_bytes += size
                while chunk:
                    room = ps - in_piece
                    head, chunk = (chunk[:room], chunk[room:]) if len(chunk) > room else (chunk, b"")
                    batch.append(head)
                    batched += len(head)
                    in_piece += len(head)
                    if in_piece == ps or batched >= BATCH:
                        await pipe.add(piece, piece * ps + in_piece - batched, batch)
                        batch, batched = [], 0
                    if in_piece == ps:
                        await pipe.end_piece(piece)
                        piece, in_piece = piece + 1, 0
                if not self.throttle.unlimited:
                    await self.throttle.consume(size)
                elapsed = time.monotonic() - window_start
                if elapsed >= self.settings.rate_window:
                    if window_bytes / elapsed < self.settings.min_rate:
                        raise errors.OriginUnavailable("origin is slower than the minimum rate")
                    window_start, window_bytes = time.monotonic(), 0
            if entry.length >= 0 and received < entry.length:
                raise errors.OriginShortBody(f"origin sent {received} of {entry.length} bytes")
            if in_piece:
                if batch:
                    await pipe.add(piece, piece * ps + in_piece - batched, batch)
                await pipe.end_piece(piece)
                piece += 1
            pipe = None
            if entry.length < 0:
                entry.length = received
                await self.repo.set_meta(meta.task_id, length=received, piece_count=piece)
            os.fsync(fd)
        finally:
            if pipe is not None:
                await pipe.settle()  # never close the fd under a write
            os.close(fd)
        await self._finish(meta, entry, piece_count(entry.length, ps))

    async def _finish(self, meta: TaskMeta, entry: CacheEntry, count: int) -> None:
        entry.complete = True
        self.cache.save(entry)
        await self.repo.set_meta(
            meta.task_id, status="success", length=entry.length, piece_count=count,
            file_digest=file_digest(entry.digests, count), cdn=self.sn_id,
        )
        log.info("task %s: CDN has %s (%d bytes, %d pieces)", meta.task_id[:12],
                 redact_url(meta.url), entry.length, count)


class _PiecePipe:
    """Hash + write a piece batch by batch in a worker thread while the loop reads on (one
    batch in the thread at a time, so a piece's hasher sees its bytes in order); publish
    each piece as it ends."""

    def __init__(self, cdn: Cdn, task_id: str, entry: CacheEntry, fd: int, published: dict[int, str]) -> None:
        self.cdn, self.task_id, self.entry, self.fd, self.published = cdn, task_id, entry, fd, published
        self.pending: asyncio.Future[None] | None = None
        self.piece = -1
        self.hasher: Any = None
        self.last_save = time.monotonic()

    async def add(self, piece: int, offset: int, chunks: list[bytes]) -> None:
        await self._wait()
        if piece != self.piece:
            self.piece, self.hasher = piece, digest.new()
        loop = asyncio.get_running_loop()
        self.pending = loop.run_in_executor(None, _write_and_hash, self.fd, self.hasher, offset, chunks)

    async def _wait(self) -> None:
        if self.pending is not None:
            p, self.pending = self.pending, None
            await p

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
        await self.cdn.repo.publish_pieces(self.task_id, self.cdn.sn_id, [(n, d)])
        if time.monotonic() - self.last_save > 1.0:
            self.last_save = time.monotonic()
            await asyncio.to_thread(self.cdn.cache.save, self.entry)
