"""HTTP client for origins, with the address policy enforced where it matters.

The policy is checked on the address actually dialled: host names go through a resolver
that drops every address the policy denies (so DNS rebinding cannot sneak past a check
made earlier), IP-literal hosts are checked before the request, and redirects are
followed by hand so every hop gets the same checks. Bodies are never decompressed:
we ask for identity and keep exactly the bytes sent.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from common import errors
from common.errors import Signal
from common.netpolicy import AddressPolicy
from common.taskid import CREDENTIAL_HEADERS, redact_url

log = logging.getLogger("supernode.origin")

_REDIRECTS = {301, 302, 303, 307, 308}
_RETRY_STATUS = {429, 500, 502, 503, 504}


class _Denied(Signal, OSError):
    pass


class PolicyResolver(AbstractResolver):
    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._inner = aiohttp.ThreadedResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self.policy.permits(r["host"])]
        if not allowed:
            raise _Denied(f"every address of {host} is denied by the origin policy")
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def check_url(url: str, policy: AddressPolicy) -> None:
    """Scheme and IP-literal checks that need no I/O (BadRequest / policy denial)."""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. an unclosed IPv6 bracket
        raise errors.BadRequest("malformed URL") from None
    if parts.scheme not in ("http", "https"):
        raise errors.OriginPolicyDenied(f"only http and https origins are allowed, not {parts.scheme or 'none'!r}")
    try:
        host = parts.hostname
        _ = parts.port
    except ValueError:
        raise errors.BadRequest("malformed URL") from None
    if not host:
        raise errors.BadRequest("URL has no host")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if not policy.permits(ip):
        raise errors.OriginPolicyDenied(f"origin address {ip} is denied by the origin policy")


async def check_resolvable(url: str, policy: AddressPolicy) -> None:
    """Resolve a host name up front so a denied origin is refused before any state is
    written. The connection is checked again when it is made."""
    host = urlsplit(url).hostname or ""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        raise errors.OriginUnavailable(f"cannot resolve origin host {host!r}") from None
    if not any(policy.permits(info[4][0]) for info in infos):
        raise errors.OriginPolicyDenied(f"every address of {host} is denied by the origin policy")


def status_error(status: int, url: str) -> errors.OriginError:
    where = redact_url(url)
    if status in (401, 407):
        return errors.OriginUnauthorized(f"origin answered {status} for {where}")
    if status == 403:
        return errors.OriginForbidden(f"origin answered 403 for {where}")
    if status in (404, 410):
        return errors.OriginNotFound(f"origin answered {status} for {where}")
    return errors.OriginStatus(f"origin answered {status} for {where}", detail={"status": str(status)})


@dataclass(frozen=True)
class OriginSettings:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    max_redirects: int = 5
    retries: int = 3
    backoff: float = 0.5


class OriginClient:
    """`tls`: how https origins and TLS peer servers (a takeover's copies) are verified,
    and the client certificate shown to those that ask; None: system CAs only."""

    def __init__(self, policy: AddressPolicy, settings: OriginSettings = OriginSettings(),
                 tls: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.settings = settings
        self.tls = tls
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(resolver=PolicyResolver(self.policy), limit=256, ttl_dns_cache=10,
                                         ssl=self.tls if self.tls is not None else True)
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.settings.connect_timeout, sock_read=self.settings.read_timeout
            ),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def open(self, url: str, headers: dict[str, str], *, method: str = "GET") -> aiohttp.ClientResponse:
        """Open `url`, following redirects by hand, retrying transient failures.

        Returns a response with status 200, 206 or 304; raises OriginError otherwise.
        The caller must release the response.
        """
        assert self.session is not None
        hdrs = {k: v for k, v in headers.items() if k.lower() not in ("host", "accept-encoding")}
        hdrs["Accept-Encoding"] = "identity"
        attempt = 0
        while True:
            try:
                return await self._follow(url, hdrs, method)
            except (errors.OriginStatus, errors.OriginUnavailable) as exc:
                status = int(exc.detail.get("status", "0") or 0) if isinstance(exc, errors.OriginStatus) else 0
                retryable = isinstance(exc, errors.OriginUnavailable) or status in _RETRY_STATUS
                attempt += 1
                if not retryable or attempt > self.settings.retries:
                    raise
                delay = self.settings.backoff * (2 ** (attempt - 1))
                log.info("origin %s: %s; retry %d in %.1fs", redact_url(url), exc.message, attempt, delay)
                await asyncio.sleep(delay)

    async def _follow(self, url: str, hdrs: dict[str, str], method: str) -> aiohttp.ClientResponse:
        assert self.session is not None
        for _ in range(self.settings.max_redirects + 1):
            check_url(url, self.policy)
            try:
                resp = await self.session.request(method, url, headers=hdrs, allow_redirects=False)
            except aiohttp.ClientConnectorError as exc:
                if isinstance(exc.os_error, _Denied):
                    raise errors.OriginPolicyDenied(str(exc.os_error)) from None
                raise errors.OriginUnavailable(f"cannot connect to origin: {exc.os_error}") from None
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                raise errors.OriginUnavailable(f"origin request failed: {type(exc).__name__}") from None
            if resp.status in _REDIRECTS:
                location = resp.headers.get("Location")
                resp.release()
                if not location:
                    raise errors.OriginStatus(f"redirect without Location from {redact_url(url)}",
                                              detail={"status": str(resp.status)})
                try:
                    target = urljoin(url, location)
                except ValueError:
                    raise errors.OriginStatus(f"malformed redirect from {redact_url(url)}",
                                              detail={"status": str(resp.status)}) from None
                if _origin_of(target) != _origin_of(url):
                    # Credentials belong to the origin that asked for them, not to where it
                    # sends us (a registry's 307 to object storage with a signed URL).
                    hdrs = {k: v for k, v in hdrs.items() if k.lower() not in CREDENTIAL_HEADERS}
                url = target
                continue
            if resp.status in (200, 206, 304):
                return resp
            resp.release()
            raise status_error(resp.status, url)
        raise errors.OriginStatus(f"more than {self.settings.max_redirects} redirects", detail={"status": "310"})


def _origin_of(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        port = None
    return p.scheme.lower(), (p.hostname or "").lower(), port or {"http": 80, "https": 443}.get(p.scheme.lower())


def validators(resp: Any) -> tuple[str, str]:
    return resp.headers.get("ETag", ""), resp.headers.get("Last-Modified", "")
