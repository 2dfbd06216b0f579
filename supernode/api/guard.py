"""Protection of the supernode's servers against slow clients and floods.

- Headers: aiohttp's keep-alive timer, armed when a connection opens and again after
  each answer and not pushed back by incoming bytes, closes a connection that has not
  delivered a whole request head within `header_timeout` (`runner_kwargs`).
- Bodies: read once, here, with a cap (413, also for chunked bodies that declare no
  length) and a deadline (408), before anything parses them; handlers decode the bytes
  kept on the request (`body_bytes`).
- Concurrency: at most `max_requests` requests inside the handlers at once (a pull
  parked in its long-poll does not count); the next one gets 503 `busy` with
  Retry-After, and so does Redis work that cannot start within a second
  (supernode/store/connection.py, `Store.slot`).
- Rate: registrations per client address and pulls per client id, token buckets; over
  the rate 429 `too_many_requests` with Retry-After, before anything touches Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from common import errors, wire
from common.httplog import server_logger
from common.ratelimit import KeyedLimiter

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BODY_KEY: web.RequestKey[bytes] = web.RequestKey("df_body", bytes)
# Cheap endpoints that health checks and scrapers must reach even when the API is busy.
EXEMPT = frozenset({"/_ping", "/version", "/metrics"})
REGISTER_ROUTE = "/api/v1/tasks"
PULL_ROUTE = "/api/v1/tasks/{task_id}/pull"
LINGER = 2.0  # seconds an unread request body is drained after the answer before closing


@dataclass(frozen=True)
class Limits:
    max_body: int = 64 * 1024
    body_timeout: float = 10.0
    max_requests: int = 4096
    register_rate: float = 100.0  # per client address per second; 0 = unlimited
    pull_rate: float = 200.0  # per client id per second; 0 = unlimited


class Guard:
    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.active = 0
        # bursts: a host starting many downloads at once, a client draining its reports
        self.register = KeyedLimiter(limits.register_rate, limits.register_rate * 10)
        self.pull = KeyedLimiter(limits.pull_rate, limits.pull_rate * 2)
        self.refused = {"busy": 0, "rate": 0}

    @contextlib.asynccontextmanager
    async def idle(self) -> AsyncIterator[None]:
        """A request parked in a long-poll does no work: it does not count against
        `max_requests` meanwhile (2,000 waiting clients must not lock out the rest)."""
        self.active -= 1
        try:
            yield
        finally:
            self.active += 1


GUARD: web.AppKey[Guard] = web.AppKey("guard", Guard)


def runner_kwargs(header_timeout: float) -> dict[str, Any]:
    """AppRunner options of every server the supernode runs."""
    # auto_decompress=False: no request body of this protocol is compressed; a body sent
    # with Content-Encoding is read as it is (and refused by the decoder), instead of
    # aiohttp inflating it (a zip bomb past the cap) or refusing 'br' in plain text.
    return {"keepalive_timeout": header_timeout, "lingering_time": LINGER,
            "logger": server_logger("supernode.http"), "auto_decompress": False}


async def read_body(request: web.Request, cap: int, timeout: float) -> bytes:
    """The whole body, at most `cap` bytes, within `timeout` seconds.

    `content.read(n)` returns as soon as *some* bytes are there, so a body that arrives
    in several segments (or chunks) is read in a loop; the cap is checked on what
    arrived, whatever Content-Length claimed."""
    if request.content_length is not None and request.content_length > cap:
        raise errors.PayloadTooLarge(f"body over {cap} bytes")
    parts: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while chunk := await request.content.read(cap + 1 - size):
                size += len(chunk)
                if size > cap:
                    raise errors.PayloadTooLarge(f"body over {cap} bytes")
                parts.append(chunk)
    except TimeoutError:
        raise errors.RequestTimeout(f"request body not received within {timeout:g} s") from None
    except (HttpProcessingError, RequestPayloadError) as exc:  # bad chunking, bad gzip, ...
        raise errors.BadRequest(f"malformed request body: {exc}") from None
    return b"".join(parts)


async def body_bytes(request: web.Request, cap: int, timeout: float) -> bytes:
    data = request.get(BODY_KEY)
    if data is None:
        data = await read_body(request, cap, timeout)
        request[BODY_KEY] = data
    return data


class _Cid(msgspec.Struct):
    cid: wire.Id32


def _cid_of(data: bytes, msgpack: bool) -> str | None:
    """The client id of a pull body, or None when the body is not even that (the handler
    then answers 400 without touching Redis)."""
    try:
        if msgpack:
            return msgspec.msgpack.decode(data, type=_Cid).cid
        return msgspec.json.decode(data, type=_Cid).cid
    except (msgspec.DecodeError, ValueError, RecursionError):  # as wire.decode: bad UTF-8, deep nesting
        return None


def _refuse(exc: errors.DfError, retry_after: float) -> errors.DfError:
    exc.detail["retry_after"] = max(1, math.ceil(retry_after))
    return exc


def route_of(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    route = route_of(request)
    if route in EXEMPT:
        return await handler(request)
    g = request.app[GUARD]
    if g.active >= g.limits.max_requests:
        g.refused["busy"] += 1
        raise _refuse(errors.Busy("too many requests in progress"), 1)
    g.active += 1
    try:
        if request.method == "POST":
            data = await body_bytes(request, g.limits.max_body, g.limits.body_timeout)
            wait = 0.0
            if route == REGISTER_ROUTE:
                wait = g.register.check(request.remote or "local", time.monotonic())
            elif route == PULL_ROUTE:
                cid = _cid_of(data, request.content_type == wire.MSGPACK_TYPE)
                if cid is not None:
                    wait = g.pull.check(cid, time.monotonic())
            if wait > 0:
                g.refused["rate"] += 1
                raise _refuse(errors.TooManyRequests("request rate over this client's limit"), wait)
        return await handler(request)
    finally:
        g.active -= 1
