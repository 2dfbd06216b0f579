"""`POST /api/v1/import`: a file a peer server holds enters the swarm with no origin
(`dfget import`). The body is the importer's claim (content digest, length, piece size,
piece digests) and its peer server's address; the CDN then fetches the file from that
peer server and checks it against the claim before publishing anything (cdn/imports.py).

Checked here, before anything is written: the digest's form, the piece size (the one
every dfget computes for this length), the number of digests, the length cap, the peer
address policy and the peer's secret. An import of a digest the swarm already has is
answered with that task, and nothing is fetched.
"""

from __future__ import annotations

import logging

from aiohttp import web

from common import content, errors, wire
from common.pieces import piece_count, piece_size_for
from supernode.cdn.imports import ImportClaim, import_url, is_import
from supernode.state import STATE, SupernodeState
from supernode.store.repo import PeerInfo

from . import handlers as api
from . import peerauth

log = logging.getLogger("supernode.import")


def check_claim(req: wire.ImportRequest, max_file_size: int) -> None:
    """Pure: the claim's shape (the bytes are the CDN's business)."""
    if req.length > max_file_size:
        raise errors.BadRequest(f"length {req.length} exceeds this supernode's {max_file_size}-byte limit")
    if req.piece_size != piece_size_for(req.length):
        raise errors.BadRequest(f"piece_size must be {piece_size_for(req.length)} for a file of {req.length} bytes")
    want = piece_count(req.length, req.piece_size)
    if len(req.digests) != want:
        raise errors.BadRequest(f"{want} piece digests expected, got {len(req.digests)}")


async def start(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await api.body(request, wire.ImportRequest)
    check_claim(req, st.settings.max_file_size)
    api._check_peer(st, req.peer)
    secret = await api._peer_secrets(st).for_registration(req.peer.peer_id, request.headers.get(peerauth.HEADER))
    tid = content.task_id_of(req.digest)
    peer = PeerInfo(req.peer.peer_id, req.peer.ip, req.peer.port, "peer", req.peer.tls)
    url = import_url(tid, peer)
    old = await st.repo.get_meta(tid)
    if old is not None and old.status == "failed" and is_import(old):
        # a refused import (its importer lied, or vanished) must not block an honest one
        await st.repo.delete_task(tid)
        st.cache.remove(tid)
    state, _ = await st.repo.register_task(
        tid, url=url, url_key=req.digest, md5="", identifier=req.digest, range_="", headers={},
        fail_interval_ms=int(st.settings.fail_access_interval * 1000))
    if state == "conflict":
        raise errors.Conflict("this task id is registered with another identity")
    if state == "new":
        st.cdn.imports.claim(tid, ImportClaim(req.digest, req.length, req.piece_size, tuple(req.digests), peer))
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.StoreError("task vanished during the import")
    await st.cdn.ensure(meta)
    meta = await st.repo.get_meta(tid) or meta
    log.info("import of %s (task %s) from peer %s: %s%s", req.digest, tid[:12], req.peer.peer_id[:8],
             meta.status, "" if state == "new" else " (known already: nothing fetched)")
    return api.reply(request, wire.ImportReply(task=meta.info(), new=state == "new", peer_secret=secret),
                     status=202)


def routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/import", start)
