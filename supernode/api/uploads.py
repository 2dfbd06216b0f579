"""HTTP face of the resumable uploads (supernode/cdn/uploads.py; docs/api.md "Uploads").

    POST   /api/v1/uploads          {"digest": "sha256:<hex>", "length": N}
                                    201 + Location (a new session), or 200 committed
                                    (the cache has the digest already: send nothing)
    HEAD   /api/v1/uploads/{id}     Upload-Offset / Upload-Length: where to resume
    GET    /api/v1/uploads/{id}     the same as JSON
    PATCH  /api/v1/uploads/{id}     Upload-Offset: <n>, Content-Length, the chunk
    PUT    /api/v1/uploads/{id}     commit (done by the last PATCH already)
    DELETE /api/v1/uploads/{id}     cancel, free the space

Every call needs the admin token when the supernode has one (they write its cache).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from common import errors
from supernode.cdn.uploads import Session, UploadLimits, Uploads, check_digest, upload_error
from supernode.state import STATE

from . import handlers as api
from .admin import check_admin

UPLOADS: web.AppKey[Uploads] = web.AppKey("uploads", Uploads)
_OFFSET = re.compile(r"^[0-9]{1,19}\Z")


class UploadRequest(msgspec.Struct, forbid_unknown_fields=True):
    digest: str
    length: int


def _uploads(request: web.Request) -> Uploads:
    check_admin(request, request.config_dict[STATE].settings.admin_token)
    return request.app[UPLOADS]


def _answer(request: web.Request, s: Session, ups: Uploads, status: int = 200) -> web.Response:
    resp = api.reply(request, s.info(ups.limits.ttl), status=status)
    resp.headers.update({"Upload-Offset": str(s.offset), "Upload-Length": str(s.length),
                         "Location": f"/api/v1/uploads/{s.id}", "Cache-Control": "no-store"})
    return resp


async def create(request: web.Request) -> web.Response:
    ups = _uploads(request)
    req = await api.body(request, UploadRequest)
    check_digest(req.digest)
    entry = ups.cached(req.digest)
    if entry is not None:
        if entry.length != req.length:
            raise upload_error(errors.Conflict, "length_mismatch",
                               f"the cache holds {req.digest} with {entry.length} bytes, not {req.length}")
        return api.reply(request, {"state": "committed", "digest": req.digest, "task_id": entry.task_id,
                                   "length": entry.length, "offset": entry.length})
    s = ups.create(req.digest, req.length)
    return _answer(request, s, ups, status=201)


async def status(request: web.Request) -> web.Response:
    ups = _uploads(request)
    return _answer(request, ups.get(request.match_info["upload_id"]), ups)


def _offset(request: web.Request) -> int:
    raw = request.headers.get("Upload-Offset")
    if raw is None or not _OFFSET.match(raw.strip()):
        raise upload_error(errors.BadRequest, "bad_offset", "Upload-Offset must be a decimal byte offset")
    return int(raw.strip())


async def append(request: web.Request) -> web.Response:
    ups = _uploads(request)
    sid = request.match_info["upload_id"]
    ups.get(sid)  # 404 before anything else
    offset = _offset(request)
    size = request.content_length
    if size is None:
        raise upload_error(errors.BadRequest, "length_required", "a chunk needs a Content-Length", status=411)

    async def read(n: int) -> bytes:
        try:
            return await request.content.read(n)
        except (OSError, HttpProcessingError, RequestPayloadError) as exc:  # the client went away
            raise errors.BadRequest(f"chunk body cut off: {type(exc).__name__}") from None

    s = await ups.append(sid, offset, size, read)
    return _answer(request, s, ups)


async def commit(request: web.Request) -> web.Response:
    ups = _uploads(request)
    s = await ups.commit(request.match_info["upload_id"])
    return _answer(request, s, ups)


async def cancel(request: web.Request) -> web.Response:
    ups = _uploads(request)
    s = ups.cancel(request.match_info["upload_id"])
    return api.reply(request, {"id": s.id, "state": s.state})


async def _uploads_ctx(app: web.Application) -> AsyncIterator[None]:
    st = app[STATE]
    cfg = st.settings
    ups = Uploads(st, UploadLimits(ttl=cfg.upload_ttl, max_sessions=cfg.max_upload_sessions,
                                   max_size=cfg.max_upload_size, read_timeout=cfg.body_timeout))
    await asyncio.to_thread(ups.clear_spool)
    app[UPLOADS] = ups
    gc = asyncio.create_task(ups.run_gc(), name="upload-gc")
    try:
        yield
    finally:
        gc.cancel()
        await asyncio.gather(gc, return_exceptions=True)


def setup(app: web.Application) -> None:
    """Routes and the session GC; after the state's cleanup context (it needs STATE)."""
    app.cleanup_ctx.append(_uploads_ctx)
    r = app.router
    r.add_post("/api/v1/uploads", create)
    r.add_get("/api/v1/uploads/{upload_id}", status)  # and HEAD
    r.add_patch("/api/v1/uploads/{upload_id}", append)
    r.add_put("/api/v1/uploads/{upload_id}", commit)
    r.add_delete("/api/v1/uploads/{upload_id}", cancel)

