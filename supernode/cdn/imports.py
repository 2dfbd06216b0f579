"""Imported files (`dfget import`): a task with no origin whose first copy is a peer
server's. The importer claims the piece digests; the CDN fetches the file from that
peer server, exactly once, as if it were the origin, checks every piece against the
claim and the whole file against the task's content digest, and only then publishes
the pieces (all at once, through the CDN's ordinary finish): nobody is ever told to
trust a byte the supernode has not verified. A piece that is missing or hashes to
anything else fails the task (`import_rejected`) and drops what was fetched.

The claim lives in this supernode's memory: a supernode restarted before the fetch
ended fails the task ("import again"), it never guesses.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from common import digest, errors
from common.hostport import hostport
from common.pieces import piece_count, piece_range
from common.taskid import is_content_identifier
from supernode.store.repo import PeerInfo, TaskMeta

from .cache import write_at
from .takeover import Host, allocate

log = logging.getLogger("supernode.cdn")
PARALLEL = 4  # pieces fetched from the importer at once
MAX_CLAIMS = 1000


@dataclass(frozen=True)
class ImportClaim:
    digest: str  # sha256:<hex>
    length: int
    piece_size: int
    digests: tuple[str, ...]
    peer: PeerInfo


def import_url(task_id: str, peer: PeerInfo) -> str:
    """The task's URL: where its bytes came from (listings show it; nobody fetches it as
    an origin)."""
    return f"{'https' if peer.tls else 'http'}://{hostport(peer.ip, peer.port)}/peer/file/{task_id}"


def is_import(meta: TaskMeta) -> bool:
    """A task made by an import: a content digest task whose URL is a peer server's
    path of that very task (no origin to fall back to)."""
    return is_content_identifier(meta.identifier) and urlsplit(meta.url).path == f"/peer/file/{meta.task_id}"


class Imports:
    """The claims of imports this supernode accepted, until their fetch ends."""

    def __init__(self) -> None:
        self.claims: dict[str, ImportClaim] = {}
        self.bytes_imported = 0

    def claim(self, task_id: str, claim: ImportClaim) -> None:
        if len(self.claims) >= MAX_CLAIMS:
            self.claims.pop(next(iter(self.claims)))
        self.claims[task_id] = claim

    async def fetch(self, cdn: Host, meta: TaskMeta) -> None:
        tid = meta.task_id
        claim = self.claims.get(tid)
        if claim is None:
            raise errors.ImportRejected("the import's claim was lost (supernode restarted?); import the file again")
        try:
            await self._fetch(cdn, meta, claim)
        finally:
            self.claims.pop(tid, None)

    async def _fetch(self, cdn: Host, meta: TaskMeta, claim: ImportClaim) -> None:
        tid, length, ps = meta.task_id, claim.length, claim.piece_size
        count = piece_count(length, ps)
        cdn.cache.remove(tid)
        entry = cdn.cache.create(tid, meta.digest_algo)
        entry.length, entry.piece_size = length, ps
        path = cdn.cache.data_path(tid)
        await asyncio.to_thread(allocate, path, length)
        # no piece is published before the whole file checks out (finish_fetch does it)
        await cdn.repo.set_meta(tid, status="fetching", length=length, piece_size=ps, piece_count=count,
                                cdn=cdn.sn_id)
        assert cdn.origin.session is not None
        session, copier = cdn.origin.session, cdn.copier
        slots = asyncio.Semaphore(PARALLEL)

        async def one(n: int) -> None:
            start, end = piece_range(n, length, ps)
            async with slots:
                data = await copier._piece_from(session, claim.peer, tid, start, end,
                                                copier._auth(tid, n, start, end, claim.peer))
            if data is None:
                raise errors.ImportRejected(f"the importer's peer server did not serve piece {n}")
            got = await asyncio.to_thread(digest.of, data, entry.digest_algo)
            if got != claim.digests[n]:
                raise errors.ImportRejected(
                    f"piece {n} from the importer hashes to {got}, not the digest it claimed")
            await asyncio.to_thread(write_at, path, start, data)
            entry.digests[n] = got
            self.bytes_imported += len(data)

        jobs = [asyncio.ensure_future(one(n)) for n in range(count)]
        try:
            await asyncio.gather(*jobs)
        except BaseException:
            for j in jobs:
                j.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            cdn.cache.remove(tid)
            raise
        # finish_fetch hashes the whole file against the content digest (the task's
        # identifier) and only then records success with every piece digest
        await cdn.finish_fetch(meta, entry, count)
        log.info("task %s: import of %s verified from peer %s (%d bytes)", tid[:12], claim.digest,
                 claim.peer.peer_id[:8], length)
