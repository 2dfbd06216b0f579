"""Fetch one piece: GET with Range from the assigned source, stream it to disk at its
offset while hashing, and verify the digest the supernode gave.

Memory per piece in flight is about two batches of CHUNK bytes whatever the piece or file
size (one being received, one being hashed and written in a worker thread) plus
aiohttp's read buffer. The piece counts as
present only after `digest.matches`; until then its bytes on disk mean nothing.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import aiohttp

from common import digest
from common.ranges import RangeSyntaxError, parse_content_range
from common.ratelimit import Throttle
from common.wire import Assignment

from .output import PartFile

CHUNK = 1 << 20  # bytes handed to a worker thread at once
MAX_IOV = 256  # chunks per batch (pwritev takes at most IOV_MAX = 1024)
STALL = 30.0  # seconds without a batch received: the source stalled
# The body is read with the socket read timeout off (aiohttp would re-arm a timer on
# every recv); the stall timer below is re-armed once per batch instead.
_NO_READ_TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=None)


class PieceFailed(Exception):
    """The piece could not be fetched from this source; `reason` is a wire FailReason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class FetchLimits:
    minrate: int  # bytes/s; the piece deadline is len/minrate + 10 s
    throttles: tuple[Throttle, ...] = ()

    def deadline(self, nbytes: int) -> float:
        return nbytes / max(self.minrate, 1) + 10.0


def piece_url(task_id: str, a: Assignment) -> str:
    host = f"[{a.source.ip}]" if ":" in a.source.ip else a.source.ip
    return f"http://{host}:{a.source.port}/peer/file/{task_id}"


def _write_and_hash(part: PartFile, hasher: Any, offset: int, chunks: list[bytes]) -> None:
    for c in chunks:
        hasher.update(c)  # releases the GIL: the loop keeps receiving meanwhile
    part.writev(offset, chunks)


async def fetch_piece(session: aiohttp.ClientSession, task_id: str, a: Assignment,
                      part: PartFile, limits: FetchLimits) -> int:
    """Returns the number of bytes of the verified piece; raises PieceFailed."""
    expected = a.end - a.start + 1
    try:
        async with asyncio.timeout(limits.deadline(expected)):
            return await _fetch(session, task_id, a, part, limits, expected)
    except TimeoutError:
        raise PieceFailed("timeout", f"piece {a.piece} not received in time") from None
    except aiohttp.ClientConnectorError as exc:
        raise PieceFailed("refused", f"cannot connect to {a.source.ip}:{a.source.port}: {exc}") from None
    except aiohttp.ClientPayloadError as exc:
        raise PieceFailed("short_body", f"body cut short: {exc}") from None
    except (aiohttp.ClientError, ConnectionError) as exc:
        raise PieceFailed("error", f"{type(exc).__name__}: {exc}") from None


async def _fetch(session: aiohttp.ClientSession, task_id: str, a: Assignment, part: PartFile,
                 limits: FetchLimits, expected: int) -> int:
    headers = {"Range": f"bytes={a.start}-{a.end}", "Accept-Encoding": "identity"}
    async with asyncio.timeout(STALL) as stall, session.get(
            piece_url(task_id, a), headers=headers, auto_decompress=False, timeout=_NO_READ_TIMEOUT) as resp:
        _check_head(resp, a, expected)
        hasher = digest.new()
        received = await _stream(resp, a, part, limits, hasher, expected, stall)
    if received < expected:
        raise PieceFailed("short_body", f"got {received} of {expected} bytes")
    if not digest.matches(a.digest, hasher.hexdigest()):
        raise PieceFailed("digest_mismatch", f"piece {a.piece} from {a.source.ip}:{a.source.port}")
    return received


def _check_head(resp: aiohttp.ClientResponse, a: Assignment, expected: int) -> None:
    if resp.status == 404:
        raise PieceFailed("not_found", "source does not hold the piece")
    if resp.status in (429, 503):
        raise PieceFailed("refused", f"source busy (HTTP {resp.status})")
    if resp.status != 206:
        raise PieceFailed("error", f"unexpected HTTP {resp.status}")
    declared = resp.content_length
    if declared is not None and declared > expected:
        raise PieceFailed("long_body", f"declared {declared} bytes, piece has {expected}")
    if declared is not None and declared < expected:
        raise PieceFailed("short_body", f"declared {declared} bytes, piece has {expected}")
    cr = resp.headers.get("Content-Range")
    if cr is not None:
        try:
            start, end, _ = parse_content_range(cr)
        except RangeSyntaxError:
            raise PieceFailed("error", "malformed Content-Range") from None
        if (start, end) != (a.start, a.end):
            raise PieceFailed("error", f"Content-Range {cr!r} is not the piece asked for")


async def _stream(resp: aiohttp.ClientResponse, a: Assignment, part: PartFile,
                  limits: FetchLimits, hasher: Any, expected: int, stall: asyncio.Timeout) -> int:
    """Read the body, at most `expected` bytes (more means a long body), writing as we go.

    The chunks aiohttp received are handed on as they are (no joining, no copying) in
    batches of about CHUNK bytes: one batch is hashed and written in a worker thread while
    the next is received.
    """
    loop = asyncio.get_running_loop()
    received = 0
    batch: list[bytes] = []
    batched = 0
    pending: asyncio.Future[None] | None = None
    try:
        while True:
            chunk = await resp.content.readany()
            if not chunk:
                break
            received += len(chunk)
            if received > expected:
                raise PieceFailed("long_body", f"more than {expected} bytes")
            for t in limits.throttles:
                await t.consume(len(chunk))
            batch.append(chunk)
            batched += len(chunk)
            if batched >= CHUNK or len(batch) >= MAX_IOV or received == expected:
                stall.reschedule(loop.time() + STALL)
                if pending is not None:
                    await pending
                pending = asyncio.ensure_future(asyncio.to_thread(
                    _write_and_hash, part, hasher, a.start + received - batched, batch))
                batch, batched = [], 0
        if batch:
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(
                _write_and_hash, part, hasher, a.start + received - batched, batch))
        if pending is not None:
            p, pending = pending, None
            await p
    finally:
        if pending is not None:
            # Never leave a thread writing after we give up on the piece: the caller
            # relies on "no writes in flight" once we return or raise.
            await asyncio.wait([pending])
            if not pending.cancelled():
                pending.exception()  # retrieved: our own error is the one that matters
    return received
