"""The operator dashboard: `GET /ui`, a static page shipped in `supernode/static/`, and
the JSON endpoints it polls (docs/api.md, "Dashboard").

- `GET /api/v1/ui/tasks`        tasks with CDN status and progress
- `GET /api/v1/ui/peers`        peer servers seen in those tasks (addresses: admin data)
- `GET /api/v1/tasks/{id}/map`  who holds which piece (bitmaps) and who is fetching what
                                from whom, for a bounded number of clients

Every answer is bounded (task and client caps, bitmaps instead of per-piece records)
and computed at most once per CACHE_SECONDS whatever the number of browsers polling:
concurrent requests for the same view share one Redis read (`Coalescer`). Each JSON
handler is a plain module-level coroutine, so the admin-token check can be added as one
decorator on each; the page sends `Authorization: Bearer <token>` once it knows one.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from aiohttp import web

from common import __version__, errors
from common.pieces import piece_count
from common.taskid import is_task_id, redact_url
from supernode.scheduling.policy import Bitmap
from supernode.state import STATE
from supernode.store.repo import PeerInfo, PieceMap, TaskOverview

from .admin import admin_only
from .handlers import reply

STATIC = Path(__file__).parent.parent / "static"
ASSETS = {"index.html": "text/html", "dashboard.js": "text/javascript", "dashboard.css": "text/css"}
CACHE_SECONDS = 0.5
TASKS_DEFAULT, TASKS_MAX = 50, 200
CLIENTS_DEFAULT, CLIENTS_MAX = 64, 256
PEERS_MAX = 256
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


class Coalescer:
    """Answers computed at most once per `ttl` seconds per key; callers arriving while one
    is computed wait for it instead of reading Redis again. A failure is not kept."""

    def __init__(self, ttl: float, max_keys: int = 512) -> None:
        self.ttl = ttl
        self.max_keys = max_keys
        self._done: dict[Hashable, tuple[float, Any]] = {}
        self._running: dict[Hashable, asyncio.Task[Any]] = {}

    async def get(self, key: Hashable, make: Callable[[], Awaitable[Any]]) -> Any:
        now = time.monotonic()
        hit = self._done.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        task = self._running.get(key)
        if task is None:
            task = asyncio.ensure_future(make())
            self._running[key] = task
            task.add_done_callback(lambda t, k=key: self._finished(k, t))
        # shielded: a browser going away must not cancel the read the others wait for
        return await asyncio.shield(task)

    def _finished(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        self._running.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        now = time.monotonic()
        if len(self._done) >= self.max_keys:
            self._done = {k: v for k, v in self._done.items() if v[0] > now}
            if len(self._done) >= self.max_keys:
                self._done.clear()
        self._done[key] = (now + self.ttl, task.result())


UI_CACHE: web.AppKey[Coalescer] = web.AppKey("ui_cache", Coalescer)


# --- pure formatting ---------------------------------------------------------------------
def display_url(url: str) -> str:
    """Scheme, host and path only: credentials are dropped and the query too (signed
    URLs carry their tokens there)."""
    parts = urlsplit(redact_url(url))
    bare = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return bare + ("?…" if parts.query else "")


def held_bytes(bitmap: bytes, length: int, piece_size: int, count: int) -> int:
    """Bytes covered by the pieces set in `bitmap` (the last piece may be short)."""
    bits = Bitmap(bitmap)
    n = bits.count()
    if piece_size <= 0 or n == 0:
        return 0
    total = n * piece_size
    if length >= 0 and count > 0 and (count - 1) in bits:
        total -= count * piece_size - length
    return total


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _count(ov_count: int, length: int, piece_size: int) -> int:
    if ov_count >= 0:
        return ov_count
    return piece_count(length, piece_size) if length >= 0 and piece_size > 0 else -1


def task_row(ov: TaskOverview) -> dict[str, Any]:
    m = ov.meta
    cdn_bytes, held_bytes_ = ov.cdn_pieces * m.piece_size, ov.held * m.piece_size
    if m.length >= 0:  # the last piece may be short
        cdn_bytes = min(cdn_bytes, m.length)
        held_bytes_ = min(held_bytes_, m.length * ov.clients)
    return {
        "task": m.info(), "url": display_url(m.url), "created_ms": m.created_ms,
        "cdn_pieces": ov.cdn_pieces, "cdn_bytes": cdn_bytes, "clients": ov.clients,
        "held": ov.held, "held_bytes": held_bytes_,
    }


def map_body(pm: PieceMap, sn_id: str) -> dict[str, Any]:
    m = pm.meta
    count = _count(m.piece_count, m.length, m.piece_size)
    if count < 0:  # chunked origin still streaming: as far as the CDN got
        count = Bitmap(pm.cdn).count()

    def source(sid: str) -> dict[str, Any]:
        if sid == m.cdn:
            return {"source": sid, "kind": "cdn", "addr": None}
        info = pm.sources.get(sid)
        if info is None:
            return {"source": sid, "kind": "unknown", "addr": None}
        return {"source": sid, "kind": "peer", "addr": f"{info.ip}:{info.port}"}

    clients = []
    for c in pm.clients:
        clients.append({
            "cid": c.cid, "peer_id": c.info.peer_id, "ip": c.info.ip, "port": c.info.port,
            "kind": c.info.kind, "bitmap": _b64(c.have), "pieces": Bitmap(c.have).count(),
            "bytes": held_bytes(c.have, m.length, m.piece_size, count), "uploads": c.uploads,
            "failures": c.failures,
            "fetching": [{"piece": n, **source(sid)} for n, sid in c.inflight],
        })
    return {
        "task": m.info(), "url": display_url(m.url), "piece_count": count,
        "supernode_id": sn_id,
        "cdn": {"id": m.cdn, "here": m.cdn == sn_id, "bitmap": _b64(pm.cdn),
                "pieces": Bitmap(pm.cdn).count(), "uploads": pm.cdn_uploads},
        "clients_total": pm.clients_total, "truncated": pm.clients_total > len(clients),
        "clients": clients,
    }


def peer_rows(samples: dict[str, dict[str, PeerInfo]], cap: int) -> list[dict[str, Any]]:
    """One row per peer server (peer id), with how many of the tasks it is in."""
    rows: dict[str, dict[str, Any]] = {}
    for tid, clients in samples.items():
        for info in clients.values():
            if not info.peer_id:
                continue  # a client that does not serve
            row = rows.get(info.peer_id)
            if row is None:
                if len(rows) >= cap:
                    continue
                row = rows[info.peer_id] = {"peer_id": info.peer_id, "ip": info.ip,
                                            "port": info.port, "kind": info.kind, "tasks": set()}
            row["tasks"].add(tid)
    out = sorted(rows.values(), key=lambda r: (r["ip"], r["port"], r["peer_id"]))
    for r in out:
        r["tasks"] = len(r["tasks"])
    return out


def _int_param(request: web.Request, name: str, default: int, hi: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= hi:
        raise errors.BadRequest(f"{name} must be an integer from 1 to {hi}")
    return int(raw)


# --- handlers ----------------------------------------------------------------------------
async def page(request: web.Request) -> web.StreamResponse:
    headers = {**_HEADERS, "Content-Type": "text/html"}
    return web.FileResponse(STATIC / "index.html", headers=headers)


async def asset(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    if name not in ASSETS:  # a fixed table: no path is ever built from the request
        raise errors.NotFound("no such dashboard file")
    return web.FileResponse(STATIC / name, headers={**_HEADERS, "Content-Type": ASSETS[name]})


async def tasks_view(request: web.Request) -> web.Response:
    st = request.app[STATE]
    limit = _int_param(request, "limit", TASKS_DEFAULT, TASKS_MAX)

    async def build() -> dict[str, Any]:
        overviews = await st.repo.task_overviews(await st.repo.list_tasks(limit))
        return {"supernode_id": st.sn_id, "version": __version__, "now_ms": int(time.time() * 1000),
                "tasks": [task_row(ov) for ov in overviews]}

    return reply(request, await request.app[UI_CACHE].get(("tasks", limit), build))


@admin_only  # peer addresses
async def peers_view(request: web.Request) -> web.Response:
    st = request.app[STATE]
    limit = _int_param(request, "limit", PEERS_MAX, PEERS_MAX)

    async def build() -> dict[str, Any]:
        tids = await st.repo.list_tasks(TASKS_DEFAULT)
        rows = peer_rows(await st.repo.clients_sample(tids, CLIENTS_DEFAULT), limit)
        alive = await st.repo.peers_alive([r["peer_id"] for r in rows]) if rows else []
        for r, a in zip(rows, alive):
            r["alive"] = a
        return {"peers": rows, "truncated": len(rows) >= limit}

    return reply(request, await request.app[UI_CACHE].get(("peers", limit), build))


@admin_only  # client ids and peer addresses
async def map_view(request: web.Request) -> web.Response:
    st = request.app[STATE]
    tid = request.match_info["task_id"]
    if not is_task_id(tid):
        raise errors.BadRequest("task id must be 64 lowercase hex characters")
    cap = _int_param(request, "clients", CLIENTS_DEFAULT, CLIENTS_MAX)

    async def build() -> dict[str, Any] | None:
        pm = await st.repo.piece_map(tid, cap)
        return None if pm is None else map_body(pm, st.sn_id)

    body = await request.app[UI_CACHE].get(("map", tid, cap), build)
    if body is None:
        raise errors.NotFound("unknown task")
    return reply(request, body)


async def _to_ui(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui")


def routes(app: web.Application) -> None:
    app[UI_CACHE] = Coalescer(CACHE_SECONDS)
    r = app.router
    r.add_get("/ui", page)
    r.add_get("/ui/", _to_ui)
    r.add_get("/ui/{name}", asset)
    r.add_get("/api/v1/ui/tasks", tasks_view)
    r.add_get("/api/v1/ui/peers", peers_view)
    r.add_get("/api/v1/tasks/{task_id}/map", map_view)
