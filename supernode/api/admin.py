"""The admin token of the supernode API: task delete and details, peer listings, preheat
and the dashboard's data answer 401 without `Authorization: Bearer <token>` when
`--admin-token` is set."""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from common import errors
from common.logs import RefusalLog
from supernode.state import STATE

log = logging.getLogger("supernode.auth")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).digest()


def check_admin(request: web.Request, configured: str) -> None:
    """Raise Unauthorized unless `Authorization: Bearer <configured>`; nothing is
    checked when no token is configured. Constant-time (compares digests: the length
    of the token leaks nothing either)."""
    if not configured:
        return
    scheme, _, given = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        _refused(request, "missing")
        raise errors.Unauthorized("this operation needs the admin token (Authorization: Bearer <token>)")
    if not hmac.compare_digest(_digest(given.strip()), _digest(configured)):
        _refused(request, "wrong")
        raise errors.Unauthorized("wrong admin token")


_admin_log = RefusalLog(log, "admin request")


def _refused(request: web.Request, reason: str) -> None:
    _admin_log(reason, f"{request.method} {request.path} from {request.remote}")
    if STATE in request.config_dict:
        request.config_dict[STATE].metrics.auth_refused.labels("admin", reason).inc()


def admin_only(handler: Handler) -> Handler:
    """Decorator for admin handlers of the supernode app (task delete, preheat, peer
    listings, the dashboard's data): they answer 401 without the configured token."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        check_admin(request, request.config_dict[STATE].settings.admin_token)
        return await handler(request)

    return wrapped
