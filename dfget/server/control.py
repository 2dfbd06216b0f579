"""Local control plane on a Unix socket: dfget processes of this host register their
files, mark pieces verified, report the final path, remove files, change the limit.

Routes: GET /info; GET /files; POST /files (RegisterFile);
POST /files/{task_id}/verified (MarkVerified); POST /files/{task_id}/moved (MovedFile);
DELETE /files/{task_id}; POST /limits (Limits); POST /keys (TrustKeys);
POST /secrets (PeerSecret: this peer's secret at a supernode, sent with heartbeats and
downs); POST /spool (replay the requests a dfget left in <home>/spool, see spool.py);
POST /back-to-source (BackToSource: a download of this host went to the origin, counted
in the metrics); POST /shutdown. Local reads and job states: GET /local/jobs[/{task_id}],
POST /local/jobs/{task_id}/invalidate, GET /local/read/{task_id} (localread.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import msgspec
from aiohttp import web

from common import __version__
from common.errors import BadRequest, NotFound, PayloadTooLarge
from common.httperrors import error_middleware
from common.taskid import is_task_id
from common.wire import decode

from . import localread
from .jobs import FAILED, DownloadInvalidated
from .protocol import BackToSource, Limits, MarkVerified, MovedFile, PeerSecret, RegisterFile, ServerInfo, TrustKeys
from .state import ServerState
from .table import FileEntry

T = TypeVar("T")
STATE: web.AppKey[ServerState] = web.AppKey("control_state", ServerState)
log = logging.getLogger("dfget.server.control")
Notify = Callable[[list[FileEntry]], Awaitable[None]]
NOTIFY: web.AppKey[Notify] = web.AppKey("notify", Notify)  # type: ignore[arg-type]


async def _body(request: web.Request, typ: type[T]) -> T:
    try:
        return decode(await request.read(), typ)
    except BadRequest as exc:
        raise BadRequest(exc.message) from None


def _task_id(request: web.Request) -> str:
    tid = request.match_info["task_id"]
    if not is_task_id(tid):
        raise NotFound("unknown task")
    return tid


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=msgspec.json.encode(obj), status=status, content_type="application/json")


async def info(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return _json(ServerInfo(peer_id=s.peer_id, ip=s.config.ip, port=s.port, pid=os.getpid(),
                            version=__version__, totallimit=int(s.throttle.bucket.rate),
                            auth_refused=dict(s.auth_refused), peer_secrets=dict(s.peer_secrets),
                            tls=s.config.tls is not None))


async def list_files(request: web.Request) -> web.Response:
    s = request.app[STATE]
    return _json([{"task_id": e.task_id, "path": str(e.path), "length": e.length,
                   "complete": e.complete, "verified": len(e.verified)}
                  for e in s.table.files.values()])


async def register_file(request: web.Request) -> web.Response:
    s = request.app[STATE]
    body = await _body(request, RegisterFile)
    s.known_supernodes.update(body.supernodes)
    s.keys.add(body.keys)
    old = s.table.get(body.task_id)
    s.jobs.clear(body.task_id)  # a new download of the task: a new job
    s.table.register(FileEntry(task_id=body.task_id, path=Path(body.path), length=body.length,
                               piece_size=body.piece_size, supernodes=list(body.supernodes),
                               owner_pid=body.owner_pid, piece_auth=body.piece_auth,
                               clients=list(body.clients)))
    s.table_changed()
    # Another download of the task replaced the entry: what the old one's clients hold is
    # no longer served here, and supernodes that still list them send peers into 404s.
    left = [c for c in old.clients if c not in body.clients] if old is not None else []
    if left:
        await request.app[NOTIFY]([dataclasses.replace(old, clients=left)])
    return _json({"ok": True})


async def mark_verified(request: web.Request) -> web.Response:
    s = request.app[STATE]
    tid = _task_id(request)
    body = await _body(request, MarkVerified)
    if s.jobs.invalid(tid):  # its dfget must stop (dfget/peerlink.py)
        raise DownloadInvalidated("the job was invalidated")
    if not s.table.mark(tid, body.pieces, body.length):
        raise NotFound("unknown task")
    s.table_changed()
    return _json({"ok": True})


async def moved(request: web.Request) -> web.Response:
    s = request.app[STATE]
    tid = _task_id(request)
    body = await _body(request, MovedFile)
    if not s.table.moved(tid, Path(body.path), body.content or ""):
        raise NotFound("unknown task or file")
    s.table_changed()
    return _json({"ok": True})


async def remove(request: web.Request) -> web.Response:
    s = request.app[STATE]
    entry = s.table.remove(_task_id(request))
    if entry is None:
        raise NotFound("unknown task")
    if not entry.complete:  # its dfget gave up on P2P (failure, or going to the origin)
        s.jobs.set(entry.task_id, FAILED, "its dfget stopped downloading it through the swarm")
    s.table_changed()  # local readers of it stop
    await request.app[NOTIFY]([entry])
    return _json({"ok": True})


async def limits(request: web.Request) -> web.Response:
    body = await _body(request, Limits)
    request.app[STATE].set_totallimit(body.totallimit)
    return _json({"ok": True})


async def trust_keys(request: web.Request) -> web.Response:
    body = await _body(request, TrustKeys)
    request.app[STATE].keys.add(body.keys)
    return _json({"ok": True})


async def peer_secret(request: web.Request) -> web.Response:
    body = await _body(request, PeerSecret)
    s = request.app[STATE]
    if len(s.peer_secrets) >= 256 and body.supernode not in s.peer_secrets:
        raise PayloadTooLarge(f"at most 256 peer secrets (have {len(s.peer_secrets)})")
    s.peer_secrets[body.supernode] = body.secret
    return _json({"ok": True})


async def back_to_source(request: web.Request) -> web.Response:
    body = await _body(request, BackToSource)
    request.app[STATE].metrics.back_to_source.labels(body.reason).inc()
    return _json({"ok": True})


async def replay_spool(request: web.Request) -> web.Response:
    from .protocol import socket_path
    from .spool import replay

    home = request.app[STATE].config.home
    return _json({"ok": True, "replayed": await replay(home, socket_path(home))})


async def shutdown(request: web.Request) -> web.Response:
    request.app[STATE].stop.set()
    return _json({"ok": True})


def build_control_app(state: ServerState, notify: Notify) -> web.Application:
    app = web.Application(middlewares=[error_middleware(logger=log)], client_max_size=8 << 20)
    app[STATE] = state
    app[NOTIFY] = notify
    r = app.router
    r.add_get("/info", info, allow_head=False)
    r.add_get("/files", list_files, allow_head=False)
    r.add_post("/files", register_file)
    r.add_post("/files/{task_id}/verified", mark_verified)
    r.add_post("/files/{task_id}/moved", moved)
    r.add_delete("/files/{task_id}", remove)
    r.add_post("/limits", limits)
    r.add_post("/keys", trust_keys)
    r.add_post("/secrets", peer_secret)
    r.add_post("/back-to-source", back_to_source)
    r.add_post("/spool", replay_spool)
    r.add_post("/shutdown", shutdown)
    localread.add_routes(r)
    return app
