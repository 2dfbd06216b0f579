"""Preheat: have the CDN fetch a file before anyone asks for it.

`POST /api/v1/preheat` registers the task exactly as a client's registration would (same
task id, same origin policy, same fetch-once lease), with no client and no peer, and
answers at once with the job id: the task id. `GET /api/v1/preheat/{id}` reads the
task's state from Redis, so any supernode of the cluster answers for any job. Both
need the admin token when one is configured.

A preheated task is kept like any other: dropped from Redis after --task-expire-time
without use; its cached file stays on disk (until disk GC needs the space) and a later
registration revalidates it with one conditional request instead of fetching it again.
"""

from __future__ import annotations

import logging

from aiohttp import web

from common import errors, wire
from common.taskid import is_task_id, redact_url
from supernode.state import STATE, SupernodeState
from supernode.store.repo import TaskMeta

from . import handlers as api
from .admin import admin_only

log = logging.getLogger("supernode.preheat")


def status_of(meta: TaskMeta, pieces_fetched: int) -> wire.PreheatStatus:
    """Pure: the job's status from the task's meta and the number of CDN pieces."""
    if meta.status == "success":
        fetched = max(meta.length, 0)
    elif meta.piece_size > 0:
        fetched = pieces_fetched * meta.piece_size
        if meta.length >= 0:
            fetched = min(fetched, meta.length)
    else:
        fetched = 0
    return wire.PreheatStatus(
        id=meta.task_id, status=meta.status, length=meta.length, piece_count=meta.piece_count,
        pieces_fetched=pieces_fetched, bytes_fetched=fetched, error=meta.info().error)


async def _status(st: SupernodeState, meta: TaskMeta) -> wire.PreheatStatus:
    return status_of(meta, (await st.repo.cdn_bitmap(meta.task_id)).count())


@admin_only
async def start(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    req = await api.body(request, wire.PreheatRequest)
    meta = await api.open_task(st, req.url, headers=dict(req.headers), md5=req.md5,
                               identifier=req.identifier, filter_keys=list(req.filter), range_=None)
    await st.cdn.ensure(meta)
    log.info("preheat of task %s (%s): %s", meta.task_id[:12], redact_url(req.url), meta.status)
    return api.reply(request, await _status(st, meta), status=202)


@admin_only
async def status(request: web.Request) -> web.Response:
    st: SupernodeState = request.app[STATE]
    job = request.match_info["job_id"]
    if not is_task_id(job):
        raise errors.BadRequest("preheat id must be 64 lowercase hex characters")
    meta = await st.repo.get_meta(job)
    if meta is None:
        raise errors.NotFound("unknown preheat job (or its task expired)")
    return api.reply(request, await _status(st, meta))


def routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/preheat", start)
    app.router.add_get("/api/v1/preheat/{job_id}", status)
