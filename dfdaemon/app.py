"""The aiohttp shell of dfdaemon: the registry mirror (blob GETs through the swarm, the
rest passed through to the registry unchanged) and /metrics. Decisions live in routes.py,
the swarm fetch in blobs.py."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yarl
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from common.errors import DfError, IntegrityError, OriginError
from common.listen import BACKLOG
from common.netpolicy import AddressPolicy
from common.taskid import redact_url
from common.taskid import task_id as make_task_id
from common.tls import ClientTls, ServerTls
from dfget.config import DownloadConfig, Node
from dfget.download import download
from dfget.server.launcher import ControlClient

from . import routes
from .blobs import CHUNK, BlobFetch, Downloader, blob_paths
from .front import Front
from .metrics import Metrics

log = logging.getLogger("dfdaemon")


@dataclass
class Settings:
    home: Path
    nodes: tuple[Node, ...]
    ip: str
    registry: str | None = None  # http(s)://host[:port], no trailing slash
    peer_port: int = 0
    locallimit: int = 0
    rules: tuple[routes.Rule, ...] = ()
    alivetime: float = 24 * 3600.0
    max_fetches: int = 64  # swarm downloads at once; more blob requests get 429
    expiretime: float = 24 * 3600.0
    # where the HTTP proxy (and CONNECT) may connect: by default not loopback, link-local
    # (cloud metadata), unspecified or multicast (common.netpolicy)
    proxy_policy: AddressPolicy = field(default_factory=AddressPolicy)
    # TLS as dfget takes it (--cacert/--cert/--key/--client-ca): towards the supernodes,
    # peers and https upstreams, and for the peer server dfdaemon starts
    tls: ClientTls = field(default_factory=ClientTls)
    server_tls: ServerTls | None = None


class Daemon:
    def __init__(self, settings: Settings, downloader: Downloader = download) -> None:
        self.s = settings
        self.metrics = Metrics()
        self.fetches: dict[str, BlobFetch] = {}
        self.downloader = downloader
        self.session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, _app: web.Application) -> None:
        tls = self.s.tls
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=tls.context() if tls.cacert or tls.cert else True),
            auto_decompress=False, trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60))

    async def stop(self, _app: web.Application) -> None:
        for f in list(self.fetches.values()):
            if f.task is not None:
                f.task.cancel()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, *(f.task for f in self.fetches.values() if f.task),
                             return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    # --- entry ---------------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        absolute = request._message.url.is_absolute()  # absolute-form: we are the HTTP proxy
        route = routes.classify(request.method, request.path, absolute=absolute)
        try:
            resp = await self._dispatch(request, route)
        except web.HTTPException as exc:
            self.metrics.requests.labels(route.kind, str(exc.status)).inc()
            raise
        self.metrics.requests.labels(route.kind, str(resp.status)).inc()
        return resp

    async def _dispatch(self, request: web.Request, route: routes.Route) -> web.StreamResponse:
        if route.kind == "metrics":
            return web.Response(body=generate_latest(self.metrics.registry),
                                headers={"Content-Type": CONTENT_TYPE_LATEST})
        if route.kind == "ping":
            return web.Response(text="ok\n")
        if route.kind == "proxy":
            return await self.proxy(request)
        if route.kind == "not_found" or self.s.registry is None:
            return _registry_error(404, "NOT_FOUND", "not a registry API path")
        if route.kind == "blob":
            return await self.blob(request, route)
        return await self.passthrough(request, "registry")

    # --- pass-through --------------------------------------------------------------------
    async def passthrough(self, request: web.Request, label: str, url: str | None = None) -> web.StreamResponse:
        """The request as the client sent it, to the registry; its answer as the registry
        sent it (status, WWW-Authenticate, redirects, body), streamed."""
        assert self.session is not None
        url = url or (self.s.registry or "") + request.raw_path
        headers = routes.forward_headers(list(request.headers.items()), drop=("Host",))
        data = request.content.iter_chunked(CHUNK) if request.body_exists else None
        try:
            up = await self.session.request(request.method, url, headers=headers, data=data,
                                            allow_redirects=False)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("registry unreachable for %s %s: %s", request.method, request.path, type(exc).__name__)
            return _registry_error(502, "UNAVAILABLE", "the upstream registry did not answer")
        try:
            resp = web.StreamResponse(status=up.status, reason=up.reason)
            for k, v in routes.forward_headers(list(up.headers.items())):
                resp.headers.add(k, v)
            await resp.prepare(request)
            if request.method != "HEAD":
                async for chunk in up.content.iter_chunked(CHUNK):
                    await resp.write(chunk)
                    self.metrics.sent.labels(label).inc(len(chunk))
            await resp.write_eof()
            return resp
        finally:
            up.release()

    # --- HTTP proxy ----------------------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """An absolute-form request: GETs a rule sends through the swarm (registry blobs by
        their digest, anything else by URL), everything else forwarded as is."""
        url = str(request._message.url)
        decision = routes.proxy_decision(request.method, url, self.s.rules)
        if decision in ("refuse", "tunnel"):
            return web.Response(status=400, text="only http and https URLs are proxied\n")
        target = request._message.url
        if not await self._permitted(target.host or "", target.port or 80):
            return web.Response(status=403, text="destination refused by dfdaemon's proxy policy\n")
        if decision == "direct":
            return await self.passthrough(request, "proxy_direct", url=url)
        route = routes.classify("GET", target.path)
        if route.kind == "blob":
            return await self.blob(request, route, origin=str(target.with_fragment(None)))
        tid = make_task_id(url)
        fetch = self.fetches.get(tid)
        if fetch is None:
            if len(self.fetches) >= self.s.max_fetches:
                return self._too_many()
            fetch = self._new_fetch(request, url, None, tid)
        length = await fetch.wait_length()
        if length < 0:
            reason = fetch.error.code if isinstance(fetch.error, DfError) else type(fetch.error).__name__
            self.metrics.back_to_source.labels(reason).inc()
            log.warning("proxy %s: the swarm cannot serve it (%s); forwarding", redact_url(url)[:200], reason)
            return await self.passthrough(request, "proxy_direct", url=url)
        return await self._stream(request, None, fetch, length)

    async def _permitted(self, host: str, port: int) -> bool:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError:
            return True  # it will fail to connect, with its own error
        return all(self.s.proxy_policy.permits(str(ai[4][0])) for ai in infos)

    async def open_tunnel(self, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """CONNECT's far end: host:port, checked against the proxy policy."""
        host, sep, port_s = target.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port_s.isdigit() or not 0 < int(port_s) < 65536:
            raise ValueError(target)
        if not await self._permitted(host, int(port_s)):
            raise PermissionError("destination refused by the proxy policy")
        self.metrics.requests.labels("connect", "200").inc()
        return await asyncio.wait_for(asyncio.open_connection(host, int(port_s)), 10)

    # --- blobs ---------------------------------------------------------------------------
    async def blob(self, request: web.Request, route: routes.Route, origin: str | None = None) -> web.StreamResponse:
        """A content-addressed blob through the swarm; `origin` is its URL (default: the
        mirror's registry and the request's path)."""
        origin = origin or f"{self.s.registry}{request.path}"
        hexd = route.hex
        _, cached = blob_paths(self.s.home, hexd)
        if hexd not in self.fetches and cached.is_file():
            self.metrics.blobs.labels("cache").inc()
            self.metrics.blob_bytes.labels("cache").inc(cached.stat().st_size)
            return web.FileResponse(cached, headers=_blob_headers(route.digest))
        fetch = self.fetches.get(hexd)
        if fetch is None:
            if len(self.fetches) >= self.s.max_fetches:
                return self._too_many()
            fetch = self._new_fetch(request, origin, route.digest, route.hex)
        length = await fetch.wait_length()
        if length < 0:
            return await self._not_from_swarm(request, route, fetch.error, origin)
        return await self._stream(request, route.digest, fetch, length)

    def _too_many(self) -> web.Response:
        """A flood of distinct blob requests cannot start unbounded swarm downloads (each
        one a task and an origin fetch on the supernode)."""
        resp = _registry_error(429, "TOOMANYREQUESTS", "too many blob downloads in progress on this host")
        resp.headers["Retry-After"] = "1"
        return resp

    def _new_fetch(self, request: web.Request, url: str, identifier: str | None, key: str) -> BlobFetch:
        """Start a swarm download of `url`; `identifier` a content digest (then `key` is
        its hex and the bytes are checked against it) or None (a URL task, key = its id)."""
        out, _ = blob_paths(self.s.home, key)
        out.parent.mkdir(parents=True, exist_ok=True)
        headers = {}
        if "Authorization" in request.headers:  # the CDN needs it for the origin fetch
            headers["Authorization"] = request.headers["Authorization"]
        cfg = DownloadConfig(
            url=url, output=out, home=self.s.home, nodes=self.s.nodes,
            identifier=identifier, headers=headers, locallimit=self.s.locallimit, ip=self.s.ip,
            port=self.s.peer_port, alivetime=self.s.alivetime, expiretime=self.s.expiretime,
            tls=self.s.tls, server_tls=self.s.server_tls)
        fetch = BlobFetch(cfg, key if identifier else None, self.downloader)
        self.fetches[key] = fetch
        fetch.start()
        self.metrics.active.inc()
        t = asyncio.create_task(self._settle(fetch))
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return fetch

    async def _settle(self, fetch: BlobFetch) -> None:
        """After a fetch: a verified blob enters the cache; anything else is removed from
        disk and from the peer server, so it is never served again."""
        assert fetch.task is not None
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(fetch.task)
            st = fetch.stats
            for source, n in (("peer", st.bytes_from_peers), ("supernode", st.bytes_from_supernode),
                              ("origin", st.bytes_from_origin)):
                if n:
                    self.metrics.blob_bytes.labels(source).inc(n)
            if st.back_to_source:
                # dfget's reasons: "no supernode: ...", "p2p failed: ...", "<error code>: ..."
                label = st.back_to_source.split(":", 1)[0].strip().replace(" ", "_")[:40]
                self.metrics.back_to_source.labels(label).inc()
                log.warning("blob %s fetched from the registry, not the swarm: %s", fetch.key[:12],
                            st.back_to_source)
            out, cached = blob_paths(self.s.home, fetch.key)
            if fetch.state == "ok" and fetch.hex is None:  # a proxied URL: the supernode caches it
                self.metrics.blobs.labels("proxy_swarm").inc()
                return
            if fetch.state == "ok":
                cached.parent.mkdir(parents=True, exist_ok=True)
                with contextlib.suppress(FileExistsError):
                    os.link(out, cached)
                self.metrics.blobs.labels("swarm").inc()
                return
            err = fetch.error
            why = err.message if isinstance(err, DfError) else repr(err)
            if fetch.state == "bad" or isinstance(err, IntegrityError):
                # ours (the whole blob) or the supernode's (its CDN checked the digest)
                self.metrics.digest_mismatch.inc()
                log.error("blob sha256:%s failed its digest check, discarded, not cached: %s",
                          fetch.key[:12], why)
            else:
                log.warning("blob sha256:%s: fetch failed: %s", fetch.key[:12], why)
            self.metrics.blobs.labels(fetch.state).inc()
            with contextlib.suppress(OSError):
                out.unlink()
            client = ControlClient(self.s.home)
            try:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(client.remove(fetch.task_id), 5)
            finally:
                await client.close()
        finally:
            fetch.close()
            self.metrics.active.dec()
            if self.fetches.get(fetch.key) is fetch:
                del self.fetches[fetch.key]

    async def _not_from_swarm(self, request: web.Request, route: routes.Route,
                              error: BaseException | None, origin: str) -> web.StreamResponse:
        reason = error.code if isinstance(error, DfError) else type(error).__name__
        self.metrics.back_to_source.labels(reason).inc()
        if isinstance(error, OriginError):
            # The registry refused or failed: its own answer (401 + challenge, 404...) is
            # what the client must see; _direct_blob relays any non-200 answer unchanged
            # (and still checks a 200's bytes against the digest).
            log.warning("blob %s: the registry refused it through the swarm (%s); asking it directly",
                        route.digest[:19], reason)
            return await self._direct_blob(request, route, origin)
        log.warning("blob %s: the swarm cannot serve it (%s); fetching it directly from the registry",
                    route.digest[:19], reason)
        return await self._direct_blob(request, route, origin)

    async def _direct_blob(self, request: web.Request, route: routes.Route, url: str) -> web.StreamResponse:
        """The blob straight from the registry (redirects followed), checked against its
        digest on the way: the last byte is held back until it matched, a mismatch aborts
        the response. Not cached: the swarm did not vouch for it."""
        assert self.session is not None
        headers = routes.forward_headers(list(request.headers.items()), drop=("Host", "Range", "If-Range"))
        try:
            up = await self._follow(url, headers)
        except PermissionError as exc:
            log.warning("blob %s: %s", route.digest[:19], exc)
            return _registry_error(502, "DENIED", "the registry redirected to a refused address")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("registry unreachable for %s: %s", route.digest[:19], type(exc).__name__)
            return _registry_error(502, "UNAVAILABLE", "the upstream registry did not answer")
        try:
            if up.status != 200 or up.content_length is None:
                resp = web.StreamResponse(status=up.status if up.status != 200 else 502, reason=up.reason)
                if up.status != 200:
                    for k, v in routes.forward_headers(list(up.headers.items())):
                        resp.headers.add(k, v)
                    await resp.prepare(request)
                    async for chunk in up.content.iter_chunked(CHUNK):
                        await resp.write(chunk)
                    await resp.write_eof()
                    return resp
                return _registry_error(502, "BLOB_UNKNOWN", "the registry sent a blob without a length")
            length = up.content_length
            resp = web.StreamResponse(status=200, headers=_blob_headers(route.digest))
            resp.content_length = length
            await resp.prepare(request)
            h = hashlib.sha256()
            held = b""
            async for chunk in up.content.iter_chunked(CHUNK):
                h.update(chunk)
                data, held = held + chunk[:-1], chunk[-1:]
                if data:
                    await resp.write(data)
                    self.metrics.sent.labels("blob_direct").inc(len(data))
            self.metrics.blob_bytes.labels("direct").inc(length)
            if h.hexdigest() != route.hex:
                self.metrics.digest_mismatch.inc()
                log.error("blob sha256:%s from the registry failed its digest check; response aborted",
                          route.hex[:12])
                if request.transport is not None:
                    request.transport.abort()
                return resp
            await resp.write(held)
            await resp.write_eof()
            self.metrics.blobs.labels("direct").inc()
            return resp
        finally:
            up.release()

    async def _follow(self, url: str, headers: list[tuple[str, str]]) -> aiohttp.ClientResponse:
        """GET following up to 5 redirects by hand: a hop leaving the first URL's origin
        (a registry's 307 to object storage) loses the credentials and must pass the
        proxy's address policy, like any other fetch dfdaemon makes for a client."""
        assert self.session is not None
        first = routes.origin_of(url)
        for _ in range(6):
            if routes.origin_of(url) != first:
                target = yarl.URL(url)
                if not await self._permitted(target.host or "", target.port or 80):
                    raise PermissionError(f"redirect to {target.host} refused by the address policy")
                headers = [(k, v) for k, v in headers if k.lower() not in routes.CREDENTIAL_HEADERS]
            up = await self.session.get(url, headers=headers, allow_redirects=False)
            if up.status not in (301, 302, 303, 307, 308) or "Location" not in up.headers:
                return up
            location = up.headers["Location"]
            up.release()
            url = str(yarl.URL(url).join(yarl.URL(location)))
            if yarl.URL(url).scheme not in ("http", "https"):
                raise ValueError("redirect to a non-http(s) URL")
        raise ValueError("too many redirects")

    async def _stream(self, request: web.Request, digest: str | None, fetch: BlobFetch,
                      length: int) -> web.StreamResponse:
        headers = _blob_headers(digest) if digest else {"Content-Type": "application/octet-stream"}
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = length
        await resp.prepare(request)
        fd: int | None = None
        sent = 0

        def limit() -> int:
            # the last byte waits for the whole-blob digest check
            return fetch.hashed if fetch.state == "ok" else min(fetch.hashed, length - 1)

        try:
            while True:
                await fetch.wait(lambda sent=sent: limit() > sent)  # bound now: `sent` moves on
                if fetch.state in ("bad", "failed"):
                    log.warning("%s: aborting the response after %d bytes: %s", digest or "download",
                                sent, fetch.error)
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                end = limit()
                if end <= sent:
                    if fetch.state == "ok" and sent >= length:
                        break
                    continue
                if fd is None:
                    fd = fetch.reader_fd()
                while sent < end:
                    data = await asyncio.to_thread(os.pread, fd, min(CHUNK, end - sent), sent)
                    if not data:
                        raise OSError("short read")
                    await resp.write(data)
                    sent += len(data)
                    self.metrics.sent.labels("blob" if digest else "proxy_swarm").inc(len(data))
        finally:
            if fd is not None:
                os.close(fd)
        await resp.write_eof()
        return resp


def _blob_headers(digest: str) -> dict[str, str]:
    return {"Content-Type": "application/octet-stream", "Docker-Content-Digest": digest,
            "ETag": f'"{digest}"', "Accept-Ranges": "none"}


def _registry_error(status: int, code: str, message: str) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(status=status, text=body, content_type="application/json")


async def serve(daemon: Daemon, sock: socket.socket) -> tuple[web.AppRunner, asyncio.Server]:
    """Run the app on a bound socket behind the CONNECT-aware front (front.py)."""
    runner = web.AppRunner(make_app(daemon), access_log=None, handle_signals=False)
    await runner.setup()
    assert runner.server is not None
    http = runner.server

    def tunnelled(up: int, down: int) -> None:
        daemon.metrics.sent.labels("connect").inc(down)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Front(http, daemon.open_tunnel, tunnelled), sock=sock, backlog=BACKLOG)
    return runner, server


def make_app(daemon: Daemon) -> web.Application:
    app = web.Application(client_max_size=1 << 20)
    app.on_startup.append(daemon.start)
    app.on_cleanup.append(daemon.stop)
    app.router.add_route("*", "/{tail:.*}", daemon.handle)
    return app
