"""Slow clients on real sockets (docs/hostile-input.md, "Peer server" and "Supernode
API"): a connection that trickles its request head is dropped at the header deadline,
one that trickles its body gets 408 at the body deadline, and meanwhile the server goes
on answering everyone else at once. Servers run exactly as in production: the app
factory under web.AppRunner with the same runner options, on 127.0.0.1:0; plus one real
`supernode` process configured from its command line. Bytes that are not HTTP get a 400
and one log line, never a traceback."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from supernode_support import peer, settings_for

from dfget.server.app import build_peer_app
from dfget.server.app import runner_kwargs as peer_runner_kwargs
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry
from supernode.api import guard
from supernode.app import create_app
from supernode.state import STATE

DEADLINE = 1.0
SLACK = 1.5  # loop scheduling on a shared 2-core box
TID = "ab" * 32


async def serve(app: web.Application, **kwargs: Any) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None, **kwargs)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[int, web.Application]]:
    settings = settings_for(tmp_path / "sn", None, header_timeout=DEADLINE, body_timeout=DEADLINE)
    app = create_app(settings)
    runner, port = await serve(app, **guard.runner_kwargs(settings.header_timeout))
    try:
        yield port, app
    finally:
        await runner.cleanup()


async def slowloris(port: int, first: bytes, drip: bytes, every: float = 0.1) -> tuple[float, float, bytes]:
    """Send `first`, then `drip` a byte at a time until the server hangs up (or the drip
    runs out): when the first answer byte came, when the connection ended, the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    answered = None
    got = b""
    try:
        writer.write(first)
        for i in range(len(drip)):
            writer.write(drip[i:i + 1])
            await writer.drain()
            try:
                chunk = await asyncio.wait_for(reader.read(65536), every)
            except TimeoutError:
                continue
            if not chunk:
                break
            answered = answered or time.monotonic() - t0
            got += chunk
        else:
            got += await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        pass
    finally:
        writer.close()
    ended = time.monotonic() - t0
    return answered or ended, ended, got


async def served_meanwhile(port: int, request: bytes) -> float:
    """Latency of one ordinary request on a fresh connection."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        status = await asyncio.wait_for(reader.readline(), 5)
        assert status.split()[1] in (b"200", b"206"), status
    finally:
        writer.close()
    return time.monotonic() - t0


async def attack_and_measure(port: int, first: bytes, drip: bytes, probe: bytes, n: int = 20,
                             ) -> tuple[list[float], list[bytes], list[float]]:
    """n slow clients at once, and ordinary requests meanwhile: when each slow client got
    its answer (or was cut off), the answers, the ordinary requests' latencies."""
    attackers = [asyncio.create_task(slowloris(port, first, drip)) for _ in range(n)]
    await asyncio.sleep(0.3)
    latencies = []
    for _ in range(5):
        latencies.append(await served_meanwhile(port, probe))
        await asyncio.sleep(0.1)
    results = await asyncio.gather(*attackers)
    # the connection itself is closed after the answer and at most the linger time
    assert all(ended <= answered + guard.LINGER + SLACK for answered, ended, _ in results)
    return [r[0] for r in results], [r[2] for r in results], latencies


PING = b"GET /_ping HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_api_drops_slow_headers_at_the_deadline_and_serves_others(api: tuple[int, web.Application]) -> None:
    port, _ = api
    lived, answers, latencies = await attack_and_measure(
        port, b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\n", b"X-Slow: " + b"a" * 200, PING)
    assert all(DEADLINE * 0.8 <= t <= DEADLINE + SLACK for t in lived), lived
    assert all(a == b"" for a in answers)  # cut off, no request ever reached a handler
    assert statistics.median(latencies) < 0.5, latencies


async def test_api_drops_a_connection_that_never_sends_a_byte(api: tuple[int, web.Application]) -> None:
    port, _ = api
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.monotonic()
    try:
        assert await asyncio.wait_for(reader.read(), DEADLINE + SLACK) == b""
    finally:
        writer.close()
    assert time.monotonic() - t0 >= DEADLINE * 0.8


async def test_api_answers_408_to_slow_bodies_and_closes(api: tuple[int, web.Application]) -> None:
    port, app = api
    body = json.dumps({"url": "http://127.0.0.1:9/x", "peer": peer()}).encode()
    post = b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    chunked = (post + b"Transfer-Encoding: chunked\r\n\r\n",
               b"".join(b"1\r\n" + body[i:i + 1] + b"\r\n" for i in range(len(body))))
    sized = (post + f"Content-Length: {len(body)}\r\n\r\n".encode(), body)
    runs = await asyncio.gather(*(attack_and_measure(port, head, drip, PING, n=5) for head, drip in (chunked, sized)))
    for answered, answers, latencies in runs:
        for t, answer in zip(answered, answers):
            assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "request_timeout"
            assert b"Connection: close" in answer
            assert DEADLINE * 0.8 <= t <= DEADLINE + SLACK, t
        assert statistics.median(latencies) < 0.5, latencies
    assert (await _get_json(port, "/api/v1/tasks"))["tasks"] == []  # nothing registered
    assert app[guard.GUARD].active == 0


async def _get_json(port: int, path: str) -> Any:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return json.loads(raw.partition(b"\r\n\r\n")[2])


async def test_seed_drops_slow_headers(api: tuple[int, web.Application]) -> None:
    _, app = api
    port = app[STATE].download_port
    lived, answers, latencies = await attack_and_measure(
        port, b"GET /peer/file/" + TID.encode() + b" HTTP/1.1\r\n", b"Range: bytes=0-" + b"9" * 100, PING)
    assert all(t <= DEADLINE + SLACK for t in lived) and all(a == b"" for a in answers), lived
    assert statistics.median(latencies) < 0.5


@pytest.fixture
async def peer_server(tmp_path: Path) -> AsyncIterator[int]:
    data = os.urandom(4000)
    (tmp_path / "f").write_bytes(data)
    state = ServerState(ServerConfig(home=tmp_path, header_timeout=DEADLINE, max_uploads=2))
    state.table.register(FileEntry(task_id=TID, path=tmp_path / "f", length=4000, piece_size=1000,
                                   supernodes=[], verified={0, 1, 2, 3}))
    runner, port = await serve(build_peer_app(state, lambda e: None), **peer_runner_kwargs(state))  # type: ignore[arg-type]
    try:
        yield port
    finally:
        await runner.cleanup()


async def test_peer_server_drops_slow_headers_and_serves_others(peer_server: int) -> None:
    probe = f"GET /peer/file/{TID} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-999\r\nConnection: close\r\n\r\n".encode()
    lived, answers, latencies = await attack_and_measure(
        peer_server, f"GET /peer/file/{TID} HTTP/1.1\r\n".encode(), b"Range: bytes=0-" + b"9" * 100, probe, n=50)
    assert all(DEADLINE * 0.8 <= t <= DEADLINE + SLACK for t in lived), lived
    assert all(a == b"" for a in answers)
    assert statistics.median(latencies) < 0.5, latencies


@pytest.mark.parametrize("garbage", [
    b"GET /_ping HTTP/1.1\r\nHost: x\r\nX-Bad: a\x00b\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET /_ping HTTP/9.9\r\n\r\n", b"GET /_ping HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
    b"GET /_ping HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST /api/v1/tasks HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\n\r\n", b"GET /_ping HTTP/1.1\r\n" + b"X: y\r\n" * 200 + b"\r\n",
])
async def test_bytes_that_are_not_http_get_400_and_no_traceback(api: tuple[int, web.Application], garbage: bytes,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    port, _ = api
    caplog.set_level(logging.DEBUG)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(garbage)
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert raw.split(b" ", 2)[1] in (b"400", b"413", b"431"), raw[:200]
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], caplog.text


def test_supernode_process_applies_header_and_body_deadlines_from_its_command_line(
        supernode: Callable[..., Any]) -> None:
    sn = supernode(redis_url=None, extra_args=["--header-timeout", "1s", "--body-timeout", "1s"])

    async def run() -> None:
        lived, answers, latencies = await attack_and_measure(
            sn.port, b"GET /version HTTP/1.1\r\n", b"X-Slow: " + b"a" * 200, PING, n=10)
        assert all(t <= DEADLINE + SLACK for t in lived) and all(a == b"" for a in answers), lived
        assert statistics.median(latencies) < 0.5
        body = json.dumps({"url": "http://127.0.0.1:9/x"}).encode()
        _, answers, _ = await attack_and_measure(
            sn.port, b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode(), body, PING, n=3)
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers

    asyncio.run(run())
    assert "Traceback" not in (sn.home / "supernode.log").read_text()
