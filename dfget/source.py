"""Back to source: fetch the whole file straight from the origin, streaming to the
temporary file with flat memory. Used when no supernode answers, when P2P fails, or
with `--pattern source`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from common.errors import (
    OriginError,
    OriginForbidden,
    OriginLongBody,
    OriginNotFound,
    OriginShortBody,
    OriginStatus,
    OriginUnauthorized,
    OriginUnavailable,
    Signal,
)

from .neterr import describe
from .output import PartFile
from .throttle import Throttle

log = logging.getLogger("dfget.source")
CHUNK = 1 << 20
ATTEMPTS = 3
_FINAL = {404: OriginNotFound, 401: OriginUnauthorized, 403: OriginForbidden, 407: OriginUnauthorized}


@dataclass
class SourceResult:
    length: int
    md5: str | None


def _write(part: PartFile, md5: hashlib._Hash | None, offset: int, data: bytes) -> None:
    if md5 is not None:
        md5.update(data)
    part.write(offset, data)


async def download(session: aiohttp.ClientSession, url: str, headers: dict[str, str], part: PartFile,
                   *, want_md5: bool, throttles: tuple[Throttle, ...] = (),
                   on_bytes: Callable[[int], None] = lambda n: None) -> SourceResult:
    """Bounded retries with backoff on 5xx/429/connection errors; 4xx fails at once."""
    delay = 0.5
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return await _once(session, url, headers, part, want_md5, throttles, on_bytes)
        except _Retryable as exc:
            if attempt == ATTEMPTS:
                raise exc.error from None
            log.info("origin attempt %d failed (%s), retrying", attempt, exc.error.message)
            await asyncio.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


class _Retryable(Signal):
    def __init__(self, error: OriginError) -> None:
        self.error = error


async def _once(session: aiohttp.ClientSession, url: str, headers: dict[str, str], part: PartFile,
                want_md5: bool, throttles: tuple[Throttle, ...],
                on_bytes: Callable[[int], None]) -> SourceResult:
    hdrs = {**headers, "Accept-Encoding": "identity"}
    try:
        async with session.get(url, headers=hdrs, auto_decompress=False,
                               timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)) as resp:
            if resp.status in _FINAL:
                raise _FINAL[resp.status](f"origin answered HTTP {resp.status}")
            if resp.status >= 500 or resp.status == 429:
                raise _Retryable(OriginStatus(f"origin answered HTTP {resp.status}"))
            if resp.status != 200:
                raise OriginStatus(f"origin answered HTTP {resp.status}")
            declared = resp.content_length
            await asyncio.to_thread(part.open, declared if declared is not None else -1)
            md5 = hashlib.md5(usedforsecurity=False) if want_md5 else None
            received = await _stream(resp, part, md5, throttles, on_bytes)
    except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError, ConnectionError) as exc:
        raise _Retryable(OriginUnavailable(f"origin: {describe(exc)}")) from None
    if declared is not None and received < declared:
        raise _Retryable(OriginShortBody(f"origin sent {received} of {declared} bytes"))
    if declared is None:
        await asyncio.to_thread(part.set_length, received)
    return SourceResult(received, md5.hexdigest() if md5 is not None else None)


async def _stream(resp: aiohttp.ClientResponse, part: PartFile, md5: hashlib._Hash | None,
                  throttles: tuple[Throttle, ...], on_bytes: Callable[[int], None]) -> int:
    declared = resp.content_length
    received = 0
    buf = bytearray()
    while True:
        chunk = await resp.content.read(CHUNK)
        if chunk:
            received += len(chunk)
            if declared is not None and received > declared:
                raise OriginLongBody(f"origin sent more than {declared} bytes")
            for t in throttles:
                await t.consume(len(chunk))
            buf += chunk
            on_bytes(len(chunk))
        if len(buf) >= CHUNK or (not chunk and buf):
            await asyncio.to_thread(_write, part, md5, received - len(buf), bytes(buf))
            buf = bytearray()
        if not chunk:
            return received
