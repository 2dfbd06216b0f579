"""Client of the supernode API (docs/api.md) with failover between supernodes.

`SupernodeDown` means "try another supernode" (connection refused/reset/timeout, 5xx
that is not an origin failure); every other error answer is rebuilt with
`common.errors.from_wire` and raised as-is.

TLS: a supernode written `https://host:port` in --node is spoken to over TLS, one written
`http://` in plain HTTP; one written bare `host:port` over TLS when --cacert is given,
else in plain HTTP, switching to TLS (verified as ever) when the port turns out to speak
it (a TLS server closes a plain connection without a word). A supernode TLS cannot work
with (certificate not trusted, client certificate refused) is no reason to download from
the origin while it answers: when no supernode could be used and one of them failed so,
`TlsError` ends the download with the reason (exit code 9).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
from typing import TypeVar

from common import tls as tlsconf
from common import wire
from common.errors import DfError, Signal, SupernodeUnavailable, TlsError, from_wire
from common.hostport import hostport
from common.tls import ClientTls

from .config import Node
from .httpclient import HttpClient, NoAnswer, TlsFailure
from .neterr import describe

log = logging.getLogger("dfget.supernode")
T = TypeVar("T")
API_TIMEOUT = 5.0  # v1's dfget -> supernode timeout
REGISTER_TIMEOUT = 20.0  # the supernode waits up to 10 s for the origin's first answer
_RETRY_CODES = {"store_unavailable", "busy", "supernode_unavailable", "internal"}
MAX_RETRY_AFTER = 5.0
PEER_SECRET_HEADER = "X-Dragonfly-Peer-Secret"  # supernode/peerauth.py
THROTTLED_RETRIES = 5  # 429 answers (this client's own rate) waited out before the error goes up
# An overloaded supernode answers 429 or 503 busy with Retry-After: it is alive, so it is
# asked again (after the delay it names, jittered so that a crowd does not come back in
# step) for as long as this, and only a supernode that does not answer at all sends us
# elsewhere, or to the origin.
BUSY_BUDGET = 600.0
BUSY_DELAY_MAX = 4.0
# A supernode that took the connection (or let it wait in its backlog) but did not answer
# in time is most likely overloaded (its answers are late, not absent: a host whose CPU
# is saturated, a long pause), not gone: one that is gone refuses the connection. It is
# asked again, with the same backoff, for this long before the origin is used.
SLOW_BUDGET = 60.0


def _jittered(retry_after: str, floor: float = 0.1) -> float:
    delay = float(retry_after) if retry_after.isdigit() else 1.0
    return min(max(delay, floor), MAX_RETRY_AFTER) * random.uniform(0.5, 1.5)


class SupernodeDown(Signal):
    """This supernode cannot serve us now; another one may. `busy`: it answered (503:
    store unavailable, busy, draining), so it is alive and worth asking again soon.
    `slow`: no answer in time (see SLOW_BUDGET)."""

    def __init__(self, message: str, *, busy: bool = False, slow: bool = False) -> None:
        super().__init__(message)
        self.busy = busy
        self.slow = slow


class Supernodes:
    def __init__(self, http: HttpClient, nodes: tuple[Node, ...], tls: ClientTls | None = None) -> None:
        self.http = http
        self.tls = tls or ClientTls()
        # a bare host:port: https with --cacert/--cert (TLS asked for), else http that may
        # be upgraded (never the other way: a TLS supernode is never spoken to in plain)
        bare = "https" if self.tls.cacert or self.tls.cert else "http"
        self.upgradable = {i for i, n in enumerate(nodes) if not n.scheme and bare == "http"}
        self.explicit = {i for i, n in enumerate(nodes) if n.scheme}
        self.nodes = [n if n.scheme else dataclasses.replace(n, scheme=bare) for n in nodes]
        self.index = 0
        self.busy_at = -1e9  # monotonic time a supernode last answered "busy, come back later"
        self.busy_waits = 0  # such answers waited out (the --json report's busy_waits)
        # supernode base URL -> our peer's secret there (see supernode/peerauth.py)
        self.peer_secrets: dict[str, str] = {}

    @property
    def current(self) -> Node:
        return self.nodes[self.index]

    def base_urls(self) -> list[str]:
        return [n.base_url for n in self.nodes]

    async def register(self, req: wire.RegisterRequest, *, skip_current: bool = False) -> wire.RegisterReply:
        """Register with the first supernode that answers, starting at the current one
        (or the next one, after a failure), wrapping around the list once."""
        count = len(self.nodes)
        first = (self.index + 1) % count if skip_current else self.index
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BUSY_BUDGET
        slow_deadline = loop.time() + SLOW_BUDGET
        delay = 0.5
        while True:
            errors: list[str] = []
            tls_errors: list[str] = []
            busy = slow = False
            for k in range(count):
                i = (first + k) % count
                try:
                    reply = await self._call(i, "POST", "/api/v1/tasks", req,
                                             wire.RegisterReply, REGISTER_TIMEOUT,
                                             self._secret_header(self.nodes[i]) if req.peer else None)
                except TlsError as exc:
                    log.warning("supernode %s: %s", self.nodes[i].base_url, exc.message)
                    tls_errors.append(exc.message)
                    continue
                except SupernodeDown as exc:
                    log.info("supernode %s: %s", self.nodes[i].base_url, exc)
                    errors.append(f"{self.nodes[i].base_url}: {exc}")
                    busy = busy or exc.busy
                    slow = slow or exc.slow
                    continue
                self.index = i
                return reply
            if tls_errors and not busy:
                raise TlsError("; ".join(tls_errors))
            # Every supernode refused. One that answered 503 is alive but overloaded (a
            # swarm starting all at once): ask again with backoff instead of sending the
            # whole swarm to the origin, which is what the system exists to prevent.
            # a late answer (slow) is waited for a shorter time than an explicit "busy"
            if not (busy or slow) or loop.time() + delay > (deadline if busy else slow_deadline):
                raise SupernodeUnavailable("no supernode answered: " + "; ".join(errors))
            log.warning("supernodes %s; registering again in %.1f s", "busy" if busy else "slow to answer", delay)
            self.busy_at = loop.time()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, BUSY_DELAY_MAX)
            first = self.index

    def _secret_header(self, node: Node) -> dict[str, str] | None:
        secret = self.peer_secrets.get(node.base_url) or next(iter(self.peer_secrets.values()), None)
        return {PEER_SECRET_HEADER: secret} if secret else None

    async def pull(self, task_id: str, req: wire.PullRequest) -> wire.PullReply:
        return await self._call(self.index, "POST", f"/api/v1/tasks/{task_id}/pull", req,
                                wire.PullReply, req.wait + API_TIMEOUT * 2)

    async def report(self, task_id: str, req: wire.ReportRequest) -> None:
        await self._call(self.index, "POST", f"/api/v1/tasks/{task_id}/report", req, None, API_TIMEOUT)

    async def digests(self, task_id: str) -> wire.DigestsReply:
        return await self._call(self.index, "GET", f"/api/v1/tasks/{task_id}/digests", None,
                                wire.DigestsReply, API_TIMEOUT)

    async def _send(self, i: int, method: str, path: str, data: bytes | None, headers: dict[str, str],
                    timeout: float) -> tuple[bytes, int, str]:
        """One request to node `i`, upgraded to TLS if it is a bare host:port that closed
        a plain connection without a word (what a TLS server does)."""
        node = self.nodes[i]
        try:
            resp = await self.http.request(method, node.host, node.port, path, data, headers, timeout,
                                           tls=self._context() if node.tls else None)
        except TlsFailure as exc:
            if exc.kind == tlsconf.OTHER:
                raise  # a TLS stream broken mid-answer: the supernode is down, not misconfigured
            hint = ""
            if exc.kind == tlsconf.NOT_TLS and i not in self.explicit:
                plain = f"http://{hostport(node.host, node.port)}"
                hint = f" (with --cacert a bare host:port is https; write -n {plain} for plain)"
            raise TlsError(str(exc) + hint) from None
        except NoAnswer:
            if i not in self.upgradable:
                raise
            self.upgradable.discard(i)
            try:
                resp = await self.http.request(method, node.host, node.port, path, data, headers, timeout,
                                               tls=self._context())
            except TlsFailure as exc:
                # Only a server that showed a certificate, or took the handshake and then
                # wanted a client certificate, speaks TLS: anything else is still a server
                # that closed a plain request (down, or not HTTP).
                if exc.kind not in (tlsconf.UNTRUSTED, tlsconf.CLIENT_CERT):
                    raise NoAnswer("connection closed before an answer") from None
                raise TlsError(str(exc)) from None
            self.nodes[i] = dataclasses.replace(node, scheme="https")
            log.info("supernode %s speaks TLS: talking to it over https", node.base_url)
        return resp.body, resp.status, resp.headers.get("retry-after", "")

    def _context(self) -> ssl.SSLContext:
        return self.tls.context()

    async def _call(self, i: int, method: str, path: str, body: object,
                    typ: type[T] | None, timeout: float, extra: dict[str, str] | None = None) -> T:
        data = wire.encode(body) if body is not None else None
        headers = {"Content-Type": wire.JSON_TYPE, "Accept": wire.JSON_TYPE, **(extra or {})}
        loop = asyncio.get_running_loop()
        give_up = loop.time() + BUSY_BUDGET
        throttled = 0
        while True:
            try:
                raw, status, retry_after = await self._send(i, method, path, data, headers, timeout)
            except (OSError, TimeoutError) as exc:
                raise SupernodeDown(describe(exc), slow=isinstance(exc, TimeoutError)) from None
            throttled += status == 429
            if (not (status == 429 or (status == 503 and _is_busy(raw))) or loop.time() > give_up
                    or throttled > THROTTLED_RETRIES):
                break
            # over this client's request rate, or the supernode sheds load: it answers,
            # so wait as told (jittered, bounded) and ask it again
            self.busy_at = loop.time()
            self.busy_waits += 1
            await asyncio.sleep(_jittered(retry_after))
        if status >= 400:
            raise _error(raw, status)
        if typ is None:
            return None  # type: ignore[return-value]
        try:
            return wire.decode(raw, typ)
        except DfError as exc:  # a supernode answering garbage is as good as down
            raise SupernodeDown(f"bad answer: {exc.message}") from None


def _is_busy(raw: bytes) -> bool:
    try:
        body = wire.decode(raw, dict)  # type: ignore[type-abstract]
    except DfError:
        return False
    return isinstance(body, dict) and body.get("error") == "busy"


def _error(raw: bytes, status: int) -> Exception:
    try:
        body = wire.decode(raw, dict)  # type: ignore[type-abstract]
    except DfError:
        body = None
    err = from_wire(body, fallback_status=status)
    if status >= 500 and (body is None or err.code in _RETRY_CODES):
        return SupernodeDown(f"HTTP {status} {err.message}", busy=status == 503 and body is not None)
    return err
