"""dfget against peers that answer wrongly (docs/hostile-input.md, "dfget"): each peer
here is a raw TCP server writing exactly the bytes under test. Every bad answer fails
the piece with a wire reason (PieceFailed), never another exception, never a hang, and
never reads more than the piece; plus dfget waiting out a supernode's 429."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web
from dfget_support import start_app

from common import digest, wire
from common.errors import TooManyRequests
from dfget.config import Node
from dfget.output import PartFile, recheck
from dfget.piecefetch import FetchLimits, PieceFailed, fetch_piece
from dfget.httpclient import HttpClient
from dfget.supernodes import Supernodes

TID = "cd" * 32
DATA = os.urandom(200_000)
START, END = 50_000, 149_999
GOOD = DATA[START:END + 1]
CR = f"Content-Range: bytes {START}-{END}/{len(DATA)}\r\n".encode()
OK_HEAD = b"HTTP/1.1 206 Partial Content\r\n" + CR + f"Content-Length: {len(GOOD)}\r\n".encode() + b"\r\n"

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def sends(*parts: bytes, then_close: bool = True) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        for p in parts:
            writer.write(p)
            await writer.drain()
        if not then_close:
            await asyncio.sleep(30)
    return script


def trickle(head: bytes, tail: bytes, every: float) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        for i in range(len(tail)):
            writer.write(tail[i:i + 1])
            await writer.drain()
            await asyncio.sleep(every)
    return script


def endless(head: bytes) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(head)
        block = b"z" * 65536
        for _ in range(100_000):  # ~6 GB at most: the client must stop long before
            writer.write(block)
            await writer.drain()
    return script


def chunked(body: bytes) -> bytes:
    return b"HTTP/1.1 206 Partial Content\r\n" + CR + b"Transfer-Encoding: chunked\r\n\r\n" + body


CASES: dict[str, tuple[Script, str]] = {
    "garbage status line": (sends(b"FOO BAR\r\n\r\n"), "error"),
    "status not a number": (sends(b"HTTP/1.1 abc OK\r\n\r\n"), "error"),
    "status in superscript digits": (sends(b"HTTP/1.1 2\xb26 OK\r\n\r\n" + GOOD), "error"),
    "not HTTP/1.x": (sends(b"ICY 206 OK\r\n\r\n" + GOOD), "error"),
    "header line without colon": (sends(b"HTTP/1.1 206 OK\r\nno colon here\r\n\r\n" + GOOD), "error"),
    "head never ends (16 KiB)": (sends(b"HTTP/1.1 206 OK\r\n" + b"X-Pad: " + b"a" * 20_000), "error"),
    "closed before any byte": (sends(), "short_body"),
    "informational 100 first": (sends(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_HEAD + GOOD), "error"),
    "redirect": (sends(b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n"), "error"),
    "200 with the right bytes": (sends(b"HTTP/1.1 200 OK\r\n" + f"Content-Length: {len(GOOD)}\r\n\r\n".encode() + GOOD), "error"),
    "404": (sends(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"), "not_found"),
    "503 busy": (sends(b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"), "refused"),
    "429": (sends(b"HTTP/1.1 429 Slow Down\r\nContent-Length: 0\r\n\r\n"), "refused"),
    "500": (sends(b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n"), "error"),
    "Content-Length not a number": (sends(b"HTTP/1.1 206 OK\r\n" + CR + b"Content-Length: abc\r\n\r\n" + GOOD), "error"),
    "Content-Length negative": (sends(b"HTTP/1.1 206 OK\r\n" + CR + b"Content-Length: -5\r\n\r\n" + GOOD), "error"),
    "Content-Length in superscript digits": (
        sends(b"HTTP/1.1 206 OK\r\n" + CR + b"Content-Length: 1\xb2\r\n\r\n" + GOOD), "error"),
    "two different Content-Lengths": (sends(b"HTTP/1.1 206 OK\r\n" + CR + f"Content-Length: {len(GOOD)}\r\n".encode()
                                            + b"Content-Length: 10\r\n\r\n" + GOOD), "error"),
    "declared length above the piece": (sends(b"HTTP/1.1 206 OK\r\n" + CR + b"Content-Length: 9999999\r\n\r\n" + GOOD), "long_body"),
    "declared length below the piece": (sends(b"HTTP/1.1 206 OK\r\n" + CR + b"Content-Length: 10\r\n\r\n" + GOOD[:10]), "short_body"),
    "short body then close": (sends(OK_HEAD + GOOD[:5000]), "short_body"),
    "long body after the declared length": (sends(OK_HEAD + GOOD + b"x" * 50_000), "long_body"),
    "endless body without length": (endless(b"HTTP/1.1 206 OK\r\n" + CR + b"\r\n"), "long_body"),
    "endless chunked body": (endless(chunked(b"10000\r\n")), "long_body"),
    "wrong bytes": (sends(OK_HEAD + bytes(len(GOOD))), "digest_mismatch"),
    "Content-Range of another piece": (sends(b"HTTP/1.1 206 OK\r\nContent-Range: bytes 0-99999/200000\r\n"
                                             + f"Content-Length: {len(GOOD)}\r\n\r\n".encode() + GOOD), "error"),
    "Content-Range garbage": (sends(b"HTTP/1.1 206 OK\r\nContent-Range: pieces 1\r\n"
                                    + f"Content-Length: {len(GOOD)}\r\n\r\n".encode() + GOOD), "error"),
    "Content-Range in other digits": (sends(b"HTTP/1.1 206 OK\r\nContent-Range: bytes \xb2-3/4\r\n\r\n" + GOOD), "error"),
    "chunk size not hex": (sends(chunked(b"zz\r\n" + GOOD + b"\r\n0\r\n\r\n")), "error"),
    "chunked body cut short": (sends(chunked(f"{len(GOOD):x}\r\n".encode() + GOOD[:100])), "short_body"),
    "chunked body too long": (sends(chunked(f"{len(GOOD) + 10:x}\r\n".encode() + GOOD + b"x" * 10 + b"\r\n0\r\n\r\n")),
                              "long_body"),
    "slow head (slowloris)": (trickle(b"HTTP/1.1 206 OK\r\n", b"X-Slow: " + b"a" * 100, 0.05), "timeout"),
    "slow body (slowloris)": (trickle(OK_HEAD, GOOD, 0.01), "timeout"),
    "head then silence": (sends(OK_HEAD + GOOD[:100], then_close=False), "timeout"),
}


@pytest.fixture
def part(tmp_path: Path) -> AsyncIterator[PartFile]:
    p = PartFile(tmp_path / "out", TID)
    p.open(len(DATA))
    yield p  # type: ignore[misc]
    p.close()


async def fetch_from(script: Script, part: PartFile) -> int:
    server = await asyncio.start_server(lambda r, w: _run(script, r, w), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    src = wire.Source(cid="11" * 16, ip="127.0.0.1", port=port, kind="peer")
    a = wire.Assignment(piece=1, start=START, end=END, digest=digest.of(GOOD), source=src)
    try:
        return await fetch_piece(None, TID, a, part, FetchLimits(minrate=1 << 30))  # type: ignore[arg-type]
    finally:
        server.close()
        await server.wait_closed()


async def _run(script: Script, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await script(reader, writer)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass  # the client hung up on us: that is the point
    finally:
        writer.close()


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_peer_answer_fails_the_piece_with_its_reason(case: str, part: PartFile,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    import dfget.piecefetch as pf

    monkeypatch.setattr(pf, "STALL", 0.5)  # no buffer filled for this long: the source stalled
    script, reason = CASES[case]
    t0 = time.monotonic()
    with pytest.raises(PieceFailed) as info:
        await fetch_from(script, part)
    assert info.value.reason == reason, info.value
    assert time.monotonic() - t0 < 5
    assert not [r for r in caplog.records if r.exc_info]  # no traceback anywhere (asyncio included)


async def test_the_good_answer_passes(part: PartFile) -> None:
    assert await fetch_from(sends(OK_HEAD + GOOD), part) == len(GOOD)
    assert await fetch_from(sends(chunked(f"{len(GOOD):x}\r\n".encode() + GOOD + b"\r\n0\r\n\r\n")), part) == len(GOOD)


def test_resume_counts_only_pieces_whose_bytes_re_hash(tmp_path: Path) -> None:
    ps = 1000
    data = os.urandom(4 * ps)
    p = PartFile(tmp_path / "o", TID)
    p.open(len(data))
    try:
        p.write(0, data)
        p.write(2 * ps + 7, b"\xff")  # piece 2 rotted on disk
        ranges = [(n, n * ps, n * ps + ps - 1, digest.of(data[n * ps:(n + 1) * ps])) for n in range(4)]
        ranges[3] = (3, 3 * ps, 4 * ps - 1, None)  # no digest from the supernode yet: not a pass
        ranges[1] = (1, ps, 2 * ps - 1, "")  # an empty digest is never a pass either
        assert recheck(p, ranges, "sha256") == [0]
    finally:
        p.close()


# --- a supernode over this client's rate ---------------------------------------------------
async def test_dfget_waits_out_429_then_goes_on() -> None:
    calls: list[float] = []
    always = False

    async def pull(request: web.Request) -> web.Response:
        calls.append(time.monotonic())
        if len(calls) <= 2 or always:
            return web.json_response({"error": "too_many_requests", "message": "slow down"}, status=429,
                                     headers={"Retry-After": "0"})
        info = wire.TaskInfo(task_id=TID, length=1, piece_size=1, piece_count=1, status="success")
        return web.Response(body=wire.encode(wire.PullReply(state="wait", task=info)),
                            content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/tasks/{tid}/pull", pull)
    runner, port = await start_app(app)
    try:
        async with HttpClient() as session:
            sn = Supernodes(session, (Node("127.0.0.1", port),))
            reply = await sn.pull(TID, wire.PullRequest(cid="ab" * 16, wait=0))
            assert reply.state == "wait" and len(calls) == 3
            always = True  # from now on always 429: after a few waits the error goes up
            calls.clear()
            with pytest.raises(TooManyRequests):
                await sn.pull(TID, wire.PullRequest(cid="ab" * 16, wait=0))
            assert len(calls) == 6
    finally:
        await runner.cleanup()
