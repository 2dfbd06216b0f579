"""Local reads of this host's downloads, on the control socket only (a Unix socket in
--home: only this host's users allowed into that directory reach it; nothing of it is on
the peer port that remote peers dial).

GET /local/jobs: every job known here; GET /local/jobs/{task_id}: one job's state
(dfget/server/jobs.py); POST /local/jobs/{task_id}/invalidate: stop serving it and stop
its running dfget; GET /local/read/{task_id} (optional `Range: bytes=A-B`, optional
`?wait=SECONDS`, default 60, at most 3600: how long the read may go without progress):
the bytes as they become verified. Headers go out once the length is known; a job that
fails or is invalidated afterwards aborts the response (the body is cut short, never
filled with unverified bytes).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from typing import TYPE_CHECKING

from aiohttp import web

from common.errors import BadRequest, NotFound
from common.ranges import ByteRange, RangeSyntaxError, RangeUnsatisfiable, parse_range
from common.taskid import is_task_id

from .jobs import COMPLETED, DOWNLOADING, FAILED, INVALID, NOT_STARTED, job_state, verified_until
from .table import FileEntry

if TYPE_CHECKING:
    from .state import ServerState

CHUNK = 256 * 1024
DEFAULT_WAIT = 60.0
MAX_WAIT = 3600.0
POLL = 1.0  # a dfget that dies says nothing: its job turns Failed at most this late


def _json(body: dict[str, object], status: int = 200) -> web.Response:
    return web.json_response(body, status=status)


def _task_id(request: web.Request) -> str:
    tid = request.match_info["task_id"]
    if not is_task_id(tid):
        raise NotFound("unknown task")
    return tid


def state_of(s: ServerState, tid: str) -> tuple[str, FileEntry | None]:
    entry = s.table.get(tid)
    alive = entry is not None and entry.in_progress()
    return job_state(entry, s.jobs.get(tid), owner_alive=alive), entry


def describe(s: ServerState, tid: str) -> dict[str, object]:
    state, entry = state_of(s, tid)
    body: dict[str, object] = {"task_id": tid, "state": state}
    if entry is not None:
        body.update(length=entry.length, piece_size=entry.piece_size, verified_pieces=len(entry.verified),
                    verified_prefix=verified_until(entry, 0))
    record = s.jobs.get(tid)
    if record is not None and entry is None:
        body["reason"] = record.reason
    return body


async def list_jobs(request: web.Request) -> web.Response:
    s = _state(request)
    tids = list(s.table.files) + [t for t, _ in s.jobs.items() if t not in s.table.files]
    return _json({"jobs": [describe(s, t) for t in tids]})


async def get_job(request: web.Request) -> web.Response:
    return _json(describe(_state(request), _task_id(request)))


async def invalidate(request: web.Request) -> web.Response:
    s = _state(request)
    tid = _task_id(request)
    before, entry = state_of(s, tid)
    if before == NOT_STARTED:
        raise NotFound("unknown task")
    s.jobs.set(tid, INVALID, "invalidated by a local client")
    if entry is not None:
        s.table.remove(tid)
        await request.app[_notify_key()]([entry])  # its clients leave the swarm
    s.table_changed()
    return _json({"task_id": tid, "state": INVALID, "was": before})


def _wait_param(request: web.Request) -> float:
    raw = request.query.get("wait")
    if raw is None:
        return DEFAULT_WAIT
    try:
        wait = float(raw)
    except ValueError:
        raise BadRequest("wait must be a number of seconds") from None
    if not 0 <= wait <= MAX_WAIT:
        raise BadRequest(f"wait must be within 0..{MAX_WAIT:g} s")
    return wait


def _refusal(state: str, s: ServerState, tid: str) -> web.Response:
    record = s.jobs.get(tid)
    reason = record.reason if record is not None else "its dfget stopped before the end"
    if state == INVALID:
        return _json({"error": "invalidated", "message": f"the job was invalidated: {reason}"}, 410)
    return _json({"error": "job_failed", "message": f"the job failed: {reason}"}, 409)


async def read(request: web.Request) -> web.StreamResponse:
    s = _state(request)
    tid = _task_id(request)
    wait = _wait_param(request)
    headers = request.headers.getall("Range", [])
    if len(headers) > 1:
        raise BadRequest("at most one Range header")
    # 1. the job and its length
    deadline = time.monotonic() + wait
    while True:
        state, entry = state_of(s, tid)
        if state in (FAILED, INVALID):
            return _refusal(state, s, tid)
        if entry is not None and entry.length >= 0:
            break
        if time.monotonic() >= deadline:
            if state == NOT_STARTED:
                raise NotFound("no download of this task on this host")
            return _json({"error": "timeout", "message": "the length did not become known in time"}, 504)
        await s.wait_table(min(POLL, deadline - time.monotonic()))
    length = entry.length
    try:
        rng = parse_range(headers[0], length) if headers else None
    except RangeSyntaxError as exc:
        raise BadRequest(str(exc)) from None
    except RangeUnsatisfiable as exc:
        return web.json_response({"error": "range_not_satisfiable", "message": str(exc)}, status=416,
                                 headers={"Content-Range": f"bytes */{length}"})
    if rng is None and length == 0:
        return web.Response(status=200, body=b"", content_type="application/octet-stream")
    rng = rng or ByteRange(0, length - 1)
    resp = web.StreamResponse(status=206 if headers else 200)
    resp.content_type = "application/octet-stream"
    resp.content_length = rng.length
    if headers:
        resp.headers["Content-Range"] = rng.content_range(length)
    resp.headers["Cache-Control"] = "no-store"
    await resp.prepare(request)
    # 2. the bytes, as they are verified
    pos, end = rng.start, rng.end + 1
    deadline = time.monotonic() + wait
    while pos < end:
        state, entry = state_of(s, tid)
        if state in (FAILED, INVALID, NOT_STARTED) or entry is None or entry.length != length:
            return _abort(request, resp)  # never a byte past what was verified
        upto = min(verified_until(entry, pos), end)
        if upto > pos:
            entry.last_access = time.monotonic()
            try:
                pos = await _send(resp, entry, pos, upto)
            except OSError:
                return _abort(request, resp)
            deadline = time.monotonic() + wait
            continue
        if time.monotonic() >= deadline:
            return _abort(request, resp)
        await s.wait_table(min(POLL, deadline - time.monotonic()))
    await resp.write_eof()
    return resp


async def _send(resp: web.StreamResponse, entry: FileEntry, pos: int, upto: int) -> int:
    fd = await asyncio.to_thread(os.open, entry.path, os.O_RDONLY)
    try:
        while pos < upto:
            chunk = await asyncio.to_thread(os.pread, fd, min(CHUNK, upto - pos), pos)
            if not chunk:
                raise OSError(f"{entry.path}: short read at {pos}")
            await resp.write(chunk)
            pos += len(chunk)
    finally:
        os.close(fd)
    return pos


def _abort(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """The response was promised whole: cutting the connection is the only honest end."""
    if request.transport is not None:
        request.transport.abort()
    with contextlib.suppress(Exception):
        resp.force_close()
    return resp


def _state(request: web.Request) -> ServerState:
    from .control import STATE

    return request.app[STATE]


def _notify_key():  # type: ignore[no-untyped-def]
    from .control import NOTIFY

    return NOTIFY


def add_routes(router: web.UrlDispatcher) -> None:
    router.add_get("/local/jobs", list_jobs, allow_head=False)
    router.add_get("/local/jobs/{task_id}", get_job, allow_head=False)
    router.add_post("/local/jobs/{task_id}/invalidate", invalidate)
    router.add_get("/local/read/{task_id}", read, allow_head=False)


__all__ = ["COMPLETED", "DOWNLOADING", "add_routes"]
