"""The CDN: fetch each task's file from its origin once, cluster-wide, into the piece
cache, hashing every piece on the way and publishing it the moment it is on disk.

`Cdn.ensure` starts a fetch where a task needs one and this supernode holds its lease
(exactly-once: lease.py); a fetch rides out short store outages and records its failure
in the task. The bytes go through the piece pipe (pipe.py).
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
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from common import errors
from common.pieces import DEFAULT_PIECE_SIZE, piece_count, piece_size_for
from common.taskid import is_content_identifier, redact_url
from supernode.store import keys
from supernode.store.repo import Repo, TaskMeta, now_ms
from supernode.tasks import TaskOwner, cancel_and_wait

from . import imports, parallel, takeover
from .cache import CacheEntry, PieceCache
from .lease import Leases
from .origin import OriginClient, validators
from .pipe import BATCH, PiecePipe, sha256_file
from .repair import CacheRepair
from .resume import NoResume, check_resume, trusted_prefix, verify_file
from .throttle import Throttle

log = logging.getLogger("supernode.cdn")
T = TypeVar("T")


@dataclass(frozen=True)
class CdnSettings:
    max_file_size: int = 64 << 30
    min_rate: int = 64 << 10  # bytes/s averaged over `rate_window`
    rate_window: float = 30.0
    max_fetches: int = 16
    lease_ttl_ms: int = keys.LEASE_TTL_MS
    store_wait: float = 15.0  # how long a fetch rides out a store outage before pausing
    origin_parallel: int = 1  # Range requests at once for one file (parallel.py)


def file_digest(digests: dict[int, str], count: int) -> str:
    """Digest of the whole file: sha256 over its piece digests in order (each piece is
    itself sha256-verified, so this pins the whole content without a second pass)."""
    h = hashlib.sha256()
    for n in range(count):
        h.update(digests[n].encode())
        h.update(b"\n")
    return h.hexdigest()


class Cdn:
    """This supernode's CDN: the fetches running here (`running`), the leases it holds
    or watches (`leases`), the repair of bad cached pieces and the takeover's peer copier."""

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
        self.leases = Leases(repo, cache, sn_id, settings.lease_ttl_ms, self.running, self._start)
        self._slots = asyncio.Semaphore(settings.max_fetches)
        self.bytes_fetched = 0
        self.repair = CacheRepair(self)
        self.imports = imports.Imports()  # dfget import: claims to check on the importer's bytes
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
        if meta.status == "success" and not await self.leases.seed_gone(meta):
            if meta.cdn and meta.cdn != self.sn_id and len(self.leases.watchers) < 1000:
                self.leases.watch(tid, lambda: self.leases.watch_seed(tid, meta.cdn))
            return
        if not await self.repo.take_lease(tid, self.sn_id, self.settings.lease_ttl_ms):
            # Our own lease from before a restart (same home, same id) is ours to resume.
            if await self.repo.lease_holder(tid) != self.sn_id:
                self.leases.watch(tid, lambda: self.leases.watch_lease(tid))
                return
        self._start(tid)

    def _start(self, task_id: str) -> None:
        if task_id in self.running:
            return  # another registration in this process started it while we awaited
        self.running.start(task_id, self._run(task_id), name=f"cdn-{task_id[:12]}")

    async def close(self) -> None:
        await self.repair.close()
        await self.leases.close()  # first: a watcher may start a fetch
        await self.running.close()

    async def _run(self, task_id: str) -> None:
        keeper = asyncio.create_task(self.leases.keep(task_id, asyncio.current_task()))
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
                meta.status == "success" and not await self.leases.seed_gone(meta, fresh=True)):
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

    # --- the fetch ------------------------------------------------------------------
    async def _fetch(self, meta: TaskMeta) -> None:
        tid = meta.task_id
        if tid in self.imports.claims or imports.is_import(meta):
            await self.imports.fetch(self, meta)  # no origin: the importer's peer server
            return
        published = await self.repo.digests(tid)
        entry = self.cache.load(tid)
        if entry is not None and entry.digest_algo != meta.digest_algo:
            # a copy kept from an earlier task of this id, hashed another way: its
            # digests would contradict the task's, so it is fetched again
            self.cache.remove(tid)
            entry = None
        headers = self.origin_headers(meta)
        if meta.range:
            headers["Range"] = meta.range
            entry = None  # ranged tasks are refetched whole; their validators are per range
        start = 0
        if entry is not None and entry.complete and not meta.range and is_content_identifier(meta.identifier):
            if await self._reuse_content(meta, entry, published):
                return
        if entry is not None and (entry.etag or entry.last_modified) and entry.complete:
            if await self._revalidate(meta, entry, headers, published):
                return
        if published and not meta.range:
            partial = entry if entry is not None and not entry.complete else None
            if await takeover.take_over(self, meta, partial, published):
                return
        if entry is not None and (entry.etag or entry.last_modified) and not entry.complete:
            start = await asyncio.to_thread(trusted_prefix, self.cache.data_path(entry.task_id), entry)
        attempt = 0
        first = None
        if self.settings.origin_parallel > 1 and start == 0 and not meta.range:
            done, first = await parallel.fetch(self, meta, headers, published)
            if done:
                return
        while True:
            resp = first if first is not None else await self._open(meta, entry, headers, start)
            first = None
            try:
                if resp.status == 206 and not meta.range and start > 0:
                    entry = check_resume(resp, entry, start)
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
        entry = self.cache.create(meta.task_id, meta.digest_algo)
        entry.length = length
        entry.piece_size = piece_size_for(length) if length >= 0 else DEFAULT_PIECE_SIZE
        entry.etag, entry.last_modified = validators(resp)
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
        ok = await asyncio.to_thread(verify_file, self.cache.data_path(entry.task_id), entry, count)
        if not ok or any(published.get(n, d) != d for n, d in entry.digests.items()):
            log.warning("task %s: cached file failed re-verification; refetching", meta.task_id[:12])
            self.cache.remove(meta.task_id)
            return False
        self.cache.adopt(entry)
        await self._announce(meta, entry)
        await self.finish_fetch(meta, entry, count)
        log.info("task %s: reused cached file after revalidation", meta.task_id[:12])
        return True

    async def _reuse_content(self, meta: TaskMeta, entry: CacheEntry, published: dict[int, str]) -> bool:
        """A complete cached file of a content-addressed task (an upload, or an earlier
        fetch) needs no origin: its bytes are checked against the digest that names the
        task (finish_fetch) and its pieces against their recorded digests."""
        count = piece_count(entry.length, entry.piece_size)
        ok = await asyncio.to_thread(verify_file, self.cache.data_path(entry.task_id), entry, count)
        if not ok or any(published.get(n, d) != d for n, d in entry.digests.items()):
            log.warning("task %s: cached file failed re-verification; fetching it", meta.task_id[:12])
            self.cache.remove(meta.task_id)
            return False
        self.cache.adopt(entry)
        await self._announce(meta, entry)
        await self.finish_fetch(meta, entry, count)
        log.info("task %s: served from the cache by its content digest", meta.task_id[:12])
        return True

    async def _stream(self, meta: TaskMeta, entry: CacheEntry, resp: Any, start: int,
                      published: dict[int, str], *, stop: int | None = None, finish: bool = True) -> None:
        """Pieces from `start` on (up to `stop`, exclusive, for a ranged run) out of `resp`."""
        ps = entry.piece_size
        end = entry.length if stop is None else min(stop * ps, entry.length)
        path = self.cache.data_path(meta.task_id)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        pipe: PiecePipe | None = None
        try:
            if entry.length >= 0:
                os.ftruncate(fd, entry.length)
            pipe = PiecePipe(self.repo, self.sn_id, self.cache, self._patiently, meta.task_id, entry, fd, published)
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
            await self.finish_fetch(meta, entry, piece_count(entry.length, ps))

    async def fetch_run(self, meta: TaskMeta, entry: CacheEntry, a: int, b: int,
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
                    raise NoResume(f"origin answered {resp.status} to a resuming Range")
                check_resume(resp, entry, first)  # the body's length is checked as it streams
                await self._stream(meta, entry, resp, first, published, stop=b, finish=False)
                return
            except (TimeoutError, aiohttp.ClientError, errors.OriginShortBody, errors.OriginUnavailable) as exc:
                attempt += 1
                if attempt > self.origin.settings.retries:
                    raise self._translate(exc, meta) from None
                await asyncio.sleep(self.origin.settings.backoff * attempt)
            finally:
                resp.release()

    async def finish_fetch(self, meta: TaskMeta, entry: CacheEntry, count: int) -> None:
        """The whole file is here: check it against a content identifier, mark the cache
        entry complete and record success with every digest (store outages ridden out)."""
        got = await asyncio.to_thread(sha256_file, self.cache.data_path(meta.task_id), entry.length)
        if is_content_identifier(meta.identifier):
            # The task is named by the digest of its bytes (a registry blob): a URL that
            # served other bytes must not poison the task for every URL sharing the digest.
            want = meta.identifier.split(":", 1)[1]
            if got != want:
                self.cache.remove(meta.task_id)
                raise errors.ContentDigestMismatch(
                    f"{redact_url(meta.url)} sent bytes hashing to sha256:{got}, not {meta.identifier}")
        entry.complete = True
        # one copy on disk per content: a task with bytes another task has shares its blob
        await asyncio.to_thread(self.cache.share, entry, got)
        fields: dict[str, object] = dict(
            status="success", length=entry.length, piece_size=entry.piece_size, piece_count=count,
            file_digest=file_digest(entry.digests, count), cdn=self.sn_id, content=got)
        await self._patiently(f"task {meta.task_id[:12]}: recording success", lambda: self.repo.finish_task(
            meta.task_id, self.sn_id, fields, sorted(entry.digests.items())))
        log.info("task %s: CDN has %s (%d bytes, %d pieces)", meta.task_id[:12],
                 redact_url(meta.url), entry.length, count)
