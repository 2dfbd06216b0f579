"""`POST /peer/pop/{task_id}`: the answer to a supernode's proof-of-possession challenge
(common/pop.py). Only a challenge signed by a supernode we trust, naming this peer
server, unexpired and never seen before is answered, and only from the bytes on disk
of a piece this server holds verified: the range asked is read, nothing else.

HASH mode answers JSON {"answer": sha256(nonce || bytes) hex}; PIECE mode answers the
piece's bytes (application/octet-stream, Content-Length = the piece's size).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from aiohttp import web

from common import pop
from common.pieces import piece_count, piece_range
from common.taskid import is_task_id

from .state import ServerState
from .table import FileEntry

log = logging.getLogger("dfget.server.pop")
MAX_NONCES = 4096  # challenges remembered at once; a flood beyond gets 503


class Nonces:
    """Nonces answered, kept until their challenge expires (+ the clock leeway): an old
    challenge replayed is refused with 409, and memory stays bounded."""

    def __init__(self, cap: int = MAX_NONCES) -> None:
        self.cap = cap
        self._seen: dict[bytes, float] = {}

    def take(self, nonce: bytes, expires: int, now: float) -> str:
        """"ok" (first use, now remembered), "replayed" or "full"."""
        if nonce in self._seen:
            return "replayed"
        if len(self._seen) >= self.cap:
            self._seen = {n: t for n, t in self._seen.items() if t >= now}
            if len(self._seen) >= self.cap:
                return "full"
        self._seen[nonce] = expires + pop.LEEWAY
        return "ok"


NONCES: web.AppKey[Nonces] = web.AppKey("pop_nonces", Nonces)


def _error(status: int, code: str, message: str) -> web.Response:
    return web.json_response({"error": code, "message": message}, status=status)


def read_range(path: Path, start: int, length: int) -> bytes | None:
    """Exactly `length` bytes at `start`, or None when the file is shorter now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        out = bytearray()
        while len(out) < length:
            chunk = os.pread(fd, min(length - len(out), 1 << 20), start + len(out))
            if not chunk:
                return None
            out += chunk
        return bytes(out)
    finally:
        os.close(fd)


async def _catch_up(state: ServerState, task_id: str, piece: int | None) -> FileEntry | None:
    """Our dfget tells the supernode about a piece and us about the file (with the keys
    that verify challenges) at about the same time, and the supernode may challenge in
    between: as for a piece request (app.py, CATCH_UP), wait a little for the news from
    a young server (the file) or a download in progress (the piece)."""
    from .app import CATCH_UP, YOUNG

    deadline = time.monotonic() + CATCH_UP
    while time.monotonic() < deadline:
        entry = state.table.get(task_id)
        if entry is None:
            if time.monotonic() - state.started >= YOUNG:
                return None
        elif piece is None or not entry.in_progress() or (entry.holds(piece) and entry.still_valid()):
            return entry  # (a download in progress is briefly invalid while its file is renamed)
        await state.wait_table(deadline - time.monotonic())
    return state.table.get(task_id)


async def _verified(request: web.Request, state: ServerState, task_id: str) -> pop.Challenge | web.Response:
    """The challenge if genuine and for us, else the refusal (counted and logged)."""
    from .app import REFRESH_KEYS

    text = request.headers.get(pop.HEADER)
    try:
        try:
            return pop.verify(text, state.keys.get, task_id=task_id, peer_id=state.peer_id, now=time.time())
        except pop.ChallengeError as exc:
            if exc.reason != "unknown_key" or not await request.app[REFRESH_KEYS]():
                raise
            return pop.verify(text, state.keys.get, task_id=task_id, peer_id=state.peer_id, now=time.time())
    except pop.ChallengeError as exc:
        state.metrics.auth_refused.labels("pop_" + exc.reason).inc()
        log.info("challenge from %s refused (%s): %s", request.remote, exc.reason, exc.message)
        return web.json_response(exc.to_wire(), status=exc.status)


def _bad_range(entry: FileEntry, ch: pop.Challenge) -> web.Response | None:
    """The range must lie inside the piece named, inside the file (all of it: PIECE)."""
    count = piece_count(entry.length, entry.piece_size)
    if not 0 <= ch.piece < count:
        return _error(416, "range_not_satisfiable", f"piece {ch.piece} is not in 0..{count - 1}")
    p_start, p_end = piece_range(ch.piece, entry.length, entry.piece_size)
    if not p_start <= ch.start <= ch.end <= p_end:
        return _error(416, "range_not_satisfiable",
                      f"bytes {ch.start}-{ch.end} are not inside piece {ch.piece} (bytes {p_start}-{p_end})")
    if ch.mode == pop.PIECE and (ch.start, ch.end) != (p_start, p_end):
        return _error(400, "bad_request", "a piece challenge asks for the whole piece")
    return None


async def answer_challenge(request: web.Request) -> web.StreamResponse:
    from .app import STATE  # app.py registers this handler

    state: ServerState = request.app[STATE]
    state.last_request = time.monotonic()
    task_id = request.match_info["task_id"]
    if not is_task_id(task_id):
        return _error(404, "not_found", "unknown task")
    await _catch_up(state, task_id, None)
    ch = await _verified(request, state, task_id)
    if isinstance(ch, web.Response):
        return ch
    entry = state.table.get(task_id)
    if entry is None or entry.length < 0:
        return _error(404, "not_found", "unknown task")
    if (refused := _bad_range(entry, ch)) is not None:
        return refused
    entry = await _catch_up(state, task_id, ch.piece) or entry
    seen = request.app[NONCES].take(ch.nonce, ch.expires, time.time())
    if seen == "replayed":
        log.info("challenge from %s refused: nonce replayed", request.remote)
        return _error(409, "replayed", "this challenge was answered already")
    if seen == "full":
        return _error(503, "busy", "too many challenges in progress")
    return await _answer(state, entry, ch)


async def _answer(state: ServerState, entry: FileEntry, ch: pop.Challenge) -> web.Response:
    """From the bytes on disk, only those asked, of a piece we hold verified."""
    if not entry.holds(ch.piece):
        return _error(404, "not_found", "piece not held")
    if not entry.still_valid():
        return _error(404, "not_found", "file no longer available")
    if ch.mode == pop.PIECE:
        await state.throttle.consume(ch.length)
    data = await asyncio.to_thread(read_range, entry.path, ch.start, ch.length)
    if data is None:
        return _error(404, "not_found", "file no longer available")
    if ch.mode == pop.PIECE:
        return web.Response(body=data, content_type="application/octet-stream",
                            headers={"Cache-Control": "no-store"})
    digest = await asyncio.to_thread(pop.answer, ch.nonce, data)
    return web.json_response({"answer": digest})
