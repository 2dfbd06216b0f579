"""The HTTP face of the exception tree (common/errors.py): one aiohttp error middleware
for every server app, so every error answer has the same shape,
`{"error": code, "message": ...}` with the class's status.

- a `DfError` answers with its status and wire body (`Retry-After` when its detail has
  `retry_after`; a request timeout closes the connection, since the rest of a slow body
  would be read as the next request);
- aiohttp's own 4xx/5xx (unknown path, wrong method) answer with the same JSON shape;
- anything else is a bug: logged with its traceback, answered 500 `internal`.

Like httplog.py, an adapter for aiohttp that does no I/O of its own: it belongs with the
tree it translates. The app decides how a body is encoded (`render`, e.g. msgpack for a
client that asked for it) and what is counted (`observe`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from common import errors

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Render = Callable[[web.Request, dict[str, object], int], web.Response]
Observe = Callable[[web.Request, int, float], None]


def json_render(request: web.Request, body: dict[str, object], status: int) -> web.Response:
    return web.json_response(body, status=status)


def route_of(request: web.Request) -> str:
    """The route's pattern, not the path: a bounded label set and no ids in the log."""
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "unmatched"


_HTTP_CODES = {404: "not_found", 413: "payload_too_large", 416: "range_not_satisfiable"}


def error_middleware(*, logger: logging.Logger, render: Render = json_render, observe: Observe | None = None,
                     cancelled_status: int = 500) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """The middleware; `observe(request, status, seconds)` runs after every request, with
    `cancelled_status` when the handler was cancelled (the client went away)."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = cancelled_status
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except errors.DfError as exc:
            status = exc.status
            resp = render(request, exc.to_wire(), exc.status)
            if "retry_after" in exc.detail:
                resp.headers["Retry-After"] = str(exc.detail["retry_after"])
            if isinstance(exc, errors.RequestTimeout):
                resp.force_close()
            return resp
        except web.HTTPException as exc:
            status = exc.status
            if exc.status < 400:
                raise
            return render(request, {"error": _HTTP_CODES.get(exc.status, "bad_request"),
                                    "message": exc.reason}, exc.status)
        except Exception:
            logger.exception("unexpected error in %s %s", request.method, route_of(request))
            return render(request, {"error": "internal", "message": "internal error"}, 500)
        finally:
            if observe is not None:
                observe(request, status, time.perf_counter() - t0)

    return middleware
