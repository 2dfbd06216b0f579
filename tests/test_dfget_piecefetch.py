"""One piece against a source that misbehaves: each failure has its reason, nothing is
accepted unless the supernode's digest matches."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from common import digest, wire
from dfget.output import PartFile
from dfget.piecefetch import FetchLimits, PieceFailed, fetch_piece
from dfget_support import start_app

TID = "cd" * 32
DATA = os.urandom(300_000)
START, END = 100_000, 199_999
GOOD = DATA[START:END + 1]


def make_app(mode: str) -> web.Application:
    async def handler(request: web.Request) -> web.StreamResponse:
        cr = {"Content-Range": f"bytes {START}-{END}/{len(DATA)}"}
        if mode == "good":
            return web.Response(status=206, body=GOOD, headers=cr)
        if mode == "404":
            return web.Response(status=404)
        if mode == "503":
            return web.Response(status=503)
        if mode == "200":
            return web.Response(status=200, body=GOOD)
        if mode == "short":
            return web.Response(status=206, body=GOOD[:-10], headers=cr)
        if mode == "long":
            return web.Response(status=206, body=GOOD + b"xx", headers=cr)
        if mode == "corrupt":
            # flip every bit of the first byte: a fixed replacement byte would be a no-op
            # whenever the random data already starts with it (1 run in 256)
            return web.Response(status=206, body=bytes([GOOD[0] ^ 0xFF]) + GOOD[1:], headers=cr)
        if mode == "wrong_range":
            return web.Response(status=206, body=GOOD,
                                headers={"Content-Range": f"bytes 0-99999/{len(DATA)}"})
        if mode in ("reset", "slow", "chunked_long"):
            resp = web.StreamResponse(status=206, headers=cr)
            if mode != "chunked_long":
                resp.content_length = len(GOOD)
            await resp.prepare(request)
            await resp.write(GOOD[:50_000])
            if mode == "reset":
                assert request.transport is not None
                request.transport.abort()
                return resp
            if mode == "slow":
                await asyncio.sleep(2)
            await resp.write(GOOD[50_000:] + b"extra")
            return resp
        raise AssertionError(mode)

    app = web.Application()
    app.router.add_get("/peer/file/{tid}", handler)
    return app


def assignment(port: int) -> wire.Assignment:
    src = wire.Source(cid="11" * 16, ip="127.0.0.1", port=port, kind="peer")
    return wire.Assignment(piece=1, start=START, end=END, digest=digest.of(GOOD), source=src)


@pytest.mark.parametrize("mode,reason", [
    ("404", "not_found"), ("503", "refused"), ("200", "error"), ("short", "short_body"),
    ("long", "long_body"), ("corrupt", "digest_mismatch"), ("wrong_range", "error"),
    ("reset", "short_body"), ("chunked_long", "long_body"), ("slow", "timeout"),
])
async def test_failures_have_reasons(tmp_path: Path, mode: str, reason: str) -> None:
    runner, port = await start_app(make_app(mode))
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    limits = FetchLimits(minrate=1 << 30)
    if mode == "slow":
        limits = FetchLimits(minrate=1 << 30)
        object.__setattr__(limits, "deadline", lambda n: 0.5)
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(PieceFailed) as info:
                await fetch_piece(session, TID, assignment(port), part, limits)
        assert info.value.reason == reason
    finally:
        part.close()
        await runner.cleanup()


async def test_good_piece_lands_at_its_offset(tmp_path: Path) -> None:
    runner, port = await start_app(make_app("good"))
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    try:
        async with aiohttp.ClientSession() as session:
            n = await fetch_piece(session, TID, assignment(port), part, FetchLimits(minrate=1))
        assert n == len(GOOD)
        assert part.path.read_bytes()[START:END + 1] == GOOD
        assert part.path.stat().st_size == len(DATA)
    finally:
        part.close()
        await runner.cleanup()


async def test_refused_connection(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    try:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(PieceFailed) as info:
                await fetch_piece(session, TID, assignment(1), part, FetchLimits(minrate=1))
        assert info.value.reason == "refused"
    finally:
        part.close()


BIG = os.urandom(3 * (1 << 20) + 12345)  # several receive buffers, a partial last one


@pytest.mark.parametrize("chunked", [False, True])
async def test_big_piece_through_several_buffers(tmp_path: Path, chunked: bool) -> None:
    start, end = 1000, len(BIG) - 1
    body = BIG[start:]

    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(status=206, headers={"Content-Range": f"bytes {start}-{end}/{len(BIG)}"})
        if not chunked:
            resp.content_length = len(body)
        await resp.prepare(request)
        for i in range(0, len(body), 100_000):
            await resp.write(body[i:i + 100_000])
        return resp

    app = web.Application()
    app.router.add_get("/peer/file/{tid}", handler)
    runner, port = await start_app(app)
    part = PartFile(tmp_path / "out", TID)
    part.open(len(BIG))
    src = wire.Source(cid="11" * 16, ip="127.0.0.1", port=port, kind="peer")
    a = wire.Assignment(piece=0, start=start, end=end, digest=digest.of(body), source=src)
    try:
        for _ in range(2):  # the second run reuses pooled buffers
            assert await fetch_piece(None, TID, a, part, FetchLimits(minrate=1)) == len(body)  # type: ignore[arg-type]
            assert part.path.read_bytes()[start:] == body
    finally:
        part.close()
        await runner.cleanup()


@pytest.mark.parametrize("threaded", [True, False])
async def test_unreachable_source_fails_fast_as_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        threaded: bool) -> None:
    import time

    import dfget.piecefetch as pf

    async def never_connects(*args: object, **kw: object) -> None:
        await asyncio.sleep(3600)  # a peer whose SYNs are dropped

    def connect_times_out(host: str, port: int, timeout: float) -> None:
        time.sleep(timeout)  # what create_connection does for such a peer
        raise TimeoutError("timed out")

    monkeypatch.setattr(pf, "threaded", lambda a, limits: threaded)
    monkeypatch.setattr(pf, "open_piece", never_connects)
    monkeypatch.setattr(pf, "_connect", connect_times_out)
    monkeypatch.setattr(pf, "CONNECT_TIMEOUT", 0.2)
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    t0 = time.monotonic()
    try:
        with pytest.raises(PieceFailed) as info:
            await fetch_piece(None, TID, assignment(9), part, FetchLimits(minrate=1))
        assert info.value.reason == "refused"
        assert time.monotonic() - t0 < 3
    finally:
        part.close()


def _quiet_source(sent: asyncio.Event, stop: asyncio.Event, head: int, quiet_tid: str | None = None) -> web.Application:
    """A source that sends the first `head` bytes of the piece, sets `sent`, then nothing
    until `stop` (for every task, or only `quiet_tid`: the others get the whole piece)."""

    async def handler(request: web.Request) -> web.StreamResponse:
        cr = {"Content-Range": f"bytes {START}-{END}/{len(DATA)}"}
        if quiet_tid is not None and request.match_info["tid"] != quiet_tid:
            return web.Response(status=206, body=GOOD, headers=cr)
        resp = web.StreamResponse(status=206, headers=cr)
        resp.content_length = len(GOOD)
        await resp.prepare(request)
        await resp.write(GOOD[:head])
        sent.set()
        await asyncio.wait_for(stop.wait(), 60)  # then silence
        return resp

    app = web.Application()
    app.router.add_get("/peer/file/{tid}", handler)
    return app


async def test_a_cancelled_threaded_fetch_ends_at_once_and_writes_nothing_after(tmp_path: Path) -> None:
    """A piece read by a worker thread (plain HTTP, no rate cap) from a source that went
    quiet mid-body: cancelling the fetch (its deadline, a failover) ends the blocked read
    at once, not after the 30 s stall, and no write lands after it returned."""
    import time

    import dfget.piecefetch as pf

    sent, stop = asyncio.Event(), asyncio.Event()
    runner, port = await start_app(_quiet_source(sent, stop, 40_000))
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    a = assignment(port)
    assert pf.threaded(a, FetchLimits(minrate=1))
    try:
        task = asyncio.create_task(fetch_piece(None, TID, a, part, FetchLimits(minrate=1)))
        await asyncio.wait_for(sent.wait(), 10)
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert time.monotonic() - t0 < 2
        before = part.path.read_bytes()
        await asyncio.sleep(0.3)
        assert part.path.read_bytes() == before  # nothing written after the fetch ended
    finally:
        stop.set()
        part.close()
        await runner.cleanup()


async def test_pieces_beyond_the_workers_go_through_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every worker thread busy (a dfdaemon runs many downloads at once), the next
    piece is fetched on the event loop at once instead of queueing for a thread; a
    cancelled piece gives its worker back."""
    import dfget.piecefetch as pf

    monkeypatch.setattr(pf, "WORKERS", pf._Workers(1))
    slow_tid = "ef" * 32
    sent, stop = asyncio.Event(), asyncio.Event()
    runner, port = await start_app(_quiet_source(sent, stop, 1000, quiet_tid=slow_tid))
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    paths: list[str] = []
    real_threaded, real_loop = pf._fetch_threaded, pf._fetch
    monkeypatch.setattr(pf, "_fetch_threaded", lambda *a, **k: (paths.append("thread"), real_threaded(*a, **k))[1])
    monkeypatch.setattr(pf, "_fetch", lambda *a, **k: (paths.append("loop"), real_loop(*a, **k))[1])
    try:
        held = asyncio.create_task(fetch_piece(None, slow_tid, assignment(port), part, FetchLimits(minrate=1)))
        await asyncio.wait_for(sent.wait(), 10)
        assert pf.WORKERS.busy == 1
        n = await asyncio.wait_for(fetch_piece(None, TID, assignment(port), part, FetchLimits(minrate=1)), 10)
        assert n == len(GOOD) and paths == ["thread", "loop"]
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert pf.WORKERS.busy == 0
    finally:
        stop.set()
        part.close()
        await runner.cleanup()
