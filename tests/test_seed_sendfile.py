"""The seed sends pieces with os.sendfile also under uvloop, the supernode's loop, where
`loop.sendfile` is not implemented and aiohttp would read the file in a thread and
write it through the transport instead (a second copy of every byte)."""

from __future__ import annotations

import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from supernode.cdn.throttle import Throttle
from conftest import free_port
from supernode.cdn.cache import PieceCache
from supernode.cdn.seed import Seed

uvloop = pytest.importorskip("uvloop")
TID = "cd" * 32
PIECE = 1 << 20


def _serve_and_fetch(tmp_path: Path, ranges: list[tuple[int, int]]) -> tuple[list[tuple[int, bytes]], bytes]:
    data = os.urandom(3 * PIECE + 123)
    cache = PieceCache(tmp_path)
    entry = cache.create(TID, "sha256")
    entry.length, entry.piece_size = len(data), PIECE
    entry.digests = {n: "x" for n in range(4)}
    cache.data_path(TID).write_bytes(data)
    seed = Seed(cache, slots=4, throttle=Throttle(0))

    async def main() -> list[tuple[int, bytes]]:
        runner = web.AppRunner(seed.app())
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        out = []
        try:
            async with aiohttp.ClientSession() as s:  # one kept-alive connection for all
                for a, b in ranges:
                    async with s.get(f"http://127.0.0.1:{port}/peer/file/{TID}",
                                     headers={"Range": f"bytes={a}-{b}"}) as r:
                        body = await r.read()
                        assert r.headers["Content-Range"] == f"bytes {a}-{b}/{len(data)}"
                        out.append((r.status, body))
        finally:
            await runner.cleanup()
        return out

    return uvloop.run(main()), data


def test_pieces_go_out_with_sendfile_under_uvloop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fallback(*args: object, **kw: object) -> None:
        raise AssertionError("aiohttp's read-and-write fallback was used instead of sendfile")

    monkeypatch.setattr(web.FileResponse, "_sendfile_fallback", no_fallback)
    sent: list[int] = []
    real = os.sendfile

    def counting(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        n = real(out_fd, in_fd, offset, count)
        sent.append(n)
        return n

    monkeypatch.setattr(os, "sendfile", counting)
    ranges = [(0, PIECE - 1), (PIECE, PIECE + 99), (3 * PIECE, 3 * PIECE + 122), (5, 5)]
    got, data = _serve_and_fetch(tmp_path, ranges)
    assert got == [(206, data[a:b + 1]) for a, b in ranges]
    assert sum(sent) == sum(b - a + 1 for a, b in ranges)
