"""The peer-facing HTTP of `dfget server`, in-process: range rules, only verified
pieces of known tasks, no paths from the request, upload slots."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from dfget.server.app import build_peer_app
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry

TID = "ab" * 32
PIECE = 1000
LENGTH = 3500  # pieces 0..3, the last one 500 bytes


@pytest.fixture
async def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    data = os.urandom(LENGTH)
    path = tmp_path / "f"
    path.write_bytes(data)
    state = ServerState(ServerConfig(home=tmp_path, max_uploads=2))
    state.table.register(FileEntry(task_id=TID, path=path, length=LENGTH, piece_size=PIECE,
                                   supernodes=[], verified={0, 1, 3}))
    dropped: list[FileEntry] = []
    app = build_peer_app(state, dropped.append)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, state, data, dropped


async def get(client: TestClient, path: str, rng: str | None) -> tuple[int, bytes, dict[str, str]]:
    headers = {"Range": rng} if rng is not None else {}
    async with client.get(path, headers=headers) as resp:
        return resp.status, await resp.read(), dict(resp.headers)


async def test_serves_exact_piece_with_content_length(served) -> None:  # type: ignore[no-untyped-def]
    client, _, data, _ = served
    status, body, headers = await get(client, f"/peer/file/{TID}", "bytes=1000-1999")
    assert status == 206 and body == data[1000:2000]
    assert headers["Content-Length"] == "1000"
    assert headers["Content-Range"] == f"bytes 1000-1999/{LENGTH}"
    status, body, _ = await get(client, f"/peer/file/{TID}", "bytes=3000-3499")
    assert status == 206 and body == data[3000:]


@pytest.mark.parametrize("rng,expected", [
    (None, 400), ("bytes=0-10,20-30", 400), ("items=0-1", 400), ("bytes=900-1100", 400),
    ("bytes=5-2", 400), ("garbage", 400), ("bytes=3500-3600", 416), ("bytes=2000-2999", 404),
])
async def test_range_rules(served, rng: str | None, expected: int) -> None:  # type: ignore[no-untyped-def]
    client, _, _, _ = served
    status, body, _ = await get(client, f"/peer/file/{TID}", rng)
    assert status == expected
    assert b"bytes" not in body[:0]  # body is a JSON error, never file content
    if expected != 206:
        assert len(body) < 200


@pytest.mark.parametrize("path", [
    "/peer/file/..%2f..%2fetc%2fpasswd", "/peer/file/%2e%2e", "/peer/file/" + "cd" * 32,
    "/peer/file/" + "AB" * 32, "/peer/file/%00", "/peer/file//etc/passwd", "/etc/passwd",
    "/peer/file/" + TID + "/../x",
])
async def test_unknown_or_hostile_paths_are_404(served, path: str) -> None:  # type: ignore[no-untyped-def]
    client, _, _, _ = served
    status, body, _ = await get(client, path, "bytes=0-9")
    assert status == 404
    assert b"root:" not in body


async def test_upload_slots_full_gives_503(served) -> None:  # type: ignore[no-untyped-def]
    client, state, _, _ = served
    state.active_uploads = state.config.max_uploads
    status, _, _ = await get(client, f"/peer/file/{TID}", "bytes=0-999")
    assert status == 503
    state.active_uploads = 0
    status, _, _ = await get(client, f"/peer/file/{TID}", "bytes=0-999")
    assert status == 206
    for _ in range(100):  # the handler finishes just after the client has the last byte
        if state.active_uploads == 0:
            break
        await asyncio.sleep(0.01)
    assert state.active_uploads == 0  # the slot was released
    assert state.uploaded_bytes == 1000


async def test_changed_file_is_dropped_and_reported(served, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    client, state, _, dropped = served
    state.table.moved(TID, tmp_path / "f")
    with open(tmp_path / "f", "ab") as f:
        f.write(b"x")  # the user appended to the output: its digests no longer hold
    status, _, _ = await get(client, f"/peer/file/{TID}", "bytes=0-999")
    assert status == 404
    assert [e.task_id for e in dropped] == [TID]


async def test_pieces_marked_later_become_servable(served) -> None:  # type: ignore[no-untyped-def]
    client, state, data, _ = served
    assert (await get(client, f"/peer/file/{TID}", "bytes=2000-2999"))[0] == 404
    state.table.mark(TID, [2], None)
    status, body, _ = await get(client, f"/peer/file/{TID}", "bytes=2000-2999")
    assert status == 206 and body == data[2000:3000]


async def test_ping(served) -> None:  # type: ignore[no-untyped-def]
    client, _, _, _ = served
    async with client.get("/_ping") as resp:
        assert resp.status == 200
    async with client.post(f"/peer/file/{TID}") as resp:
        assert resp.status == 405


_ = (asyncio, web)


# --- a piece request that overtakes its own dfget's news (app.py, CATCH_UP) ----------
C1, C0 = "c1" * 16, "c0" * 16


@pytest.fixture
async def in_progress(tmp_path: Path):  # type: ignore[no-untyped-def]
    data = os.urandom(LENGTH)
    path = tmp_path / "g"
    path.write_bytes(data)
    state = ServerState(ServerConfig(home=tmp_path, max_uploads=4))
    # a download of this process, still running, registered as client C1
    state.table.register(FileEntry(task_id=TID, path=path, length=LENGTH, piece_size=PIECE, supernodes=[],
                                   owner_pid=os.getpid(), clients=[C1], verified={0}))
    app = build_peer_app(state, lambda entry: None)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, state, data


async def _timed_get(client: TestClient, source: str | None) -> tuple[int, float]:
    headers = {"Range": "bytes=2000-2999"}
    if source is not None:
        headers["X-Dragonfly-Source"] = source
    t0 = asyncio.get_running_loop().time()
    async with client.get(f"/peer/file/{TID}", headers=headers) as resp:
        await resp.read()
        return resp.status, asyncio.get_running_loop().time() - t0


async def _mark_later(state: ServerState, delay: float) -> None:
    await asyncio.sleep(delay)
    state.table.mark(TID, [2], None)
    state.table_changed()


async def test_a_piece_of_the_current_download_is_waited_for(in_progress) -> None:  # type: ignore[no-untyped-def]
    client, state, _ = in_progress
    state.started -= 3600  # an old server: only the named source makes it wait
    marker = asyncio.create_task(_mark_later(state, 0.3))
    status, took = await _timed_get(client, C1)
    await marker
    assert status == 206 and took >= 0.25


async def test_a_piece_of_a_replaced_download_is_404_at_once(in_progress) -> None:  # type: ignore[no-untyped-def]
    client, _, _ = in_progress
    status, took = await _timed_get(client, C0)  # a client of an entry this one replaced
    assert status == 404 and took < 1.0


@pytest.mark.parametrize(("age", "waits"), [(0.0, True), (3600.0, False)])
async def test_an_unnamed_source_waits_only_on_a_young_server(in_progress, age: float, waits: bool) -> None:  # type: ignore[no-untyped-def]
    client, state, _ = in_progress
    state.started -= age
    status, took = await _timed_get(client, None)
    assert status == 404
    assert (took >= 1.5) is waits, took
