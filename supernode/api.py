"""HTTP handlers of the supernode API (docs/api.md). Thin: decode, call, encode."""

from __future__ import annotations

import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from common import __version__, errors, wire
from common.taskid import filter_url, is_task_id, new_id, redact_url, task_id as make_task_id

from . import origin
from .repo import PeerInfo
from .state import STATE, SupernodeState

log = logging.getLogger("supernode.api")
MAX_BODY = 64 * 1024
_RANGE_RE = re.compile(r"^bytes=\d{1,19}-\d{0,19}$")
T = TypeVar("T")

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
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise errors.PayloadTooLarge(f"body over {MAX_BODY} bytes")
    data = await request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise errors.PayloadTooLarge(f"body over {MAX_BODY} bytes")
    return wire.decode(data, typ, msgpack=request.content_type == wire.MSGPACK_TYPE)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    st = request.app[STATE]
    t0 = time.perf_counter()
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except errors.DfError as exc:
        status = exc.status
        return reply(request, exc.to_wire(), status=exc.status)
    except web.HTTPException as exc:
        status = exc.status
        if exc.status < 400:
            raise
        return reply(request, {"error": "not_found" if exc.status == 404 else "bad_request",
                               "message": exc.reason}, status=exc.status)
    except Exception:
        log.exception("unexpected error in %s %s", request.method, route)
        return reply(request, {"error": "internal", "message": "internal error"}, status=500)
    finally:
        st.metrics.observe_request(route, request.method, status, time.perf_counter() - t0)


def _task_id(request: web.Request) -> str:
    tid = request.match_info["task_id"]
    if not is_task_id(tid):
        raise errors.BadRequest("task id must be 64 lowercase hex characters")
    return tid


async def register(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await body(request, wire.RegisterRequest)
    if req.range is not None and not _RANGE_RE.match(req.range):
        raise errors.BadRequest("range must be bytes=START-[END]")
    if req.peer is not None:
        try:
            ipaddress.ip_address(req.peer.ip)
        except ValueError:
            raise errors.BadRequest("peer ip must be an IP address") from None
    origin.check_url(req.url, st.policy)
    await origin.check_resolvable(req.url, st.policy)
    tid = make_task_id(req.url, filter_keys=req.filter, md5=req.md5, identifier=req.identifier,
                       range_header=req.range)
    state, _ = await st.repo.register_task(
        tid, url=req.url, url_key=filter_url(req.url, req.filter), md5=req.md5 or "",
        identifier=req.identifier or "", range_=req.range or "", headers=dict(req.headers),
        fail_interval_ms=int(st.settings.fail_access_interval * 1000),
    )
    if state == "conflict":
        raise errors.Conflict("task id already registered with another URL, md5 or identifier")
    cid = req.cid if req.cid else new_id()
    kind = "peer-cdn" if req.pattern == "cdn" else "peer"
    if req.peer is None:
        info = PeerInfo("", "", 0, "none")
    else:
        info = PeerInfo(req.peer.peer_id, req.peer.ip, req.peer.port, kind)
    if req.cid:
        old = await st.repo.peer_of(tid, req.cid)
        if old is not None and old.peer_id != info.peer_id:
            cid = new_id()  # an id is never taken over by another peer
    await st.repo.add_peer(tid, cid, info)
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.StoreError("task vanished during registration")
    await st.cdn.ensure(meta)
    await st.dispatcher.wait_started(tid, st.settings.register_wait)
    meta = await st.repo.get_meta(tid) or meta
    log.info("registered %s for task %s (%s) state=%s", cid[:8], tid[:12], redact_url(req.url), meta.status)
    return reply(request, wire.RegisterReply(cid=cid, supernode_id=st.sn_id, task=meta.info()))


async def pull(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    req = await body(request, wire.PullRequest)
    if req.wait > st.settings.pull_wait_max:
        raise errors.BadRequest(f"wait must be at most {st.settings.pull_wait_max}")
    res = await st.dispatcher.pull(tid, req)
    st.metrics.assignments.inc(len(res.assignments))
    await st.repo.touch(tid)
    return reply(request, res)


async def report(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    req = await body(request, wire.ReportRequest)
    done = await st.dispatcher.report(tid, req.cid, list(req.reports)) if req.reports else 0
    for r in req.reports:
        st.metrics.reports.labels(r.result, r.reason or "").inc()
    if req.event == "aborted":
        await st.repo.release(tid, req.cid)
    await st.repo.touch(tid)
    return reply(request, {"done": done})


async def digests(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.NotFound("unknown task")
    known = await st.repo.digests(tid)
    count = meta.piece_count if meta.piece_count >= 0 else (max(known, default=-1) + 1)
    return reply(request, wire.DigestsReply(meta.info(), [known.get(n) for n in range(count)]))


async def get_task(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    meta = await st.repo.get_meta(tid)
    if meta is None:
        raise errors.NotFound("unknown task")
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


async def delete_task(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    tid = _task_id(request)
    if await st.repo.get_meta(tid) is None:
        raise errors.NotFound("unknown task")
    task = st.cdn.running.get(tid)
    if task is not None:
        task.cancel()
    await st.repo.delete_task(tid)
    st.cache.remove(tid)
    return reply(request, {"deleted": tid})


async def heartbeat(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await body(request, wire.HeartbeatRequest)
    known = await st.repo.heartbeat(req.peer_id)
    return reply(request, {"ok": True, "known": known})


async def peer_down(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await body(request, wire.PeerDownRequest)
    tasks = list(req.tasks) if req.tasks is not None else await st.repo.host_tasks(req.peer_id)
    removed = 0
    for tid in tasks:
        cids = await st.repo.clients_of_host(tid, req.peer_id)
        await st.repo.remove_clients(tid, cids)
        removed += len(cids)
    await st.repo.forget_host(req.peer_id, None if req.tasks is None else tasks)
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
    body_, ctype = st.metrics.render(st)
    return web.Response(body=body_, headers={"Content-Type": ctype})


def routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/api/v1/tasks", register)
    r.add_get("/api/v1/tasks", list_tasks)
    r.add_get("/api/v1/tasks/{task_id}", get_task)
    r.add_delete("/api/v1/tasks/{task_id}", delete_task)
    r.add_post("/api/v1/tasks/{task_id}/pull", pull)
    r.add_post("/api/v1/tasks/{task_id}/report", report)
    r.add_get("/api/v1/tasks/{task_id}/digests", digests)
    r.add_post("/api/v1/peers/heartbeat", heartbeat)
    r.add_post("/api/v1/peers/down", peer_down)
    r.add_get("/_ping", ping)
    r.add_get("/version", version)
    r.add_get("/metrics", metrics)


