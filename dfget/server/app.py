"""Peer-facing HTTP: `GET /peer/file/{task_id}` with one Range inside one verified piece,
served with sendfile; `POST /peer/pop/{task_id}`, a supernode's proof-of-possession
challenge (pop.py); `GET /_ping`; and `GET /metrics` (counters only). Nothing else is
reachable from the network."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from common import tokens
from common.httperrors import error_middleware, route_of
from common.httplog import server_logger
from common.pieces import piece_of_range
from common.ranges import ByteRange, RangeSyntaxError, RangeUnsatisfiable, parse_range
from common.taskid import is_task_id
from common.tokenheaders import SOURCE_HEADER

from . import pop
from .state import ServerState
from .table import FileEntry

log = logging.getLogger("dfget.server")
STATE: web.AppKey[ServerState] = web.AppKey("state", ServerState)
FILE_DROPPED: web.AppKey[object] = web.AppKey("file_dropped", object)
RefreshKeys = Callable[[], Awaitable[bool]]
REFRESH_KEYS: web.AppKey[RefreshKeys] = web.AppKey("refresh_keys", RefreshKeys)  # type: ignore[arg-type]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _SentFileResponse(web.FileResponse):
    """A FileResponse the handler sends itself; aiohttp's second prepare() is a no-op."""

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def,override]
        if self.prepared:
            return None
        return await super().prepare(request)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


@web.middleware
async def _cap(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A cap on requests in progress (404s and 400s included) so a flood cannot pile up
    handlers."""
    state = request.app[STATE]
    if state.active_requests >= state.config.max_requests:
        return _error(503, "busy", "too many requests in progress")
    state.active_requests += 1
    try:
        return await handler(request)
    finally:
        state.active_requests -= 1


def _count(request: web.Request, status: int, seconds: float) -> None:
    """Every answer by endpoint (the route's pattern: bounded labels) and status; not a
    request whose reader went away before an answer (status 0)."""
    if status:
        request.app[STATE].metrics.requests.labels(route_of(request), str(status)).inc()


async def ping(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


_ERROR_REASONS = {400: "bad_request", 404: "not_found", 416: "range_not_satisfiable"}
_FAILED = "dfget.upload_failed"  # request key: why a started upload did not finish


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body, ctype = state.metrics.render(state.active_uploads, len(state.table.files))
    return web.Response(body=body, headers={"Content-Type": ctype})


async def serve_piece(request: web.Request) -> web.StreamResponse:
    """Counts every answer by status (and why a piece was not served); one debug line
    per request."""
    m = request.app[STATE].metrics
    t0 = time.perf_counter()
    status = 0
    try:
        resp = await _serve_piece(request)
        status = resp.status
        return resp
    except (asyncio.CancelledError, OSError):
        m.errors.labels(request.get(_FAILED, "aborted")).inc()  # reader gone, or too slow
        raise
    finally:
        if status:
            if status == 503:
                m.busy.inc()
            elif status in _ERROR_REASONS:
                m.errors.labels(_ERROR_REASONS[status]).inc()
        if log.isEnabledFor(logging.DEBUG):
            _log_upload(request, status, t0)


def _log_upload(request: web.Request, status: int, t0: float) -> None:
    ms = (time.perf_counter() - t0) * 1000
    task, rng = request.match_info["task_id"][:16], request.headers.get("Range")
    result = status or "aborted"
    log.debug("upload of task %s %s to %s: %s in %.1f ms", task, rng, request.remote, result, ms,
              extra={"task": task, "range": rng, "peer": request.remote, "status": result,
                     "ms": round(ms, 1)})


# A piece request can overtake our own dfget's news of the piece: its control calls wait
# in a queue while the server it launched comes up (the request waits in the socket's
# backlog, and the server may take it first). The supernode sent the request because our
# dfget reported the piece, so the news is on its way: a young server waits for it this
# long before answering 404 (the peer would count a failure against us, and fetch the
# piece from the seed instead).
CATCH_UP = 2.0
YOUNG = 10.0  # a server this new (s) may not have had its first registrations yet


async def _serve_piece(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    state.last_request = time.monotonic()
    task_id = request.match_info["task_id"]
    deadline = time.monotonic() + CATCH_UP
    entry = state.table.get(task_id) if is_task_id(task_id) else None
    while entry is None and is_task_id(task_id) and time.monotonic() - state.started < YOUNG:
        if time.monotonic() >= deadline:
            break
        await state.wait_table(deadline - time.monotonic())
        entry = state.table.get(task_id)
    if entry is None or entry.length < 0:
        return _error(404, "not_found", "unknown task")
    ranges = request.headers.getall("Range", [])
    if len(ranges) != 1:
        return _error(400, "bad_request", "exactly one Range header is required")
    header = ranges[0]
    try:
        rng = parse_range(header, entry.length)
    except RangeSyntaxError as exc:
        return _error(400, "bad_request", str(exc))
    except RangeUnsatisfiable as exc:
        return _error(416, "range_not_satisfiable", str(exc))
    piece = piece_of_range(rng.start, rng.end, entry.length, entry.piece_size)
    if piece is None:
        return _error(400, "bad_request", "the range spans several pieces")
    if entry.piece_auth and (refused := await _check_token(request, state, entry, rng.start, rng.end)):
        return refused
    young = time.monotonic() - state.started < YOUNG
    # the client the supernode named as the source: one of this entry's (its download's
    # report is on its way) or an older one's (replaced: 404 at once); unnamed: young
    named = request.headers.get(SOURCE_HEADER)
    ours = None if named is None else named in entry.clients
    while True:
        held, valid = entry.holds(piece), entry.still_valid()
        # Only a download in progress has news on its way: the path it is renamed to (its
        # file is briefly not where it was), or the piece, when the source named is this
        # entry's client. A piece held by a client of an older entry is the common case of
        # a host downloading the task again: its new registration replaced the entry that
        # held it; that 404 must come at once.
        waiting = not valid or (not held and (ours if ours is not None else young))
        if not waiting or not entry.in_progress() or time.monotonic() >= deadline:
            break
        await state.wait_table(deadline - time.monotonic())
        now = state.table.get(task_id)
        if now is None:
            return _error(404, "not_found", "unknown task")
        entry = now
    if not held:
        return _error(404, "not_found", "piece not held")
    path = entry.path
    if not valid and (other := state.table.stand_in(entry)) is not None:
        # this task's output is gone, but another output of the same content refers to
        # the same verified bytes
        path, valid = other.path, True
        other.last_access = time.monotonic()
    if not valid:
        request.app[FILE_DROPPED](entry)  # type: ignore[operator]
        return _error(404, "not_found", "file no longer available")
    if state.active_uploads >= state.config.max_uploads:
        return _error(503, "busy", "no upload slot")
    state.active_uploads += 1
    try:
        entry.last_access = time.monotonic()
        await state.throttle.consume(rng.length)
        t0 = time.perf_counter()
        resp = await _send(request, state, path, rng)
        state.metrics.seconds.observe(time.perf_counter() - t0)
        return resp
    finally:
        state.active_uploads -= 1
        state.last_request = time.monotonic()


_last_refusal_log: dict[str, float] = {}


async def _check_token(request: web.Request, state: ServerState, entry: FileEntry, start: int,
                       end: int) -> web.Response | None:
    """Offline: the keys came with the registration (and the heartbeat); only a key id
    never seen makes us ask the supernodes, at most every few seconds."""
    token = request.headers.get(tokens.TOKEN_HEADER)
    client = request.headers.get(tokens.CLIENT_HEADER)
    try:
        try:
            tokens.verify(token, state.keys.get, task_id=entry.task_id, start=start, end=end, client=client,
                          source=state.peer_id, now=time.time())
        except tokens.UnknownKey:
            if not await request.app[REFRESH_KEYS]():
                raise
            tokens.verify(token, state.keys.get, task_id=entry.task_id, start=start, end=end, client=client,
                          source=state.peer_id, now=time.time())
    except tokens.TokenError as exc:
        state.auth_refused[exc.reason] += 1
        state.metrics.auth_refused.labels(exc.reason).inc()
        now = time.monotonic()
        if now - _last_refusal_log.get(exc.reason, -1e9) >= 1.0:  # a flood must not flood the log
            _last_refusal_log[exc.reason] = now
            log.info("piece request from %s refused (%s): %s; %d refused so far", request.remote,
                     exc.reason, exc.message, state.auth_refused[exc.reason])
        return web.json_response(exc.to_wire(), status=exc.status)
    return None


async def _no_refresh() -> bool:
    return False


def only_the_range(request: web.Request, rng: ByteRange) -> web.BaseRequest:
    """The request as FileResponse may see it: the checked range and nothing else. Given
    the client's headers it would serve `<file>.gz` or `.br` next to the file for an
    Accept-Encoding (a file never registered), the whole file for an If-Range that does
    not match (unverified pieces too), or 304/412 for conditional headers."""
    return request.clone(headers={"Range": rng.header()})


async def _send(request: web.Request, state: ServerState, path: object, rng: ByteRange) -> web.StreamResponse:
    """Send inside the handler (not after it returns) so the slot is held exactly while
    bytes flow, and a reader too slow for `upload_timeout` is cut off."""
    resp = _SentFileResponse(path, chunk_size=256 * 1024)  # type: ignore[arg-type]
    resp.headers["Cache-Control"] = "no-store"
    try:
        async with asyncio.timeout(state.config.upload_timeout):
            await resp.prepare(only_the_range(request, rng))
    except TimeoutError:
        request[_FAILED] = "timeout"
        log.info("upload to %s timed out; slot freed", request.remote)
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError from None
    state.uploaded_bytes += rng.length
    state.metrics.bytes.inc(rng.length)
    state.metrics.pieces.inc()
    return resp


def runner_kwargs(state: ServerState) -> dict[str, object]:
    """AppRunner options of the peer-facing server. keepalive_timeout is also the header
    deadline: aiohttp arms it when a connection opens and bytes trickling in do not push
    it back, so a client that never completes its request head is cut off."""
    return {"keepalive_timeout": state.config.header_timeout, "lingering_time": 2.0,
            "logger": server_logger("dfget.server.http"), "shutdown_timeout": state.config.drain_timeout}


def build_peer_app(state: ServerState, on_dropped: object,
                   refresh_keys: RefreshKeys = _no_refresh) -> web.Application:
    app = web.Application(middlewares=[error_middleware(logger=log, observe=_count, cancelled_status=0), _cap],
                          client_max_size=1024)
    app[STATE] = state
    app[FILE_DROPPED] = on_dropped
    app[REFRESH_KEYS] = refresh_keys
    app.router.add_get("/peer/file/{task_id}", serve_piece, allow_head=False)
    app.router.add_get("/_ping", ping, allow_head=False)
    app[pop.NONCES] = pop.Nonces()
    app.router.add_post("/peer/pop/{task_id}", pop.answer_challenge)
    app.router.add_get("/metrics", metrics, allow_head=False)
    return app
