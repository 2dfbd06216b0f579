"""dfget's own small HTTP client (supernode API, peer server control socket)."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from dfget.httpclient import ConnectError, HttpClient, HttpError
from conftest import free_port


async def _raw_server(answers: list[bytes]) -> tuple[asyncio.Server, list[int]]:
    """Answers the n-th connection's first request with answers[n], then closes it."""
    conns: list[int] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        n = len(conns)
        conns.append(n)
        head = await r.readuntil(b"\r\n\r\n")
        length = [int(x.split(b":")[1]) for x in head.split(b"\r\n") if x.lower().startswith(b"content-length")]
        if length:
            await r.readexactly(length[0])
        w.write(answers[min(n, len(answers) - 1)])
        await w.drain()
        w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, conns


async def test_a_kept_alive_connection_the_server_closed_is_replaced() -> None:
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    server, conns = await _raw_server([ok])
    port = server.sockets[0].getsockname()[1]
    async with server, HttpClient() as http:
        assert (await http.request("POST", "127.0.0.1", port, "/a", b"{}")).body == b"ok"
        await asyncio.sleep(0.05)  # the server closed it after one answer, without saying so
        resp = await http.request("POST", "127.0.0.1", port, "/a", b"{}")
    assert resp.status == 200 and resp.body == b"ok" and len(conns) == 2


async def test_chunked_and_unframed_bodies() -> None:
    chunked = b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n"
    unframed = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end"
    server, _ = await _raw_server([chunked, unframed])
    port = server.sockets[0].getsockname()[1]
    async with server, HttpClient() as http:
        a = await http.request("GET", "127.0.0.1", port, "/")
        b = await http.request("GET", "127.0.0.1", port, "/")
    assert (a.status, a.body) == (201, b"abcde") and b.body == b"until the end"


async def test_garbage_and_refusal_are_errors_not_answers() -> None:
    server, _ = await _raw_server([b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"])
    port = server.sockets[0].getsockname()[1]
    async with server, HttpClient() as http:
        with pytest.raises(HttpError, match="malformed status line"):
            await http.request("GET", "127.0.0.1", port, "/")
        with pytest.raises(HttpError, match="closed in the response body"):
            await http.request("GET", "127.0.0.1", port, "/")
        dead = free_port()
        with pytest.raises(ConnectError, match=f"cannot connect to 127.0.0.1:{dead}: connection refused"):
            await http.request("GET", "127.0.0.1", dead, "/")


def test_the_download_command_does_not_import_aiohttp_or_cryptography() -> None:
    """Each costs tens of ms on every run; a P2P download needs neither (aiohttp is
    imported when going to the origin, cryptography only by the servers)."""
    code = ("import sys, dfget.cli, dfget.download, dfget.p2p; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'aiohttp', 'cryptography', 'redis'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
