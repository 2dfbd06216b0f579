"""The CDN checks its own cache when a client says a piece it served was bad.

The seed serves pieces with sendfile and does not re-hash what it sends (that would
read every byte once more per upload). Instead, a client's failure report against this
supernode's CDN copy (digest mismatch, not found, short/long body, error) makes it
re-hash that piece on disk, at most once per piece every few seconds:

- the piece still matches its digest: nothing to do (the fault was on the way);
- it does not (disk rot): it is unpublished at once (nobody is sent to it any more),
  fetched again from the origin with Range + If-Range, checked against the digest
  already distributed, written back and published again;
- the file is gone or shorter than it should be: every piece is unpublished and the
  whole file is fetched again (the task goes back to `fetching`; every piece is checked
  against the digests already distributed, so a changed origin fails the task instead
  of splicing two versions).

This runs before the report is applied, so the client is never handed the same bad
piece again. The CDN is never blacklisted for such failures (scripts.py): a repaired
piece must stay reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

import aiohttp

from common import digest, errors, wire
from common.errors import Signal
from common.pieces import piece_range
from common.ranges import RangeSyntaxError, parse_content_range
from common.taskid import redact_url
from supernode.tasks import TaskOwner

from .cache import CacheEntry, PieceCache, write_at

if TYPE_CHECKING:
    from supernode.store.repo import Repo, TaskMeta

    from .origin import OriginClient

log = logging.getLogger("supernode.repair")
SUSPECT = frozenset({"digest_mismatch", "not_found", "short_body", "long_body", "error"})
RECHECK_AFTER = 5.0  # seconds: a piece found good is not hashed again sooner


class _Lost(Signal):
    """The cached file itself is gone or truncated: refetch it whole."""


def _check_piece(path: str, entry: CacheEntry, n: int, expected: str) -> bool:
    start, end = piece_range(n, entry.length, entry.piece_size)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise _Lost("the cached file is gone") from None
    try:
        if os.fstat(fd).st_size < entry.length:
            raise _Lost("the cached file is shorter than the file")
        data = os.pread(fd, end - start + 1, start)
    finally:
        os.close(fd)
    return digest.matches(expected, digest.of(data, entry.digest_algo))


class _Rates(Protocol):
    @property
    def min_rate(self) -> float: ...


class RepairOwner(Protocol):
    """What the repair needs of the CDN that owns it (`fetch.Cdn`; a protocol, so that
    the two modules do not import each other)."""

    sn_id: str
    cache: PieceCache
    repo: Repo
    origin: OriginClient

    @property
    def settings(self) -> _Rates: ...

    @property
    def running(self) -> Mapping[str, object]: ...

    async def ensure(self, meta: TaskMeta) -> None: ...


class CacheRepair:
    def __init__(self, cdn: RepairOwner) -> None:
        self.cdn = cdn
        self.good: dict[tuple[str, int], float] = {}  # (task, piece) -> when found good
        self.tasks = TaskOwner(log)  # (task, piece) -> its running repair
        self.repaired = 0  # pieces fetched again and put back
        self.refetched = 0  # whole files fetched again

    async def check_reports(self, task_id: str, reports: Sequence[wire.Report]) -> None:
        """Verify the pieces of ours these reports call bad (before they are applied)."""
        if all(r.result != "failed" for r in reports):
            return  # nearly every pull
        sn_id = self.cdn.sn_id
        pieces = sorted({r.piece for r in reports
                         if r.result == "failed" and r.source == sn_id and r.reason in SUSPECT})
        entry = self.cdn.cache.entries.get(task_id)
        if not pieces or entry is None or entry.length < 0:
            return
        now = time.monotonic()
        bad: list[int] = []
        for n in pieces:
            key = (task_id, n)
            expected = entry.digests.get(n)
            recent = now - self.good.get(key, -1e9) < RECHECK_AFTER
            if expected is None or key in self.tasks or recent:
                continue
            try:
                ok = await asyncio.to_thread(_check_piece, str(self.cdn.cache.data_path(task_id)),
                                             entry, n, expected)
            except _Lost as exc:
                await self._refetch_all(task_id, str(exc))
                return
            except OSError as exc:
                ok = False
                log.warning("task %s: cannot read cached piece %d: %s", task_id[:12], n, exc)
            if ok:
                if len(self.good) > 10_000:
                    self.good.clear()
                self.good[key] = now
            else:
                bad.append(n)
        if bad:
            await self._repair(task_id, entry, bad)

    async def close(self) -> None:
        await self.tasks.close()

    # --- one piece ----------------------------------------------------------------------
    async def _repair(self, task_id: str, entry: CacheEntry, pieces: list[int]) -> None:
        log.warning("task %s: cached pieces %s fail verification; fetching them again",
                    task_id[:12], pieces)
        expected = {n: entry.digests.pop(n) for n in pieces}  # the seed stops serving them
        await self.cdn.repo.unpublish_pieces(task_id, pieces)
        for n in pieces:
            self.tasks.start((task_id, n), self._refetch_piece(task_id, entry, n, expected[n]),
                             name=f"repair-{task_id[:12]}-{n}")

    async def _refetch_piece(self, task_id: str, entry: CacheEntry, n: int, expected: str) -> None:
        try:
            meta = await self.cdn.repo.get_meta(task_id)
            if meta is None:
                return
            data = await self._range(meta, entry, n)
            if not digest.matches(expected, digest.of(data, entry.digest_algo)):
                raise errors.OriginChanged(f"piece {n} from the origin differs from the one sent")
            start, _ = piece_range(n, entry.length, entry.piece_size)
            path = str(self.cdn.cache.data_path(task_id))
            await asyncio.to_thread(write_at, path, start, data, sync=True)
            entry.digests[n] = expected
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.cdn.cache.save, entry)
            await self.cdn.repo.publish_pieces(task_id, self.cdn.sn_id, [(n, expected)])
            self.repaired += 1
            log.info("task %s: piece %d fetched again and verified", task_id[:12], n)
        except asyncio.CancelledError:
            raise
        except (errors.DfError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            # Cannot mend one piece (origin ignores Range, changed, is down...): fetch the
            # whole file the usual way, which fails the task cleanly if the origin changed.
            why = exc.message if isinstance(exc, errors.DfError) else f"{type(exc).__name__}: {exc}"
            await self._refetch_all(task_id, f"piece {n} could not be fetched again ({why})")

    async def _range(self, meta: TaskMeta, entry: CacheEntry, n: int) -> bytes:
        start, end = piece_range(n, entry.length, entry.piece_size)
        headers = self.cdn.origin_headers(meta)
        headers["Range"] = f"bytes={start}-{end}"
        if entry.etag or entry.last_modified:
            headers["If-Range"] = entry.etag or entry.last_modified
        resp = await self.cdn.origin.open(meta.url, headers)
        try:
            if resp.status != 206:
                raise errors.OriginStatus(f"origin answered {resp.status} to a piece Range request")
            try:
                a, b, total = parse_content_range(resp.headers.get("Content-Range", ""))
            except RangeSyntaxError as exc:
                raise errors.OriginChanged(f"bad Content-Range: {exc}") from None
            if (a, b) != (start, end) or (total is not None and total != entry.length):
                raise errors.OriginChanged("origin answered another range or length")
            size = end - start + 1
            buf = bytearray()
            deadline = self.cdn.origin.settings.read_timeout + size / self.cdn.settings.min_rate
            async with asyncio.timeout(deadline):
                while len(buf) <= size and (chunk := await resp.content.read(size + 1 - len(buf))):
                    buf += chunk
        finally:
            resp.release()
        if len(buf) != size:
            raise errors.OriginShortBody(f"origin sent {len(buf)} bytes for piece {n} of {size}")
        return bytes(buf)

    # --- the whole file -----------------------------------------------------------------
    async def _refetch_all(self, task_id: str, why: str) -> None:
        if task_id in self.cdn.running:
            return  # a fetch is writing this file right now
        meta = await self.cdn.repo.get_meta(task_id)
        if meta is None or meta.status == "failed":
            return
        log.warning("task %s: %s; fetching %s again", task_id[:12], why, redact_url(meta.url))
        await self.cdn.repo.unpublish_pieces(task_id, [])
        self.cdn.cache.remove(task_id)
        await self.cdn.repo.set_meta(task_id, status="fetching")
        self.refetched += 1
        meta = await self.cdn.repo.get_meta(task_id)
        if meta is not None:
            await self.cdn.ensure(meta)
