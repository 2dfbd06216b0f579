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
import dataclasses
import hashlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from common import digest, errors
from common.pieces import DEFAULT_PIECE_SIZE, piece_count, piece_size_for
from common.ranges import RangeSyntaxError, parse_content_range
from common.taskid import is_content_identifier, redact_url
from supernode.store import keys
from supernode.store.repo import Repo, TaskMeta, now_ms
from supernode.tasks import TaskOwner, cancel_and_wait

from . import takeover
from .cache import CacheEntry, PieceCache
from .origin import OriginClient, validators
from .repair import CacheRepair
from .throttle import Throttle

log = logging.getLogger("supernode.cdn")
T = TypeVar("T")
BATCH = 1 << 20  # bytes of a piece handed to the hashing/writing thread at once


@dataclass(frozen=True)
class CdnSettings:
    max_file_size: int = 64 << 30
    min_rate: int = 64 << 10  # bytes/s averaged over `rate_window`
    rate_window: float = 30.0
    max_fetches: int = 16
    lease_ttl_ms: int = keys.LEASE_TTL_MS
    store_wait: float = 15.0  # how long a fetch rides out a store outage before pausing


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


def _sha256_file(path: os.PathLike[str] | str, length: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = length
        while left > 0 and (chunk := f.read(min(left, 1 << 20))):
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


def _hash_range(fd: int, offset: int, size: int) -> str:
    return digest.of(os.pread(fd, size, offset))


class _NoResume(Exception):
    """The origin would not continue the same version with a Range."""


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
        self.running = TaskOwner(log)  # task id -> its fetch
        self._watchers = TaskOwner(log)  # task id -> the watcher of its lease or seed
        self._seed_checked: dict[str, float] = {}
        self._slots = asyncio.Semaphore(settings.max_fetches)
        self.bytes_fetched = 0
        self.repair = CacheRepair(self)
        self.copier = takeover.PeerCopier(repo, origin.policy, settings.min_rate)
        # task id -> credential headers of its registrations (memory only, see api.open_task)
        self.credentials: dict[str, dict[str, str]] = {}

    def remember_credentials(self, task_id: str, headers: dict[str, str]) -> None:
        """The latest registration's credentials for the origin fetch of this task (kept
        until the fetch here ends; a fetch taken over by another supernode has none)."""
        if headers:
            self.credentials[task_id] = headers
            if len(self.credentials) > 10_000:  # bounded: drop the oldest
                self.credentials.pop(next(iter(self.credentials)))

    def origin_headers(self, meta: TaskMeta) -> dict[str, str]:
        h = dict(meta.headers)
        h.update(self.credentials.get(meta.task_id, {}))
        return h

    async def ensure(self, meta: TaskMeta) -> None:
        """Start the fetch here if the task needs one and nobody holds its lease; if
        another supernode holds it, watch the lease so the fetch is taken over the
        moment it expires (its holder died) rather than at some later pull."""
        tid = meta.task_id
        if meta.status == "failed" or tid in self.running:
            return
        if meta.status == "success" and not await self._seed_gone(meta):
            if meta.cdn and meta.cdn != self.sn_id and len(self._watchers) < 1000:
                self._watch(tid, lambda: self._watch_seed(tid, meta.cdn))
            return
        if not await self.repo.take_lease(tid, self.sn_id, self.settings.lease_ttl_ms):
            # Our own lease from before a restart (same home, same id) is ours to resume.
            if await self.repo.lease_holder(tid) != self.sn_id:
                self._watch(tid, lambda: self._watch_lease(tid))
                return
        self._start(tid)

    async def _seed_gone(self, meta: TaskMeta, *, fresh: bool = False) -> bool:
        """A finished task whose CDN copy is on no live supernode: its supernode's liveness
        record expired (it died), or it is us without the file (an emptied cache). At
        most one Redis look-up per task a second."""
        now = time.monotonic()
        if not fresh and now - self._seed_checked.get(meta.task_id, -10.0) < 1.0:
            return False
        if len(self._seed_checked) > 10_000:
            self._seed_checked.clear()
        self._seed_checked[meta.task_id] = now
        if meta.cdn == self.sn_id:
            return meta.task_id not in self.cache.entries
        return not meta.cdn or await self.repo.supernode_address(meta.cdn) is None

    def _start(self, task_id: str) -> None:
        if task_id in self.running:
            return  # another registration in this process started it while we awaited
        self.running.start(task_id, self._run(task_id), name=f"cdn-{task_id[:12]}")

    def _watch(self, task_id: str, watcher: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if task_id not in self._watchers:
            self._watchers.start(task_id, watcher(), name=f"watch-{task_id[:12]}")

    async def _watch_seed(self, task_id: str, cdn: str) -> None:
        """One look when the seed's liveness record would expire: if it did (the seed
        died) and the finished task still names it, seed the task here. One-shot: the
        next idle pull arms it again."""
        with contextlib.suppress(errors.StoreError):
            left = await self.repo.supernode_ttl_ms(cdn)
            await asyncio.sleep(min(max(left, 0), 300_000) / 1000 + 0.05)
            meta = await self.repo.get_meta(task_id)
            if (meta is not None and meta.status == "success" and meta.cdn == cdn
                    and task_id not in self.running and await self._seed_gone(meta, fresh=True)
                    and await self.repo.take_lease(task_id, self.sn_id, self.settings.lease_ttl_ms)):
                self._start(task_id)

    async def _watch_lease(self, task_id: str) -> None:
        """Sleep until the holder's lease would expire, then try to take it; ends when
        the task is finished, failed, gone or fetched here."""
        while True:
            try:
                left = await self.repo.lease_ttl_ms(task_id)
                await asyncio.sleep(max(left, 0) / 1000 + 0.05)
                meta = await self.repo.get_meta(task_id)
                if meta is None or meta.status in ("success", "failed") or task_id in self.running:
                    return
                if await self.repo.take_lease(task_id, self.sn_id, self.settings.lease_ttl_ms):
                    log.info("task %s: the fetch's lease expired; taking it over", task_id[:12])
                    self._start(task_id)
                    return
            except errors.StoreError:
                await asyncio.sleep(1.0)  # Redis blip: try again, the task is still unfinished

    async def close(self) -> None:
        await self.repair.close()
        await self._watchers.close()  # first: a watcher may start a fetch
        await self.running.close()

    async def _run(self, task_id: str) -> None:
        keeper = asyncio.create_task(self._keep_lease(task_id, asyncio.current_task()))
        try:
            async with self._slots:
                await self._patiently(f"task {task_id[:12]}: fetch", lambda: self._fetch_current(task_id))
        except errors.StoreError as exc:
            # Redis being away says nothing about the origin: the task must not fail for
            # it. The fetch stops here; the next registration or waiting pull starts it
            # again, resuming from the cache (Range) or revalidating a complete file.
            log.warning("task %s: fetch paused, store unavailable (%s)", task_id[:12], exc.message)
        except errors.DfError as exc:
            log.warning("task %s failed: %s (%s)", task_id[:12], exc.message, exc.code)
            await self._fail(task_id, exc)
        except asyncio.CancelledError:
            raise
        except OSError as exc:
            if isinstance(exc, aiohttp.ClientError):  # a connection error that slipped through
                err: errors.DfError = errors.OriginUnavailable(f"origin transfer failed: {exc}")
            else:  # the piece cache: disk full, I/O error, permissions
                err = errors.CdnStorageError(f"cannot write the piece cache: {exc.strerror or exc}")
            log.warning("task %s failed: %s (%s)", task_id[:12], err.message, err.code)
            await self._fail(task_id, err)
        except Exception as exc:
            log.exception("task %s: unexpected fetch failure", task_id[:12])
            await self._fail(task_id, errors.TaskFailed(f"internal error: {type(exc).__name__}"))
        finally:
            await cancel_and_wait(keeper)
            self.credentials.pop(task_id, None)
            entry = self.cache.entries.get(task_id)
            if entry is not None:
                with contextlib.suppress(OSError):
                    await asyncio.to_thread(self.cache.save, entry)
            with contextlib.suppress(errors.DfError):
                await self.repo.keep_lease(task_id, self.sn_id, 0)

    async def _fetch_current(self, task_id: str) -> None:
        """The fetch as the store sees the task now (tried again after a store outage,
        it resumes from the cache: Range for a partial file, revalidation for a whole one)."""
        meta = await self.repo.get_meta(task_id)
        if meta is None or meta.status == "failed" or (
                meta.status == "success" and not await self._seed_gone(meta, fresh=True)):
            return
        if meta.status == "success":
            log.warning("task %s: its CDN copy is gone (supernode %s); seeding it here",
                        task_id[:12], meta.cdn[:8])
        await self._fetch(meta)

    async def _patiently(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Retry a store write the fetch cannot go on without through a short outage
        (a Redis restart); StoreError once `store_wait` is over."""
        deadline = time.monotonic() + self.settings.store_wait
        delay = 0.1
        while True:
            try:
                return await fn()
            except errors.StoreError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("%s: %s; retrying in %.1f s", what, exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _fail(self, task_id: str, exc: errors.DfError) -> None:
        with contextlib.suppress(errors.DfError):
            await self.repo.set_meta(
                task_id, status="failed", error=exc.code, error_message=exc.message, failed_ms=now_ms()
            )
        if isinstance(exc, (errors.OriginChanged, errors.OriginShortBody, errors.OriginLongBody,
                            errors.CdnStorageError)):
            self.cache.remove(task_id)  # (a partial file on a full disk only blocks others)

    async def _keep_lease(self, task_id: str, owner: asyncio.Task[Any] | None) -> None:
        period = self.settings.lease_ttl_ms / 3000
        while True:
            await asyncio.sleep(period)
            try:
                ttl = self.settings.lease_ttl_ms
                # a renewal that came late (a stalled loop, a Redis blip longer than the
                # TTL) may take back a lease nobody else took: no one else is fetching
                ok = (await self.repo.keep_lease(task_id, self.sn_id, ttl)
                      or await self.repo.take_lease(task_id, self.sn_id, ttl))
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
        headers = self.origin_headers(meta)
        if meta.range:
            headers["Range"] = meta.range
            entry = None  # ranged tasks are refetched whole; their validators are per range
        start = 0
        if entry is not None and (entry.etag or entry.last_modified) and entry.complete:
            if await self._revalidate(meta, entry, headers, published):
                return
        if published and not meta.range:
            partial = entry if entry is not None and not entry.complete else None
            if await self._take_over(meta, partial, published):
                return
        if entry is not None and (entry.etag or entry.last_modified) and not entry.complete:
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
            except (TimeoutError, aiohttp.ClientError, errors.OriginShortBody, errors.OriginUnavailable) as exc:
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
            raise errors.OriginTooLarge(
                f"origin file of {length} bytes exceeds the {self.settings.max_file_size} limit")
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
        etag, _lm = validators(resp)
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
            # the validators let another supernode resume this fetch with If-Range
            etag=entry.etag, last_modified=entry.last_modified,
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
                      published: dict[int, str], *, stop: int | None = None, finish: bool = True) -> None:
        """Pieces from `start` on (up to `stop`, exclusive, for a ranged run) out of `resp`."""
        ps = entry.piece_size
        end = entry.length if stop is None else min(stop * ps, entry.length)
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
                if entry.length >= 0 and received > end:
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
            if entry.length >= 0 and received < end:
                raise errors.OriginShortBody(f"origin sent {received} of {end} bytes")
            if in_piece:
                if batch:
                    await pipe.add(piece, piece * ps + in_piece - batched, batch)
                await pipe.end_piece(piece)
                piece += 1
            await pipe.flush()
            pipe = None
            if entry.length < 0:
                entry.length = received
                await self.repo.set_meta(meta.task_id, length=received, piece_count=piece)
            await asyncio.to_thread(os.fsync, fd)
        finally:
            if pipe is not None:
                await pipe.settle()  # never close the fd under a write
            os.close(fd)
        if finish:
            await self._finish(meta, entry, piece_count(entry.length, ps))

    # --- taking over a fetch another supernode left unfinished --------------------------
    async def _take_over(self, meta: TaskMeta, entry: CacheEntry | None, published: dict[int, str]) -> bool:
        """Finish a fetch whose pieces were partly published by someone else (a dead
        supernode, or this one before a restart): pieces already here stay, pieces live
        peers hold are copied from them (checked against the published digest), and only
        the rest comes from the origin, as Range + If-Range runs. False when that cannot
        be done safely (no validator, unknown length) or is not needed (everything
        published is here): the caller then fetches as usual."""
        tid, length, ps = meta.task_id, meta.length, meta.piece_size
        if length <= 0 or ps <= 0:
            return False
        etag, lm = await self.repo.origin_validators(tid)
        same = entry is not None and (entry.length, entry.piece_size) == (length, ps) and (
            not (etag or lm) or (entry.etag, entry.last_modified) == (etag, lm))
        if same and entry is not None and not (etag or lm):
            etag, lm = entry.etag, entry.last_modified
        if not (etag or lm):
            return False  # a Range without If-Range could splice two versions of the file
        if same and entry is not None and set(published) <= set(entry.digests):
            return False  # our own partial copy has it all: a plain resume
        path = self.cache.data_path(tid)
        have = await asyncio.to_thread(takeover.trusted_pieces, path, entry, published) if same and entry else {}
        if not same:
            self.cache.remove(tid)
            entry = self.cache.create(tid)
            entry.length, entry.piece_size, entry.etag, entry.last_modified = length, ps, etag, lm
        assert entry is not None
        entry.digests, entry.complete = have, False
        await asyncio.to_thread(takeover.allocate, path, length)
        self.cache.adopt(entry)
        if not await self.repo.adopt_cdn(tid, self.sn_id, sorted(have.items())):
            return True  # finished, failed or deleted meanwhile: nothing left to fetch
        count = piece_count(length, ps)
        missing = [n for n in range(count) if n not in have]
        sources = await self.copier.sources(tid, [n for n in missing if n in published])
        direct = [n for n in missing if n not in sources]
        log.info("task %s: taking over the fetch: %d pieces here, %d to copy from peers, %d from the origin",
                 tid[:12], len(have), len(sources), len(direct))
        peers0, origin0 = self.copier.bytes_copied, self.bytes_fetched
        assert self.origin.session is not None
        copier = asyncio.create_task(self.copier.copy(self.origin.session, tid, entry, path, sources,
                                                      published, self.sn_id))
        try:
            for a, b in takeover.runs(direct):
                await self._fetch_run(meta, entry, a, b, published)
            left = await copier
            for a, b in takeover.runs(left):
                await self._fetch_run(meta, entry, a, b, published)
        except _NoResume as exc:
            log.warning("task %s: %s; fetching the whole file again", tid[:12], exc)
            with contextlib.suppress(errors.StoreError):
                await self.repo.adopt_cdn(tid, self.sn_id, [])
            return False
        finally:
            await cancel_and_wait(copier)
        if len(entry.digests) < count:
            raise errors.TaskFailed("internal error: pieces missing after a takeover")
        await self._finish(meta, entry, count)
        log.info("task %s: takeover done: %d bytes copied from peers, %d fetched from the origin",
                 tid[:12], self.copier.bytes_copied - peers0, self.bytes_fetched - origin0)
        return True

    async def _fetch_run(self, meta: TaskMeta, entry: CacheEntry, a: int, b: int,
                         published: dict[int, str]) -> None:
        """Pieces [a, b) from the origin with Range + If-Range; a broken transfer resumes
        inside the run."""
        ps, attempt = entry.piece_size, 0
        while True:
            first = next((n for n in range(a, b) if n not in entry.digests), None)
            if first is None:
                return
            lo, hi = first * ps, min(b * ps, entry.length) - 1
            h = self.origin_headers(meta)
            h["Range"], h["If-Range"] = f"bytes={lo}-{hi}", entry.etag or entry.last_modified
            resp = await self.origin.open(meta.url, h)
            try:
                if resp.status != 206:
                    raise _NoResume(f"origin answered {resp.status} to a resuming Range")
                self._check_resume(resp, entry, first)  # the body's length is checked as it streams
                await self._stream(meta, entry, resp, first, published, stop=b, finish=False)
                return
            except (TimeoutError, aiohttp.ClientError, errors.OriginShortBody, errors.OriginUnavailable) as exc:
                attempt += 1
                if attempt > self.origin.settings.retries:
                    raise self._translate(exc, meta) from None
                await asyncio.sleep(self.origin.settings.backoff * attempt)
            finally:
                resp.release()

    async def _finish(self, meta: TaskMeta, entry: CacheEntry, count: int) -> None:
        if is_content_identifier(meta.identifier):
            # The task is named by the digest of its bytes (a registry blob): a URL that
            # served other bytes must not poison the task for every URL sharing the digest.
            want = meta.identifier.split(":", 1)[1]
            got = await asyncio.to_thread(_sha256_file, self.cache.data_path(meta.task_id), entry.length)
            if got != want:
                self.cache.remove(meta.task_id)
                raise errors.ContentDigestMismatch(
                    f"{redact_url(meta.url)} sent bytes hashing to sha256:{got}, not {meta.identifier}")
        entry.complete = True
        await asyncio.to_thread(self.cache.save, entry)
        fields: dict[str, object] = dict(
            status="success", length=entry.length, piece_size=entry.piece_size, piece_count=count,
            file_digest=file_digest(entry.digests, count), cdn=self.sn_id)
        await self._patiently(f"task {meta.task_id[:12]}: recording success", lambda: self.repo.finish_task(
            meta.task_id, self.sn_id, fields, sorted(entry.digests.items())))
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
        self.unpublished: list[tuple[int, str]] = []

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

    async def flush(self) -> None:
        """Publish what a store outage held back (bounded wait, then StoreError)."""
        if self.unpublished:
            pieces = self.unpublished
            await self.cdn._patiently(f"task {self.task_id[:12]}: publishing pieces",
                                      lambda: self.cdn.repo.publish_pieces(self.task_id, self.cdn.sn_id, pieces))
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
            await self.cdn.repo.publish_pieces(self.task_id, self.cdn.sn_id, self.unpublished)
            self.unpublished = []
        except errors.StoreError as exc:
            # keep fetching through a store outage; these go out with the next piece
            log.info("task %s: cannot publish %d pieces yet: %s", self.task_id[:12],
                     len(self.unpublished), exc.message)
        if time.monotonic() - self.last_save > 1.0:
            self.last_save = time.monotonic()
            # a copy: a takeover's peer copier adds digests on the loop meanwhile
            snap = dataclasses.replace(self.entry, digests=dict(self.entry.digests))
            await asyncio.to_thread(self.cdn.cache.save, snap)
