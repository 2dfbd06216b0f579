"""Fetch one piece: GET with Range from the assigned source, stream it to disk at its
offset while hashing, and verify the digest the supernode gave.

Memory per piece in flight is about two chunks whatever the piece or file size: one
being received, one being hashed and written in a worker thread. The piece counts as
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


def _write_and_hash(part: PartFile, hasher: Any, offset: int, data: bytes) -> None:
    hasher.update(data)
    part.write(offset, data)


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
    async with session.get(piece_url(task_id, a), headers=headers, auto_decompress=False) as resp:
        _check_head(resp, a, expected)
        hasher = digest.new()
        received = await _stream(resp, a, part, limits, hasher, expected)
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
                  limits: FetchLimits, hasher: Any, expected: int) -> int:
    """Read at most `expected` bytes (one more means a long body), writing as we go."""
    received = 0
    buf = bytearray()
    pending: asyncio.Future[None] | None = None
    try:
        while True:
            chunk = await resp.content.read(min(CHUNK, expected + 1 - received))
            if not chunk:
                break
            received += len(chunk)
            if received > expected:
                raise PieceFailed("long_body", f"more than {expected} bytes")
            for t in limits.throttles:
                await t.consume(len(chunk))
            buf += chunk
            if len(buf) >= CHUNK or received == expected:
                # One chunk is hashed+written while the next is received.
                if pending is not None:
                    await pending
                offset = a.start + received - len(buf)
                pending = asyncio.ensure_future(
                    asyncio.to_thread(_write_and_hash, part, hasher, offset, bytes(buf)))
                buf = bytearray()
        if buf:
            if pending is not None:
                await pending
            pending = asyncio.ensure_future(asyncio.to_thread(
                _write_and_hash, part, hasher, a.start + received - len(buf), bytes(buf)))
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
