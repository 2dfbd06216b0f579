"""Hostile input to dfdaemon's listener (/work/shared/reference/hostile-input.md): a TLS
ClientHello on the plain port (skopeo sends one first), huge and malformed request heads,
path tricks, smuggling. Nothing may get a 5xx, read a local file, start a blob fetch or
stop the daemon from answering. Real sockets: the daemon's app on 127.0.0.1, in front of a
small fake registry that records what reached it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from common.listen import listen_socket
from dfdaemon.app import Daemon, Settings, serve
from dfget.config import Node

SECRET_FILE = "root:x:0:0"


def client_hello() -> bytes:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    data = outgoing.read()
    assert data[:1] == b"\x16"  # a TLS handshake record
    return data


async def raw(port: int, data: bytes, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(1 << 20), timeout)
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


def status_of(answer: bytes) -> int | None:
    if not answer.startswith(b"HTTP/1."):
        return None
    return int(answer.split(b" ", 2)[1])


class World:
    def __init__(self, home: Path, daemon: Daemon, port: int, seen: list[str]) -> None:
        self.home, self.daemon, self.port, self.seen = home, daemon, port, seen

    async def get(self, target: str, extra: str = "") -> tuple[int | None, bytes]:
        req = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{extra}\r\n"
        answer = await raw(self.port, req.encode("latin-1"))
        return status_of(answer), answer


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    seen: list[str] = []

    async def registry(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.json_response({"errors": [{"code": "NAME_UNKNOWN", "message": "no"}]}, status=404)

    reg_app = web.Application()
    reg_app.router.add_route("*", "/{tail:.*}", registry)
    reg = TestServer(reg_app, host="127.0.0.1")
    await reg.start_server()
    home = tmp_path / "home"
    # no supernode on this port: nothing here may reach the swarm anyway
    daemon = Daemon(Settings(home=home, nodes=(Node("127.0.0.1", 9),), ip="127.0.0.1",
                             registry=f"http://127.0.0.1:{reg.port}"))
    sock = listen_socket("127.0.0.1", 0)
    runner, server = await serve(daemon, sock)  # the daemon's own listener: front + app
    try:
        yield World(home, daemon, sock.getsockname()[1], seen)
    finally:
        from dfget_support import stop_server
        server.close()
        await runner.cleanup()
        await reg.close()
        await stop_server(home)


async def _still_serves(w: World) -> None:
    status, body = await w.get("/_ping")
    assert status == 200 and body.endswith(b"ok\n")
    assert not w.daemon.fetches
    assert not (w.home / "dfdaemon" / "downloads").exists()


async def test_tls_client_hello_on_the_plain_port(world: World) -> None:
    answer = await raw(world.port, client_hello())
    assert status_of(answer) in (None, 400)  # a plain 400 or a closed connection
    await _still_serves(world)


@pytest.mark.parametrize("junk", [
    b"\x00\xff\xfe\x01garbage\r\n\r\n",
    b"GET\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nBad Header Name: x\r\n\r\n",
    b"GET /v2/ HTTP/1.1\r\nX: a\x00b\r\n\r\n",
])
async def test_malformed_request_heads(world: World, junk: bytes) -> None:
    answer = await raw(world.port, junk)
    assert status_of(answer) in (None, 400, 404, 505), answer[:200]
    await _still_serves(world)


async def test_huge_headers_and_request_lines(world: World) -> None:
    status, _ = await world.get("/v2/", f"X-Big: {'a' * 200_000}\r\n")
    assert status in (None, 400, 431)
    status, _ = await world.get("/v2/", "".join(f"X-{i}: {i}\r\n" for i in range(5000)))
    assert status in (None, 400, 431)
    status, _ = await world.get("/v2/" + "a" * 100_000)
    assert status in (None, 400, 414)
    status, _ = await world.get(f"/v2/x/blobs/sha256:{'a' * 64}", f"Authorization: Bearer {'t' * 100_000}\r\n")
    assert status in (None, 400, 431)
    await _still_serves(world)


@pytest.mark.parametrize("path", [
    "/v2/../../../../etc/passwd",
    "/v2/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/v2/..%2f..%2f..%2fetc/passwd",
    "/v2/x/blobs/sha256:../../../../etc/passwd",
    "/v2/x/blobs/sha256:%2e%2e%2f%2e%2e%2fetc%2fpasswd" + "0" * 40,
    "/v2/x/blobs/sha256:" + "g" * 64,
    "/v2/x/blobs/sha256:" + "A" * 64,
    "/v2/x/blobs/sha256:" + "a" * 63,
    "/v2/x/blobs/sha256:" + "a" * 64 + "%00",
    "/v2/x%00/blobs/sha256:" + "a" * 64,
    "/v2/../../x/blobs/sha256:" + "a" * 64,
    "/v2/X/blobs/sha256:" + "a" * 64,
    "//etc/passwd",
    "/etc/passwd",
    "/metrics/../../etc/passwd",
    "/v2/x/blobs/sha256:" + "a" * 64 + "%3f../../etc/passwd",
    "/%00",
    "*",
])
async def test_path_tricks_never_read_local_files_nor_start_fetches(world: World, path: str) -> None:
    status, body = await world.get(path)
    assert status is not None and status < 500, body[:300]
    assert SECRET_FILE.encode() not in body
    await _still_serves(world)


async def test_absolute_form_to_metadata_is_not_served(world: World) -> None:
    status, body = await world.get("http://169.254.169.254/latest/meta-data/")
    assert status is not None and status >= 400
    assert not [p for p in world.seen if "meta-data" in p]
    await _still_serves(world)


@pytest.mark.parametrize("junk", [
    b"CONNECT\r\n\r\n",
    b"CONNECT  HTTP/1.1\r\n\r\n",
    b"CONNECT 169.254.169.254:80 HTTP/1.1\r\n\r\n",
    b"CONNECT 127.0.0.1:22 HTTP/1.1\r\n\r\n",  # loopback is denied by default
    b"CONNECT [::1]:22 HTTP/1.1\r\n\r\n",
    b"CONNECT 0.0.0.0:1 HTTP/1.1\r\n\r\n",
    b"CONNECT host:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT host HTTP/1.1\r\n\r\n",
    b"CONNECT " + b"a" * 40_000,
])
async def test_hostile_connect_is_refused(world: World, junk: bytes) -> None:
    answer = await raw(world.port, junk, timeout=25)
    assert status_of(answer) in (400, 403, 431), answer[:200]
    await _still_serves(world)


async def test_a_flood_of_blob_requests_cannot_start_unbounded_downloads(world: World) -> None:
    world.daemon.s.max_fetches = 0  # as if every slot were taken
    for k in range(20):
        status, body = await world.get(f"/v2/x/blobs/sha256:{k:064x}")
        assert status == 429 and b"TOOMANYREQUESTS" in body and b"Retry-After: 1" in body
        status, _ = await world.get(f"http://127.0.0.1:9/files/{k}.bin")  # the proxy too
        assert status is not None and status >= 400
    await _still_serves(world)


async def test_many_connections_at_once_then_still_serving(world: World) -> None:
    hello = client_hello()
    answers = await asyncio.gather(*(raw(world.port, hello if i % 2 else b"GET /v2/ HTTP/1.1\r\n\r\n")
                                     for i in range(100)))
    assert len(answers) == 100
    await _still_serves(world)


async def test_direct_fetch_redirects_lose_credentials_and_obey_the_address_policy(tmp_path: Path) -> None:
    """The daemon's own fetch from the registry (its fallback path): a 307 to another
    origin gets no Authorization, and a hop to a refused address is not made."""
    from common.netpolicy import AddressPolicy

    seen: list[tuple[str, str | None]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append((request.host, request.headers.get("Authorization")))
        if request.path.startswith("/v2/"):
            target = request.query.get("to", "127.0.0.2")
            return web.Response(status=307, headers={"Location": f"http://{target}:{port}/storage?sig=1"})
        return web.Response(body=b"blob")

    app = web.Application()
    app.router.add_get("/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = listen_socket("0.0.0.0", 0)
    port = sock.getsockname()[1]
    site = web.SockSite(runner, sock)
    await site.start()
    home = tmp_path / "home"
    try:
        for policy, allowed in ((AddressPolicy.build(allow=["127.0.0.0/8"]), True), (AddressPolicy(), False)):
            daemon = Daemon(Settings(home=home, nodes=(Node("127.0.0.1", 9),), ip="127.0.0.1",
                                     registry=f"http://127.0.0.1:{port}", proxy_policy=policy))
            await daemon.start(web.Application())
            seen.clear()
            try:
                if allowed:
                    up = await daemon._follow(f"http://127.0.0.1:{port}/v2/x/blobs/sha256:{'a' * 64}",
                                              [("Authorization", "Bearer tok"), ("Accept", "*/*")])
                    assert up.status == 200 and await up.read() == b"blob"
                    up.release()
                    assert seen == [(f"127.0.0.1:{port}", "Bearer tok"), (f"127.0.0.2:{port}", None)]
                else:
                    with pytest.raises(PermissionError):
                        await daemon._follow(f"http://127.0.0.1:{port}/v2/x?to=169.254.169.254", [])
                    assert seen == [(f"127.0.0.1:{port}", None)]  # the metadata hop was not made
            finally:
                await daemon.stop(web.Application())
    finally:
        await runner.cleanup()
