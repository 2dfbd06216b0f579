"""Peer-facing HTTP: `GET /peer/file/{task_id}` with one Range inside one verified piece,
served with sendfile; and `GET /_ping`. Nothing else is reachable from the network."""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import web

from common.pieces import piece_of_range
from common.ranges import RangeSyntaxError, RangeUnsatisfiable, parse_range
from common.taskid import is_task_id

from .state import ServerState

log = logging.getLogger("dfget.server")
STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
FILE_DROPPED: web.AppKey[object] = web.AppKey("file_dropped", object)


class _SentFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself; aiohttp's second prepare() is a no-op."""

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def,override]
        if self.prepared:
            return None
        return await super().prepare(request)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def serve_piece(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.last_request = time.monotonic()
    task_id = request.match_info["task_id"]
    entry = state.table.get(task_id) if is_task_id(task_id) else None
    if entry is None or entry.length < 0:
        return _error(404, "not_found", "unknown task")
    header = request.headers.get("Range")
    if header is None:
        return _error(400, "bad_request", "a Range header is required")
    try:
        rng = parse_range(header, entry.length)
    except RangeSyntaxError as exc:
        return _error(400, "bad_request", str(exc))
    except RangeUnsatisfiable as exc:
        return _error(416, "range_not_satisfiable", str(exc))
    piece = piece_of_range(rng.start, rng.end, entry.length, entry.piece_size)
    if piece is None:
        return _error(400, "bad_request", "the range spans several pieces")
    if not entry.holds(piece):
        return _error(404, "not_found", "piece not held")
    if not entry.still_valid():
        request.app[FILE_DROPPED](entry)  # type: ignore[operator]
        return _error(404, "not_found", "file no longer available")
    if state.active_uploads >= state.config.max_uploads:
        return _error(503, "busy", "no upload slot")
    state.active_uploads += 1
    try:
        entry.last_access = time.monotonic()
        await state.throttle.consume(rng.length)
        return await _send(request, state, entry.path, rng.length)
    finally:
        state.active_uploads -= 1
        state.last_request = time.monotonic()


async def _send(request: web.Request, state: ServerState, path: object, nbytes: int) -> web.StreamResponse:
    """Send inside the handler (not after it returns) so the slot is held exactly while
    bytes flow, and a reader too slow for `upload_timeout` is cut off."""
    resp = _SentFileResponse(path, chunk_size=256 * 1024)  # type: ignore[arg-type]
    resp.headers["Cache-Control"] = "no-store"
    try:
        async with asyncio.timeout(state.config.upload_timeout):
            await resp.prepare(request)
    except TimeoutError:
        log.info("upload to %s timed out; slot freed", request.remote)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError from None
    state.uploaded_bytes += nbytes
    return resp


def build_peer_app(state: ServerState, on_dropped: object) -> web.Application:
    app = web.Application(client_max_size=1024)
    app[STATE] = state
    app[FILE_DROPPED] = on_dropped
    app.router.add_get("/peer/file/{task_id}", serve_piece, allow_head=False)
    app.router.add_get("/_ping", ping, allow_head=False)
    return app
