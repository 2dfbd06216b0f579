"""What a supernode taking over another one's fetch (or re-seeding a task whose CDN died)
needs besides the origin: which live peers hold the published pieces, copying pieces
from them (each checked against its published digest), the pieces of its own partial
file it can still trust, and the origin runs left to fetch. docs/ha.md tells the story.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import aiohttp

from common import digest
from common.hostport import hostport
from common.netpolicy import AddressPolicy
from common.pieces import piece_range
from common.tokens import CLIENT_HEADER, TOKEN_HEADER, Signer
from supernode.store.repo import PeerInfo, Repo

from .cache import CacheEntry, write_at

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
            if published.get(n, d) == d and digest.of(os.pread(fd, end - start + 1, start)) == d:
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
                    if data is None or await asyncio.to_thread(digest.of, data) != published[n]:
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
