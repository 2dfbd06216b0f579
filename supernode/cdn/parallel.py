"""A fetch with K parallel Range requests (`--origin-parallel K`), still exactly the
file's bytes from the origin, every piece hashed as in a sequential fetch.

The first request is the probe: a GET with `Range: bytes=0-(4 MiB - 1)`.

- 200: the origin ignores ranges. That answer is the whole body: the caller streams it
  as a plain fetch (nothing was asked twice).
- 206 with `Content-Range: bytes 0-x/F`: the length is F, the piece size follows from
  it. The pieces are cut into K contiguous spans; span 0 is the probe's bytes followed by
  one Range request for the rest of span 0, the others are one Range request each
  (`fetch_run`, with If-Range, and a transfer that breaks resumes inside its span at its
  first missing piece). The spans are disjoint and cover the file once: F bytes in all.
- An origin that names no version (no ETag, no Last-Modified) cannot have its spans
  pinned to one version with If-Range: the fetch stays one stream (the probe, then one
  request for the rest, checked for the same total length).

Each span writes its pieces through its own piece pipe into the same cache file and
publishes them as they end, so the cache holds pieces out of order: resumption after a
restart goes through the takeover (takeover.py), which re-hashes every recorded piece,
not only the leading run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

import aiohttp

from common import errors
from common.pieces import DEFAULT_PIECE_SIZE, piece_count, piece_size_for
from common.ranges import RangeSyntaxError, parse_content_range
from supernode.store.repo import TaskMeta
from supernode.tasks import cancel_and_wait

from .cache import CacheEntry, PieceCache
from .origin import OriginClient, validators
from .resume import NoResume


class Cdn(Protocol):
    """What a parallel fetch uses of the CDN (fetch.Cdn; a Protocol, as in takeover.py,
    so that this module does not import the one that calls it)."""

    cache: PieceCache
    origin: OriginClient
    settings: Any

    async def _announce(self, meta: TaskMeta, entry: CacheEntry) -> None: ...

    async def _stream(self, meta: TaskMeta, entry: CacheEntry, resp: Any, start: int,
                      published: dict[int, str], *, stop: int | None = None, finish: bool = True) -> None: ...

    async def fetch_run(self, meta: TaskMeta, entry: CacheEntry, a: int, b: int,
                        published: dict[int, str]) -> None: ...

    async def finish_fetch(self, meta: TaskMeta, entry: CacheEntry, count: int) -> None: ...

PROBE = DEFAULT_PIECE_SIZE  # the piece size of every file up to 200 MiB
_BROKEN = (TimeoutError, aiohttp.ClientError, errors.OriginShortBody, errors.OriginUnavailable)


def spans(count: int, k: int) -> list[tuple[int, int]]:
    """Pieces [0, count) as min(k, count) contiguous [a, b) spans, sizes within one."""
    k = max(1, min(k, count))
    base, extra = divmod(count, k)
    out, a = [], 0
    for i in range(k):
        b = a + base + (1 if i < extra else 0)
        out.append((a, b))
        a = b
    return out


def check_part(resp: Any, offset: int, last: int, length: int, entry: CacheEntry) -> None:
    """A 206 that carries exactly bytes offset..last of the same file (total and ETag)."""
    if resp.status != 206:
        raise NoResume(f"origin answered {resp.status} to a Range")
    try:
        a, b, total = parse_content_range(resp.headers.get("Content-Range", ""))
    except RangeSyntaxError as exc:
        raise errors.OriginChanged(f"origin sent a bad Content-Range: {exc}") from None
    etag, _ = validators(resp)
    if (a, b) != (offset, last) or total != length or (entry.etag and etag and etag != entry.etag):
        raise errors.OriginChanged("origin content changed between Range requests")


class _Chain:
    """The probe's body, then the rest of span 0, read as one body by Cdn._stream."""

    def __init__(self, first: Any, rest: Callable[[], Awaitable[Any]]) -> None:
        self.first, self.rest = first, rest
        self.content = self

    async def iter_any(self) -> AsyncIterator[bytes]:
        async for chunk in self.first.content.iter_any():
            yield chunk
        nxt = await self.rest()
        if nxt is None:
            return
        try:
            async for chunk in nxt.content.iter_any():
                yield chunk
        finally:
            nxt.release()


async def fetch(cdn: Cdn, meta: TaskMeta, headers: dict[str, str],
                published: dict[int, str]) -> tuple[bool, Any]:
    """(True, None): fetched and finished here. (False, resp): the origin answered the
    probe with the whole body (200): the caller streams `resp` as a plain fetch."""
    h = dict(headers)
    h["Range"] = f"bytes=0-{PROBE - 1}"
    resp = await cdn.origin.open(meta.url, h)
    if resp.status == 200:
        return False, resp
    try:
        if resp.status != 206:
            raise errors.OriginStatus(f"origin answered {resp.status} to the first request",
                                      detail={"status": str(resp.status)})
        try:
            a, b, total = parse_content_range(resp.headers.get("Content-Range", ""))
        except RangeSyntaxError as exc:
            raise errors.OriginStatus(f"origin sent a bad Content-Range: {exc}", detail={"status": "206"}) from None
        if a != 0 or total is None or b != min(PROBE, total) - 1:
            raise errors.OriginStatus("origin answered the probe with other bytes than asked",
                                      detail={"status": "206"})
        if total > cdn.settings.max_file_size:
            raise errors.OriginTooLarge(f"origin file of {total} bytes exceeds the {cdn.settings.max_file_size} limit")
        entry = _new_entry(cdn, meta, resp, total)
        await cdn._announce(meta, entry)
        pinned = bool(entry.etag or entry.last_modified)
        count = piece_count(total, entry.piece_size)
        parts = spans(count, cdn.settings.origin_parallel if pinned else 1)
        jobs = [_first_span(cdn, meta, headers, entry, resp, b + 1, parts[0][1], published, pinned)]
        jobs += [cdn.fetch_run(meta, entry, x, y, published) for x, y in parts[1:]]
        try:
            await _all(jobs)
        except NoResume as exc:  # a 200 to an If-Range: the file changed under the fetch
            raise errors.OriginChanged(f"origin content changed during a parallel fetch: {exc}") from None
    finally:
        resp.release()
    if len(entry.digests) < count:
        raise errors.TaskFailed("internal error: pieces missing after a parallel fetch")
    await cdn.finish_fetch(meta, entry, count)
    return True, None


def _new_entry(cdn: Cdn, meta: TaskMeta, resp: Any, length: int) -> CacheEntry:
    cdn.cache.remove(meta.task_id)
    entry = cdn.cache.create(meta.task_id, meta.digest_algo)
    entry.length = length
    entry.piece_size = piece_size_for(length)
    entry.etag, entry.last_modified = validators(resp)
    cdn.cache.adopt(entry)
    return entry


async def _first_span(cdn: Cdn, meta: TaskMeta, headers: dict[str, str], entry: CacheEntry, probe: Any,
                      probe_end: int, stop: int, published: dict[int, str], pinned: bool) -> None:
    """Pieces [0, stop): the probe's bytes [0, probe_end), then one Range for the rest."""
    end = min(stop * entry.piece_size, entry.length)

    async def rest() -> Any:
        if probe_end >= end:
            return None
        h = dict(headers)
        h["Range"] = f"bytes={probe_end}-{end - 1}"
        if pinned:
            h["If-Range"] = entry.etag or entry.last_modified
        resp = await cdn.origin.open(meta.url, h)
        try:
            check_part(resp, probe_end, end - 1, entry.length, entry)
        except BaseException:
            resp.release()
            raise
        return resp

    try:
        await cdn._stream(meta, entry, _Chain(probe, rest), 0, published, stop=stop, finish=False)
    except _BROKEN:
        if not pinned:
            raise
        await cdn.fetch_run(meta, entry, 0, stop, published)  # resumes at its first missing piece


async def _all(jobs: list[Awaitable[None]]) -> None:
    """Run every span; the first failure cancels the others and is raised."""
    tasks = [asyncio.ensure_future(j) for j in jobs]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            if t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        await cancel_and_wait(*tasks)  # without swallowing a cancellation of this task
