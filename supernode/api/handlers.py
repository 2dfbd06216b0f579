"""HTTP handlers of the supernode API (docs/api.md). Thin: decode, call, encode."""

from __future__ import annotations

import ipaddress
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from common import __version__, content, digest, errors, httperrors, wire
from common.taskid import is_content_identifier, is_task_id, new_id, redact_url, split_credentials, task_key
from common.taskid import task_id as make_task_id
from supernode.cdn import origin
from supernode.state import STATE, SupernodeState
from supernode.store.repo import PeerInfo, TaskMeta

from . import guard, peerauth
from .admin import admin_only

log = logging.getLogger("supernode.api")
MAX_BODY = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=[0-9]{1,19}-[0-9]{0,19}\Z")
T = TypeVar("T")
_METHODS = frozenset({"GET", "POST", "DELETE", "HEAD", "PUT", "PATCH", "OPTIONS"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _wants_msgpack(request: web.Request) -> bool:
    return wire.MSGPACK_TYPE in request.headers.get("Accept", "") or (
        request.content_type == wire.MSGPACK_TYPE and "json" not in request.headers.get("Accept", "")
    )


def reply(request: web.Request, obj: object, status: int = 200) -> web.Response:
    mp = _wants_msgpack(request)
    return web.Response(
        body=wire.encode(obj, msgpack=mp), status=status,
        content_type=wire.MSGPACK_TYPE if mp else wire.JSON_TYPE,
    )


async def body(request: web.Request, typ: type[T]) -> T:
    """Decode the body the guard read (capped, with a deadline) before any handler ran."""
    data = await guard.body_bytes(request, MAX_BODY, request.app[STATE].settings.body_timeout)
    return wire.decode(data, typ, msgpack=request.content_type == wire.MSGPACK_TYPE)


def _observe(request: web.Request, status: int, seconds: float) -> None:
    # any method string reaches here: keep the label set bounded
    method = request.method if request.method in _METHODS else "OTHER"
    request.app[STATE].metrics.observe_request(guard.route_of(request), method, status, seconds)


error_middleware = httperrors.error_middleware(logger=log, render=reply, observe=_observe)


def _task_id(request: web.Request) -> str:
    tid = request.match_info["task_id"]
    if not is_task_id(tid):
        raise errors.BadRequest("task id must be 64 lowercase hex characters")
    return tid


async def _known_task(st: SupernodeState, tid: str) -> TaskMeta:
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.NotFound("unknown task")
    return meta


async def open_task(st: SupernodeState, url: str, *, headers: dict[str, str], md5: str | None,
                    identifier: str | None, filter_keys: list[str], range_: str | None,
                    digest_algos: list[str] | None = None) -> TaskMeta:
    """The task part of a registration (also preheat's): check the origin URL and register
    the task (a conflict is 409). The caller starts the CDN fetch (`st.cdn.ensure`).
    `digest_algos`: the piece digests the registering client can check (None: there is
    no client, a preheat); see `_piece_digest`."""
    origin.check_url(url, st.policy)
    await origin.check_resolvable(url, st.policy)
    tid = make_task_id(url, filter_keys=filter_keys, md5=md5, identifier=identifier, range_header=range_)
    # Credentials (a registry's bearer token, cookies) stay in this supernode's memory for
    # its CDN fetch: never in Redis in clear, where listings and every supernode read them.
    headers, credentials = split_credentials(headers)
    st.cdn.remember_credentials(tid, credentials)
    state, _ = await st.repo.register_task(
        tid, url=url, url_key=task_key(url, filter_keys, identifier, md5, range_), md5=md5 or "",
        identifier=identifier or "", range_=range_ or "", headers=headers,
        fail_interval_ms=int(st.settings.fail_access_interval * 1000),
        digest_algo=_piece_digest(st, identifier, digest_algos),
    )
    if state == "conflict":
        raise errors.Conflict("task id already registered with another URL, md5 or identifier")
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.StoreError("task vanished during registration")
    return meta


def _piece_digest(st: SupernodeState, identifier: str | None, offered: list[str] | None) -> str:
    """A new task's piece digest: ours (--piece-digest) if the registering client can
    check it (no client, a preheat: any), else the legacy one. A task named by its
    content's sha256 (a registry blob) always uses sha256, the algorithm of every other
    way into it (uploads, imports: their clients hash the pieces themselves)."""
    if identifier and is_content_identifier(identifier):
        return digest.SHA256
    return digest.choose(digest.ALGORITHMS if offered is None else offered, st.settings.piece_digest)


async def known_digest(st: SupernodeState, req: wire.RegisterRequest) -> TaskMeta:
    """A registration without a URL joins the task its content digest names, which the
    swarm must already have (imported, or registered by someone with a URL)."""
    if req.md5 or req.range or req.filter or req.headers:
        raise errors.BadRequest("a registration without url takes only a sha256 identifier")
    try:
        digest = content.parse(req.identifier or "")
    except content.BadDigest as exc:
        raise errors.BadRequest(f"a registration without url needs identifier sha256:<hex>: {exc}") from None
    meta = await st.repo.get_meta(content.task_id_of(digest))
    if meta is None:
        raise errors.UnknownDigest(f"no task of this swarm has {digest} (import it, or give a URL)",
                                   detail={"digest": digest})
    return meta


def _check_peer(st: SupernodeState, peer: wire.PeerAddr) -> None:
    try:
        ipaddress.ip_address(peer.ip)
    except ValueError:
        raise errors.BadRequest("peer ip must be an IP address") from None
    if st.peer_policy is not None and not st.peer_policy.permits(peer.ip):
        raise errors.PeerAddressDenied(
            f"peer address {peer.ip} is refused by this supernode's peer policy (loopback, link-local, "
            "unspecified and multicast addresses need --allow-peer)", detail={"ip": peer.ip})
    if st.require_peer_tls and not peer.tls:
        raise errors.PeerAddressDenied(
            f"peer {peer.ip}:{peer.port} serves plain HTTP and this supernode accepts only peers that "
            "serve TLS (start dfget with --cert/--key)", detail={"ip": peer.ip, "tls": False})


async def register(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await body(request, wire.RegisterRequest)
    if req.range is not None and not _RANGE_RE.match(req.range):
        raise errors.BadRequest("range must be bytes=START-[END]")
    # by digest alone: refused (unknown digest, malformed) before anything is written
    joined = await known_digest(st, req) if req.url is None else None
    peer_secret = None
    if req.peer is not None:
        _check_peer(st, req.peer)
        peer_secret = await _peer_secrets(st).for_registration(
            req.peer.peer_id, request.headers.get(peerauth.HEADER))
    if joined is not None:
        meta = joined
    else:
        assert req.url is not None
        meta = await open_task(st, req.url, headers=dict(req.headers), md5=req.md5, identifier=req.identifier,
                               filter_keys=list(req.filter), range_=req.range, digest_algos=list(req.digest_algos))
    if meta.digest_algo not in req.digest_algos:
        raise errors.DigestUnsupported(
            f"the task's pieces are hashed with {meta.digest_algo}, which this client cannot check "
            f"(it offers {', '.join(req.digest_algos) or 'none'}): upgrade dfget",
            detail={"digest_algo": meta.digest_algo})
    tid = meta.task_id
    cid = req.cid if req.cid else new_id()
    kind = "peer-cdn" if req.pattern == "cdn" else "peer"
    if req.peer is None:
        info = PeerInfo("", "", 0, "none")
    else:
        info = PeerInfo(req.peer.peer_id, req.peer.ip, req.peer.port, kind, req.peer.tls)
        st.metrics.seen_peer(req.peer.peer_id)
    if req.cid:
        old = await st.repo.peer_of(tid, req.cid)
        if old is not None and old.peer_id != info.peer_id:
            cid = new_id()  # an id is never taken over by another peer
    await st.repo.add_peer(tid, cid, info)
    if cid == req.cid:
        # A re-registration (dfget failing over): what its old session had in flight is
        # void, and left in Redis it would block those pieces until their deadlines.
        await st.repo.release(tid, cid)
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.StoreError("task vanished during registration")
    await st.cdn.ensure(meta)
    await st.dispatcher.wait_started(tid, st.settings.register_wait)
    meta = await st.repo.get_meta(tid) or meta
    log.info("registered %s for task %s (%s) state=%s", cid[:8], tid[:12],
             redact_url(req.url or req.identifier or ""), meta.status)
    keys = await st.keyring.current() if st.settings.piece_auth and st.keyring is not None else []
    return reply(request, wire.RegisterReply(cid=cid, supernode_id=st.sn_id, task=meta.info(),
                                             piece_auth=st.settings.piece_auth, keys=keys,
                                             peer_secret=peer_secret))


def _gone(request: web.Request) -> bool:
    """The client closed its connection (a dfget killed mid long-poll)."""
    return request.transport is None or request.transport.is_closing()


async def pull(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    req = await body(request, wire.PullRequest)
    if req.wait > st.settings.pull_wait_max:
        raise errors.BadRequest(f"wait must be at most {st.settings.pull_wait_max}")
    res = await st.dispatcher.pull(tid, req, alive=lambda: not _gone(request),
                                   idle=request.app[guard.GUARD].idle)
    st.metrics.assignments.inc(len(res.assignments))
    await st.repo.touch(tid)
    return reply(request, res)


async def report(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    req = await body(request, wire.ReportRequest)
    done = await st.dispatcher.report(tid, req.cid, list(req.reports)) if req.reports else 0
    await st.metrics.observe_reports(st.repo, tid, req.cid, req.reports)
    if req.event in ("aborted", "back_to_source"):
        await st.repo.release(tid, req.cid)
    if req.event == "back_to_source" and await st.repo.peer_of(tid, req.cid) is not None:
        # only a client registered here counts (anyone can post; nobody can inflate it)
        st.metrics.back_to_source.labels(req.reason or "error").inc()
        log.info("client %s of task %s went back to source: %s", req.cid[:8], tid[:12], req.reason)
    await st.repo.touch(tid)
    return reply(request, {"done": done})


async def digests(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    meta = await _known_task(st, tid)
    known = await st.repo.digests(tid)
    count = meta.piece_count if meta.piece_count >= 0 else (max(known, default=-1) + 1)
    return reply(request, wire.DigestsReply(meta.info(), [known.get(n) for n in range(count)]))


@admin_only  # lists client ids, which act as a client's credentials towards the API
async def get_task(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    meta = await _known_task(st, tid)
    clients = await st.repo.all_clients(tid)
    return reply(request, {
        "task": meta.info(), "url": redact_url(meta.url),
        "clients": [{"cid": c, "kind": p.kind} for c, p in clients.items()],
    })


async def list_tasks(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    out = []
    for tid in await st.repo.list_tasks(200):
        meta = await st.repo.get_meta(tid)
        if meta is not None:
            out.append({"task": meta.info(), "url": redact_url(meta.url)})
    return reply(request, {"tasks": out})


@admin_only
async def delete_task(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    await _known_task(st, tid)
    task = st.cdn.running.get(tid)
    if task is not None:
        task.cancel()
    await st.repo.delete_task(tid)
    st.cache.remove(tid)
    return reply(request, {"deleted": tid})


@admin_only
async def task_peers(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    await _known_task(st, tid)
    clients = await st.repo.all_clients(tid)
    return reply(request, {"peers": [
        {"cid": c, "peer_id": p.peer_id, "ip": p.ip, "port": p.port, "kind": p.kind, "tls": p.tls}
        for c, p in clients.items() if p.kind in ("peer", "peer-cdn")]})


async def piece_keys(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    keys = await st.keyring.current() if st.settings.piece_auth and st.keyring is not None else []
    return reply(request, wire.KeysReply(piece_auth=st.settings.piece_auth, keys=keys))


def _peer_secrets(st: SupernodeState) -> peerauth.PeerSecrets:
    assert st.peer_secrets is not None  # app.py always builds one
    return st.peer_secrets


async def heartbeat(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await body(request, wire.HeartbeatRequest)
    await _peer_secrets(st).check(req.peer_id, request.headers.get(peerauth.HEADER))
    known = await st.repo.heartbeat(req.peer_id)
    st.metrics.seen_peer(req.peer_id)
    return reply(request, {"ok": True, "known": known})


async def peer_down(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await body(request, wire.PeerDownRequest)
    await _peer_secrets(st).check(req.peer_id, request.headers.get(peerauth.HEADER))
    tasks = list(req.tasks) if req.tasks is not None else await st.repo.host_tasks(req.peer_id)
    only = set(req.clients) if req.clients is not None and req.tasks is not None else None
    removed = 0
    for tid in tasks:
        cids = await st.repo.clients_of_host(tid, req.peer_id)
        if only is not None:
            cids = [c for c in cids if c in only]
        await st.repo.remove_clients(tid, cids)
        removed += len(cids)
    await st.repo.forget_host(req.peer_id, None if req.tasks is None else tasks)
    if req.tasks is None:
        st.metrics.peer_gone(req.peer_id)
    log.info("peer %s down: %d clients removed from %d tasks", req.peer_id[:8], removed, len(tasks))
    return reply(request, {"removed": removed})


async def ping(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    try:
        await st.store.ping()
    except errors.StoreError as exc:
        return reply(request, {"ok": False, "error": exc.code}, status=503)
    return reply(request, {"ok": True, "supernode_id": st.sn_id})


async def version(request: web.Request) -> web.Response:
    return reply(request, {"version": __version__})


async def metrics(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    body_, ctype = await st.metrics.render(st.cdn, st.seed, st.repo)
    return web.Response(body=body_, headers={"Content-Type": ctype})


def routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/tasks", register)
    r.add_get("/api/v1/tasks", list_tasks)
    r.add_get("/api/v1/tasks/{task_id}", get_task)
    r.add_delete("/api/v1/tasks/{task_id}", delete_task)
    r.add_get("/api/v1/tasks/{task_id}/peers", task_peers)
    r.add_get("/api/v1/keys", piece_keys)
    r.add_post("/api/v1/tasks/{task_id}/pull", pull)
    r.add_post("/api/v1/tasks/{task_id}/report", report)
    r.add_get("/api/v1/tasks/{task_id}/digests", digests)
    r.add_post("/api/v1/peers/heartbeat", heartbeat)
    r.add_post("/api/v1/peers/down", peer_down)
    r.add_get("/_ping", ping)
    r.add_get("/version", version)
    r.add_get("/metrics", metrics)


