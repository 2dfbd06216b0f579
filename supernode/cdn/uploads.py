"""Resumable chunked uploads into the CDN piece cache (issue 13, item 3).

An upload session receives a file whose sha256 the client declared, chunk by chunk, each
chunk at exactly the session's current offset (a chunk at any other offset is refused,
never merged), into a spool file under `<home>/uploads/`. A chunk is all or nothing: its
bytes are written and hashed on copies of the session's hash states, fsync'ed, and only
then does the offset move (a chunk cut off midway leaves the offset where it was). The
whole-file sha256 and the piece digests are computed as the chunks arrive, so the commit
needs no second pass: when every byte is in, the digest must equal the declared one, and
the spool file is renamed into the piece cache as the complete entry of the task named by
that digest (`task_id("", identifier=digest)`), so a registration of the digest with any
URL is served from the cache without the origin. A mismatch fails the session and frees
its space; nothing enters the cache.

Sessions live in this supernode's memory (the spool file is on its disk): a client must
resume against the supernode that created its session, and a restart of the supernode
forgets every session (the client starts again). Idle sessions expire after the TTL.
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
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from common import digest, errors
from common.pieces import piece_count, piece_size_for
from common.taskid import is_content_identifier, is_short_id, new_id, task_id
from supernode.store.repo import Repo

from .cache import CacheEntry, PieceCache


class Host(Protocol):
    """What the uploads use of the supernode (supernode.state.SupernodeState; a Protocol,
    so that the CDN layer does not import the layer above it): the cache, the CDN's
    running fetches, the store, the metrics registry, the settings and its id."""

    cache: PieceCache
    cdn: Any
    repo: Repo
    metrics: Any
    settings: Any
    sn_id: str

log = logging.getLogger("supernode.uploads")
MAX_CHUNK = 64 << 20  # bytes of one PATCH body
READ_SIZE = 1 << 20  # bytes read from the request and written at a time
SPOOL_DIR = "uploads"
PENDING = "upload-pending"  # a session until every byte is in and the digest is verified

Reader = Callable[[int], Awaitable[bytes]]


@dataclass(frozen=True)
class UploadLimits:
    ttl: float = 3600.0  # a session with no chunk this long expires
    max_sessions: int = 16  # sessions pending at once on this supernode
    max_size: int = 64 << 30  # the largest declared length
    max_chunk: int = MAX_CHUNK
    read_timeout: float = 10.0  # a chunk's body silent this long fails the chunk


def upload_error(cls: type[errors.DfError], code: str, message: str, *, status: int | None = None,
                 **detail: object) -> errors.DfError:
    """An error of the tree with a finer wire code (and status) for the upload API."""
    exc = cls(message, detail=dict(detail) if detail else None)
    exc.code = code
    if status is not None:
        exc.status = status
    return exc


def check_digest(digest: object) -> str:
    if not isinstance(digest, str) or not is_content_identifier(digest):
        raise upload_error(errors.BadRequest, "bad_digest", "digest must be sha256:<64 lower-case hex digits>")
    return digest


def check_session_id(sid: str) -> str:
    if not is_short_id(sid):
        raise upload_error(errors.NotFound, "unknown_upload", "unknown upload session")
    return sid


class Session:
    """One upload. Fields change only under `lock` (one chunk at a time)."""

    def __init__(self, sid: str, digest: str, length: int, path: Path) -> None:
        self.id = sid
        self.digest = digest
        self.length = length
        self.path = path
        self.task_id = task_id("", identifier=digest)
        self.piece_size = piece_size_for(length)
        self.offset = 0
        self.state = PENDING  # -> committed | failed | cancelled | expired
        self.whole = hashlib.sha256()
        self.piece = hashlib.sha256()
        self.digests: dict[int, str] = {}
        self.touched = time.monotonic()
        self.lock = asyncio.Lock()

    def info(self, ttl: float) -> dict[str, Any]:
        return {"id": self.id, "state": self.state, "digest": self.digest, "task_id": self.task_id,
                "length": self.length, "offset": self.offset, "piece_size": self.piece_size,
                "expires_in": max(0, round(ttl - (time.monotonic() - self.touched), 1))}


def _write_all(fd: int, offset: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _absorb(fd: int, offset: int, data: bytes, whole: Any, piece: Any, digests: dict[int, str],
            piece_size: int) -> Any:
    """Write `data` at `offset` and feed it to the hash states (in a worker thread). A
    finished piece's digest goes to `digests`; returns the hash state of the piece in
    progress."""
    _write_all(fd, offset, data)
    view, pos = memoryview(data), offset
    while view:
        part = view[: piece_size - pos % piece_size]
        whole.update(part)
        piece.update(part)
        pos += len(part)
        view = view[len(part):]
        if pos % piece_size == 0:
            digests[pos // piece_size - 1] = piece.hexdigest()
            piece = hashlib.sha256()
    return piece


class Uploads:
    """The sessions of this supernode and their spool files."""

    def __init__(self, st: Host, limits: UploadLimits) -> None:
        self.st = st
        self.limits = limits
        self.spool = st.settings.home / SPOOL_DIR
        self.sessions: dict[str, Session] = {}
        reg = st.metrics.registry
        self.bytes_in = Counter("supernode_upload_bytes", "Bytes of upload chunks accepted (fsync'ed).",
                                registry=reg)
        self.ended = Counter("supernode_uploads", "Upload sessions ended, by result.", ["result"], registry=reg)
        Gauge("supernode_upload_sessions", "Upload sessions pending.", registry=reg).set_function(
            lambda: sum(x.state == PENDING for x in self.sessions.values()))

    # --- life cycle -------------------------------------------------------------------
    def clear_spool(self) -> int:
        """At start: sessions do not survive a restart, so neither do their spool files."""
        self.spool.mkdir(parents=True, exist_ok=True)
        removed = 0
        for p in self.spool.glob("*.part"):
            with contextlib.suppress(OSError):
                p.unlink()
                removed += 1
        return removed

    def expire(self, now: float | None = None) -> int:
        """Drop sessions idle past the TTL (a chunk in flight keeps its session alive)."""
        now = time.monotonic() if now is None else now
        gone = 0
        for s in list(self.sessions.values()):
            if s.lock.locked() or now - s.touched < self.limits.ttl:
                continue
            if s.state == PENDING:
                log.info("upload %s (%s) expired at %d of %d bytes", s.id[:8], s.digest[:19], s.offset, s.length)
            self._drop(s, "expired")
            gone += 1
        return gone

    async def run_gc(self) -> None:
        interval = max(0.2, min(self.limits.ttl / 4, 30.0))
        while True:
            await asyncio.sleep(interval)
            self.expire()

    def _drop(self, s: Session, state: str) -> None:
        if s.state == PENDING:
            s.state = state
            self.ended.labels(state).inc()
        self.sessions.pop(s.id, None)
        with contextlib.suppress(FileNotFoundError):
            s.path.unlink()

    def pending_bytes(self) -> int:
        """Bytes the pending sessions may still write."""
        return sum(s.length - s.offset for s in self.sessions.values() if s.state == PENDING)

    # --- the API's operations -----------------------------------------------------------
    def cached(self, digest: str) -> CacheEntry | None:
        entry = self.st.cache.load(task_id("", identifier=digest))
        return entry if entry is not None and entry.complete else None

    def create(self, digest: str, length: object) -> Session:
        check_digest(digest)
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise upload_error(errors.BadRequest, "bad_length", "length must be a non-negative integer")
        if length > self.limits.max_size:
            raise upload_error(errors.PayloadTooLarge, "upload_too_large",
                               f"declared length {length} exceeds this supernode's maximum upload size "
                               f"{self.limits.max_size}", max_size=self.limits.max_size)
        if sum(s.state == PENDING for s in self.sessions.values()) >= self.limits.max_sessions:
            raise upload_error(errors.Busy, "too_many_uploads",
                               f"{self.limits.max_sessions} upload sessions are open on this supernode; "
                               "try again later", retry_after=5)
        needed = length + self.pending_bytes()
        if self.st.cache.free_bytes() < needed:
            raise upload_error(errors.CdnStorageError, "insufficient_storage",
                               f"not enough free disk for {length} more bytes on this supernode")
        sid = new_id()
        path = self.spool / f"{sid}.part"
        self.spool.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        s = Session(sid, digest, length, path)
        self.sessions[sid] = s
        log.info("upload %s opened for %s (%d bytes)", sid[:8], digest[:19], length)
        return s

    def get(self, sid: str) -> Session:
        s = self.sessions.get(check_session_id(sid))
        if s is None:
            raise upload_error(errors.NotFound, "unknown_upload", "unknown or expired upload session")
        return s

    def cancel(self, sid: str) -> Session:
        s = self.get(sid)
        self._drop(s, "cancelled")
        log.info("upload %s cancelled at %d of %d bytes", s.id[:8], s.offset, s.length)
        return s

    async def append(self, sid: str, offset: int, size: int, read: Reader) -> Session:
        """One chunk of `size` bytes at `offset`, read with `read(n)`; commits the session
        when it was the last one."""
        s = self.get(sid)
        if s.lock.locked():
            raise upload_error(errors.Conflict, "upload_busy", "another chunk of this session is being received",
                               offset=s.offset)
        async with s.lock:
            self._check_chunk(s, offset, size)
            await self._receive(s, offset, size, read)
        if s.offset == s.length:
            try:
                await self.commit(sid)
            except errors.Busy:
                pass  # every byte is in and kept: the client commits again (PUT) shortly
        return s

    def _check_chunk(self, s: Session, offset: int, size: int) -> None:
        if s.state != PENDING:
            raise upload_error(errors.Conflict, "upload_not_pending", f"the upload is {s.state}", offset=s.offset)
        if offset != s.offset:
            raise upload_error(errors.Conflict, "upload_offset_mismatch",
                               f"chunk at offset {offset}, the upload is at {s.offset}: chunks must follow "
                               "each other exactly (no gap, no overlap)", offset=s.offset)
        if size > self.limits.max_chunk:
            raise upload_error(errors.PayloadTooLarge, "chunk_too_large",
                               f"a chunk may have at most {self.limits.max_chunk} bytes",
                               max_chunk=self.limits.max_chunk)
        if offset + size > s.length:
            raise upload_error(errors.RangeNotSatisfiable, "chunk_past_end",
                               f"chunk of {size} bytes at {offset} ends past the declared length {s.length}",
                               offset=s.offset, length=s.length)

    async def _receive(self, s: Session, offset: int, size: int, read: Reader) -> None:
        whole, piece, digests = s.whole.copy(), s.piece.copy(), {}
        end, pos = offset + size, offset
        fd = await asyncio.to_thread(os.open, s.path, os.O_WRONLY)
        try:
            while pos < end:
                try:
                    async with asyncio.timeout(self.limits.read_timeout):
                        data = await read(min(READ_SIZE, end - pos))
                except TimeoutError:
                    raise errors.RequestTimeout(
                        f"chunk body silent for {self.limits.read_timeout:g} s; it was not kept") from None
                if not data:
                    raise errors.BadRequest(f"chunk body ended after {pos - offset} of {size} bytes")
                piece = await asyncio.to_thread(_absorb, fd, pos, data, whole, piece, digests, s.piece_size)
                pos += len(data)
                s.touched = time.monotonic()
            await asyncio.to_thread(os.fsync, fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, s.offset)  # the cut chunk's bytes take no space
            raise
        finally:
            os.close(fd)
        if self.sessions.get(s.id) is not s or s.state != PENDING:
            raise upload_error(errors.NotFound, "unknown_upload", f"the upload was {s.state} meanwhile")
        s.whole, s.piece, s.offset = whole, piece, end
        s.digests.update(digests)
        self.bytes_in.inc(size)
        s.touched = time.monotonic()

    async def commit(self, sid: str) -> Session:
        s = self.get(sid)
        async with s.lock:
            if s.state == "committed":
                return s
            if s.state != PENDING:
                raise upload_error(errors.Conflict, "upload_not_pending", f"the upload is {s.state}", offset=s.offset)
            if s.offset != s.length:
                raise upload_error(errors.Conflict, "upload_incomplete",
                                   f"the upload has {s.offset} of {s.length} bytes", offset=s.offset)
            got = "sha256:" + s.whole.hexdigest()
            if got != s.digest:
                self._drop(s, "failed")
                log.warning("upload %s failed: bytes hash to %s, not %s", s.id[:8], got, s.digest)
                raise upload_error(errors.ContentDigestMismatch, "content_digest_mismatch",
                                   f"the uploaded bytes hash to {got}, not {s.digest}; the upload is discarded",
                                   status=422, actual=got)
            if s.length % s.piece_size:  # the short last piece
                s.digests[piece_count(s.length, s.piece_size) - 1] = s.piece.hexdigest()
            await self._install(s)
            s.state = "committed"
            self.ended.labels("committed").inc()
            s.touched = time.monotonic()
        await self._publish(s)
        return s

    async def _install(self, s: Session) -> None:
        """The spool file becomes the task's complete cache entry (renamed: no copy)."""
        cache, tid = self.st.cache, s.task_id
        if self.cached(s.digest) is not None:
            with contextlib.suppress(FileNotFoundError):
                s.path.unlink()  # the cache has these bytes already (verified against the same digest)
            log.info("upload %s: %s was cached already", s.id[:8], s.digest[:19])
            return
        if tid in self.st.cdn.running:
            raise upload_error(errors.Busy, "upload_commit_busy",
                               "a fetch of this digest is writing the cache now; commit again shortly", retry_after=2)
        dest = cache.data_path(tid)
        entry = CacheEntry(task_id=tid, length=s.length, piece_size=s.piece_size, complete=True,
                           digests=dict(s.digests), digest_algo=digest.SHA256)

        def move() -> None:
            dest.parent.mkdir(parents=True, exist_ok=True)
            cache.remove(tid)  # a partial entry of an abandoned origin fetch
            os.replace(s.path, dest)
            cache.save(entry)
            dfd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

        await asyncio.to_thread(move)
        cache.adopt(entry)
        log.info("upload %s committed: %s is task %s (%d bytes, %d pieces)", s.id[:8], s.digest[:19],
                 tid[:12], s.length, len(entry.digests))

    async def _publish(self, s: Session) -> None:
        """Tell the cluster (Redis) the task is here, so registrations on any supernode of
        it are served from this cache. Best effort: without it, a registration on this
        supernode still finds the cached entry (fetch.py reuses a complete
        content-addressed entry without the origin). The record's URL says where the
        bytes came from; it is no origin (a refetch of it fails with a clear policy
        error rather than fetching anything)."""
        from supernode.cdn.fetch import file_digest

        st, tid = self.st, s.task_id
        entry = st.cache.entries.get(tid) or st.cache.load(tid)
        if entry is None or not entry.complete:
            return
        try:
            state, _status = await st.repo.register_task(
                tid, url=f"upload:{s.digest}", url_key=s.digest, md5="", identifier=s.digest, range_="", headers={},
                fail_interval_ms=int(st.settings.fail_access_interval * 1000))
            meta = await st.repo.get_meta(tid)
            if state == "conflict" or meta is None or meta.status not in ("pending", "failed"):
                return
            if tid in st.cdn.running:
                return
            count = piece_count(entry.length, entry.piece_size)
            fields: dict[str, object] = dict(
                status="success", length=entry.length, piece_size=entry.piece_size, piece_count=count,
                file_digest=file_digest(entry.digests, count), cdn=st.sn_id, error="", error_message="")
            await st.repo.finish_task(tid, st.sn_id, fields, sorted(entry.digests.items()))
        except errors.StoreError as exc:
            log.warning("upload %s: cannot record task %s in the store yet (%s); it is served from this "
                        "supernode's cache on the next registration", s.id[:8], tid[:12], exc.message)
