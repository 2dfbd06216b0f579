"""What a supernode taking over another one's fetch (or re-seeding a task whose CDN died)
needs besides the origin: which live peers hold the published pieces, copying pieces
from them (each checked against its published digest), the pieces of its own partial
file it can still trust, and the origin runs left to fetch; and the takeover itself
(`take_over`). docs/ha.md tells the story.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Protocol

import aiohttp

from common import digest, errors
from common.hostport import hostport
from common.netpolicy import AddressPolicy
from common.pieces import piece_count, piece_range
from common.tokens import CLIENT_HEADER, TOKEN_HEADER, Signer
from supernode.store.repo import PeerInfo, Repo, TaskMeta
from supernode.tasks import cancel_and_wait

from .cache import CacheEntry, PieceCache, write_at
from .origin import OriginClient
from .resume import NoResume

log = logging.getLogger("supernode.cdn")

SAMPLE = 8  # holders asked about per piece
COPIES = 2  # pieces copied from peers at once


def runs(pieces: list[int]) -> list[tuple[int, int]]:
    """Piece numbers as maximal [a, b) runs: [7, 1, 2, 3] -> [(1, 4), (7, 8)]."""
    out: list[tuple[int, int]] = []
    for n in sorted(pieces):
        if out and out[-1][1] == n:
            out[-1] = (out[-1][0], n + 1)
        else:
            out.append((n, n + 1))
    return out


def allocate(path: Path, length: int) -> None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, length)
    finally:
        os.close(fd)


def trusted_pieces(path: Path, entry: CacheEntry, published: dict[int, str]) -> dict[int, str]:
    """The pieces of a partial file on disk that still hash to their record (and to the
    published digest, where there is one)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return {}
    try:
        good = {}
        for n, d in entry.digests.items():
            start, end = piece_range(n, entry.length, entry.piece_size)
            if published.get(n, d) == d and digest.of(os.pread(fd, end - start + 1, start), entry.digest_algo) == d:
                good[n] = d
        return good
    finally:
        os.close(fd)


class PeerCopier:
    """Copies published pieces from the live peers that hold them into a cache file."""

    def __init__(self, repo: Repo, policy: AddressPolicy, min_rate: int) -> None:
        self.repo = repo
        self.policy = policy
        self.min_rate = min_rate
        self.bytes_copied = 0
        self.signer: Signer | None = None  # piece tokens for our own requests (app.py)
        self.client_id = ""

    def use_tokens(self, signer: Signer, client_id: str) -> None:
        """Peer servers want a piece token from us too: we sign our own, as client `client_id`."""
        self.signer, self.client_id = signer, client_id

    def _auth(self, task_id: str, piece: int, start: int, end: int, info: PeerInfo) -> dict[str, str]:
        if self.signer is None:
            return {}
        token = self.signer.issue(task_id=task_id, piece=piece, start=start, end=end, client=self.client_id,
                                  source=info.peer_id, expires=int(time.time()) + 60)
        return {TOKEN_HEADER: token, CLIENT_HEADER: self.client_id}

    async def sources(self, task_id: str, pieces: list[int]) -> dict[int, list[PeerInfo]]:
        """Live peers holding each piece, those whose address the policy permits."""
        if not pieces:
            return {}
        detail = await self.repo.detail(task_id, "", pieces, sample=SAMPLE, peer_cap=1 << 30, cdn_cap=0)
        out: dict[int, list[PeerInfo]] = {}
        for n, holders in zip(pieces, detail.holders, strict=True):
            infos = [detail.addresses[h] for h in holders if h in detail.addresses]
            infos = [i for i in infos if i.kind in ("peer", "peer-cdn") and self.policy.permits(i.ip)]
            if infos:
                out[n] = infos
        return out

    async def copy(self, session: aiohttp.ClientSession, task_id: str, entry: CacheEntry, path: Path,
                   sources: dict[int, list[PeerInfo]], published: dict[int, str], cdn_id: str) -> list[int]:
        """Copy the pieces from their holders, publishing each as ours once written;
        returns those nobody could give."""
        left: list[int] = []
        slots = asyncio.Semaphore(COPIES)

        async def one(n: int, infos: list[PeerInfo]) -> None:
            async with slots:
                start, end = piece_range(n, entry.length, entry.piece_size)
                for info in infos:
                    data = await self._piece_from(session, info, task_id, start, end,
                                                  self._auth(task_id, n, start, end, info))
                    if data is None or await asyncio.to_thread(digest.of, data, entry.digest_algo) != published[n]:
                        continue
                    await asyncio.to_thread(write_at, path, start, data)
                    entry.digests[n] = published[n]
                    self.bytes_copied += len(data)
                    await self.repo.publish_pieces(task_id, cdn_id, [(n, published[n])])
                    return
                left.append(n)

        await asyncio.gather(*(one(n, infos) for n, infos in sources.items()))
        return sorted(left)

    async def _piece_from(self, session: aiohttp.ClientSession, info: PeerInfo, task_id: str,
                          start: int, end: int, auth: dict[str, str]) -> bytes | None:
        url = f"{'https' if info.tls else 'http'}://{hostport(info.ip, info.port)}/peer/file/{task_id}"
        size = end - start + 1
        try:
            async with asyncio.timeout(size / self.min_rate + 10):
                async with session.get(url, headers={"Range": f"bytes={start}-{end}", **auth},
                                       allow_redirects=False) as resp:
                    if resp.status != 206 or resp.content_length != size:
                        return None
                    data = await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return None
        return data if len(data) == size else None


class Host(Protocol):
    """What a takeover uses of the CDN (fetch.Cdn): its store, cache, peer copier and
    origin client, and two steps of its fetch."""

    repo: Repo
    cache: PieceCache
    copier: PeerCopier
    origin: OriginClient
    sn_id: str
    bytes_fetched: int

    async def fetch_run(self, meta: TaskMeta, entry: CacheEntry, a: int, b: int,
                        published: dict[int, str]) -> None: ...

    async def finish_fetch(self, meta: TaskMeta, entry: CacheEntry, count: int) -> None: ...


async def take_over(cdn: Host, meta: TaskMeta, entry: CacheEntry | None, published: dict[int, str]) -> bool:
    """Finish a fetch whose pieces were partly published by someone else (a dead
    supernode, or this one before a restart): pieces already here stay, pieces live
    peers hold are copied from them (checked against the published digest), and only
    the rest comes from the origin, as Range + If-Range runs. False when that cannot
    be done safely (no validator, unknown length) or is not needed (everything
    published is here): the caller then fetches as usual."""
    tid, length, ps = meta.task_id, meta.length, meta.piece_size
    if length <= 0 or ps <= 0:
        return False
    etag, lm = await cdn.repo.origin_validators(tid)
    same = entry is not None and (entry.length, entry.piece_size) == (length, ps) and (
        not (etag or lm) or (entry.etag, entry.last_modified) == (etag, lm))
    if same and entry is not None and not (etag or lm):
        etag, lm = entry.etag, entry.last_modified
    if not (etag or lm):
        return False  # a Range without If-Range could splice two versions of the file
    if same and entry is not None and set(published) <= set(entry.digests) and (
            entry.verified_prefix() == len(entry.digests)):
        return False  # our own partial copy has it all, in one leading run: a plain resume
    # (with holes, left by a parallel fetch, a plain resume would keep only the leading
    # run and drop published pieces the seed is asked for: re-hash them all here instead)
    path = cdn.cache.data_path(tid)
    have = await asyncio.to_thread(trusted_pieces, path, entry, published) if same and entry else {}
    if not same:
        cdn.cache.remove(tid)
        entry = cdn.cache.create(tid, meta.digest_algo)
        entry.length, entry.piece_size, entry.etag, entry.last_modified = length, ps, etag, lm
    assert entry is not None
    entry.digests, entry.complete = have, False
    await asyncio.to_thread(allocate, path, length)
    cdn.cache.adopt(entry)
    if not await cdn.repo.adopt_cdn(tid, cdn.sn_id, sorted(have.items())):
        return True  # finished, failed or deleted meanwhile: nothing left to fetch
    count = piece_count(length, ps)
    missing = [n for n in range(count) if n not in have]
    sources = await cdn.copier.sources(tid, [n for n in missing if n in published])
    direct = [n for n in missing if n not in sources]
    log.info("task %s: taking over the fetch: %d pieces here, %d to copy from peers, %d from the origin",
             tid[:12], len(have), len(sources), len(direct))
    peers0, origin0 = cdn.copier.bytes_copied, cdn.bytes_fetched
    assert cdn.origin.session is not None
    copier = asyncio.create_task(cdn.copier.copy(cdn.origin.session, tid, entry, path, sources,
                                                 published, cdn.sn_id))
    try:
        for a, b in runs(direct):
            await cdn.fetch_run(meta, entry, a, b, published)
        left = await copier
        for a, b in runs(left):
            await cdn.fetch_run(meta, entry, a, b, published)
    except NoResume as exc:
        log.warning("task %s: %s; fetching the whole file again", tid[:12], exc)
        with contextlib.suppress(errors.StoreError):
            await cdn.repo.adopt_cdn(tid, cdn.sn_id, [])
        return False
    finally:
        await cancel_and_wait(copier)
    if len(entry.digests) < count:
        raise errors.TaskFailed("internal error: pieces missing after a takeover")
    await cdn.finish_fetch(meta, entry, count)
    log.info("task %s: takeover done: %d bytes copied from peers, %d fetched from the origin",
             tid[:12], cdn.copier.bytes_copied - peers0, cdn.bytes_fetched - origin0)
    return True
