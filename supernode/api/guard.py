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
- Time: a request still in the handlers when its budget runs out (`budget_for`) is
  answered 503 `busy` with Retry-After, in time for its client, which waits that out and
  asks again. Without it, a supernode starved of CPU answered after dfget's timeout,
  and dfget, seeing no answer, went to the origin: overload is to make things slower,
  never send clients away while a supernode answers.
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
# Routes whose bodies may be larger than Limits.max_body: an import's claim carries one
# 64-hex digest per piece (wire.MAX_IMPORT_PIECES of them: about 240 GiB of 15 MiB pieces).
BODY_CAPS = {"/api/v1/import": 2 << 20}
# what dfget and peer servers call besides those two (with dfget's 5 s timeout)
CLIENT_CALLS = frozenset({"/api/v1/tasks/{task_id}/report", "/api/v1/tasks/{task_id}/digests",
                          "/api/v1/peers/heartbeat", "/api/v1/peers/down"})
LINGER = 2.0  # seconds an unread request body is drained after the answer before closing
# Time budgets (s) in the handlers, below dfget's timeouts (dfget/supernodes.py): 20 s
# for a registration (which waits up to 10 s for the origin's first answer), 5 s for
# other calls, a pull's own long-poll wait + 10 s.
REGISTER_BUDGET = 15.0
CALL_BUDGET = 4.0
PULL_BUDGET = 6.0  # beyond the pull's wait


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
        self.refused = {"busy": 0, "rate": 0, "late": 0}

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


class _Pull(msgspec.Struct):
    cid: wire.Id32
    wait: float = wire.DEFAULT_PULL_WAIT


def _pull_of(data: bytes, msgpack: bool) -> _Pull | None:
    """The client id and wait of a pull body, or None when the body is not even that (the
    handler then answers 400 without touching Redis)."""
    try:
        if msgpack:
            return msgspec.msgpack.decode(data, type=_Pull)
        return msgspec.json.decode(data, type=_Pull)
    except (msgspec.DecodeError, ValueError, RecursionError):  # as wire.decode: bad UTF-8, deep nesting
        return None


def budget_for(method: str, route: str, pull: _Pull | None) -> float | None:
    """Seconds a request of this route may spend in the handlers (None: no bound)."""
    if method == "GET" and route != "/api/v1/tasks/{task_id}/digests":
        return None  # listings, the UI, admin reads: not on a client's clock
    if route == REGISTER_ROUTE:
        return REGISTER_BUDGET
    if route == PULL_ROUTE:
        wait = pull.wait if pull is not None and math.isfinite(pull.wait) else wire.MAX_PULL_WAIT
        return max(0.0, min(wait, wire.MAX_PULL_WAIT)) + PULL_BUDGET
    return CALL_BUDGET if route in CLIENT_CALLS else None


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
        pull = None
        if request.method == "POST":
            data = await body_bytes(request, BODY_CAPS.get(route, g.limits.max_body), g.limits.body_timeout)
            wait = 0.0
            if route == REGISTER_ROUTE:
                wait = g.register.check(request.remote or "local", time.monotonic())
            elif route == PULL_ROUTE:
                pull = _pull_of(data, request.content_type == wire.MSGPACK_TYPE)
                if pull is not None:
                    wait = g.pull.check(pull.cid, time.monotonic())
            if wait > 0:
                g.refused["rate"] += 1
                raise _refuse(errors.TooManyRequests("request rate over this client's limit"), wait)
        budget = budget_for(request.method, route, pull)
        if budget is None:
            return await handler(request)
        try:
            async with asyncio.timeout(budget) as cm:
                return await handler(request)
        except TimeoutError:
            if not cm.expired():
                raise
            g.refused["late"] += 1
            raise _refuse(errors.Busy(f"not done within {budget:g} s; ask again"), 1) from None
    finally:
        g.active -= 1
