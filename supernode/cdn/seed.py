"""The supernode as the first seed: serves verified CDN pieces on the download port.

Same shape as a peer server: `GET /peer/file/{task_id}` with exactly one Range lying in
one verified piece. The file is found in the cache's own table, never from the request
path. Uploads take a slot (503 when none is free) and a deadline so a slow reader
cannot hold one forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

from common import httperrors
from common.pieces import piece_of_range
from common.ranges import ByteRange, RangeSyntaxError, RangeUnsatisfiable, parse_range
from common.taskid import is_task_id

from .cache import PieceCache
from .throttle import Throttle


class PieceGate(Protocol):
    """Checks a request's piece token (`supernode.auth.PieceGate`, given by the app)."""

    async def check(self, request: web.Request, task_id: str, start: int, end: int) -> web.Response | None: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("supernode.seed")


class _FileResponse(web.FileResponse):
    """FileResponse whose prepare() may be called twice: we prepare it inside the
    upload slot and deadline, then aiohttp prepares the returned response again.

    And that really uses sendfile: under uvloop (the supernode's loop) `loop.sendfile`
    is not implemented, so aiohttp fell back to reading the file in a thread and writing
    it through the transport, 1 MiB at a time: an extra copy of every byte and a loop
    wake-up per MiB on the seed (about half its CPU per GiB served, issue 11). Here a
    worker thread calls os.sendfile on the connection's socket, waiting with poll()
    while it is full; the loop does not touch the socket meanwhile (the response owns it
    until the body is sent)."""

    async def prepare(self, request: web.BaseRequest):  # type: ignore[no-untyped-def]
        if self.prepared:
            return self._payload_writer
        return await super().prepare(request)

    async def _sendfile(self, request: web.BaseRequest, fobj, offset: int, count: int):  # type: ignore[no-untyped-def]
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        # Over TLS the bytes must go through the transport to be encrypted: sendfile on
        # the socket would put the file on the wire in clear, inside a TLS stream.
        tls = transport is not None and transport.get_extra_info("sslcontext") is not None
        if sock is None or count <= 0 or self.compression or tls:
            return await super()._sendfile(request, fobj, offset, count)
        writer = await web.StreamResponse.prepare(self, request)
        assert writer is not None and transport is not None
        writer.send_headers()  # type: ignore[attr-defined]
        for _ in range(2000):  # the head (a few hundred bytes) leaves at once unless the reader stalls
            if transport.is_closing():
                raise ConnectionResetError("connection lost")
            if transport.get_write_buffer_size() == 0:
                break
            await asyncio.sleep(0.005)
        else:
            raise ConnectionResetError("reader does not take the response head")
        stop = threading.Event()
        work = asyncio.ensure_future(asyncio.to_thread(_send_range, sock.fileno(), fobj.fileno(), offset, count, stop))
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError:
            stop.set()  # the deadline: the thread leaves within a poll interval
            await asyncio.wait([work])
            if not work.cancelled():
                work.exception()
            raise
        await writer.write_eof()
        return writer


def _send_range(sock_fd: int, file_fd: int, offset: int, count: int, stop: threading.Event) -> None:
    end = offset + count
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while offset < end and not stop.is_set():
        try:
            sent = os.sendfile(sock_fd, file_fd, offset, min(end - offset, 4 << 20))
        except BlockingIOError:
            for _fd, ev in poller.poll(100):
                if ev & (select.POLLERR | select.POLLHUP):
                    raise ConnectionResetError("reader went away") from None
            continue
        if sent == 0:
            raise ConnectionResetError("file shorter than the range")  # truncated under us
        offset += sent


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def only_the_range(request: web.Request, rng: ByteRange) -> web.BaseRequest:
    """The request as FileResponse may see it: the checked range only (it would answer a
    client's Accept-Encoding with a `.gz`/`.br` file next to ours, an If-Range that does
    not match with the whole file, conditional headers with 304/412)."""
    return request.clone(headers={"Range": rng.header()})


class Seed:
    def __init__(self, cache: PieceCache, *, slots: int, throttle: Throttle, min_rate: int = 64 << 10,
                 gate: PieceGate | None = None) -> None:
        self.cache = cache
        self.gate = gate  # piece tokens (None: --no-piece-auth)
        self.slots = slots
        self.active = 0
        self.throttle = throttle
        self.min_rate = min_rate
        self.bytes_served = 0
        self.draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[httperrors.error_middleware(logger=log)], client_max_size=1024)
        app.router.add_get("/peer/file/{task_id}", self.serve)
        app.router.add_get("/_ping", self.ping)
        return app

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def serve(self, request: web.Request) -> web.StreamResponse:
        if not log.isEnabledFor(logging.DEBUG):
            return await self._serve(request)
        t0, status = time.perf_counter(), "aborted"
        try:
            resp = await self._serve(request)
            status = str(resp.status)
            return resp
        finally:  # one line per piece upload, also when the reader went away
            ms = round((time.perf_counter() - t0) * 1000, 1)
            task, rng = request.match_info["task_id"][:16], request.headers.get("Range")
            log.debug("upload of task %s %s to %s: %s in %.1f ms", task, rng, request.remote,
                      status, ms, extra={"task": task, "range": rng, "peer": request.remote,
                                         "status": status, "ms": ms})

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        tid = request.match_info["task_id"]
        entry = self.cache.entries.get(tid) if is_task_id(tid) else None
        if entry is None:
            return _error(404, "not_found", "unknown task")
        ranges = request.headers.getall("Range", [])
        if len(ranges) != 1:
            return _error(400, "bad_request", "a single Range is required")
        header = ranges[0]
        size = entry.length if entry.length >= 0 else (max(entry.digests, default=-1) + 1) * entry.piece_size
        try:
            rng = parse_range(header, size)
        except RangeSyntaxError as exc:
            return _error(400, "bad_request", str(exc))
        except RangeUnsatisfiable as exc:
            return _error(416, "range_not_satisfiable", str(exc))
        piece = piece_of_range(rng.start, rng.end, size, entry.piece_size)
        if piece is None:
            return _error(400, "bad_request", "range must lie inside one piece")
        if self.gate is not None and (refused := await self.gate.check(request, tid, rng.start, rng.end)):
            return refused
        if not entry.has(piece):
            return _error(404, "not_found", f"piece {piece} not available here")
        if self.draining or self.active >= self.slots:
            return _error(503, "busy", "no upload slot free")
        self.active += 1
        self._idle.clear()
        try:
            if not self.throttle.unlimited:
                await self.throttle.consume(rng.length)
            resp = _FileResponse(self.cache.data_path(tid), chunk_size=1 << 20)
            async with asyncio.timeout(rng.length / self.min_rate + 10):
                await resp.prepare(only_the_range(request, rng))
            self.bytes_served += rng.length
            return resp
        finally:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    async def drain(self, deadline: float) -> None:
        """Refuse new uploads, then wait (bounded) for the running ones to finish."""
        self.draining = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), deadline)
