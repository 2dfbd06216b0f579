"""Hostile requests to the piece servers (docs/hostile-input.md, "Peer server"): the
peer server of `dfget server` and the supernode's seed speak the same protocol and get
the same cases; plus the peer server's local control API. Real sockets throughout
(aiohttp test servers bind 127.0.0.1); raw sockets where the exact bytes matter."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from test_hostile_api import World, make_world

from common.ranges import RangeSyntaxError, RangeUnsatisfiable, parse_range
from dfget.server.app import build_peer_app
from dfget.server.control import build_control_app
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry

TID = "ab" * 32
PIECE = 1000
LENGTH = 3500  # pieces 0..3, the last one 500 bytes; 2 is not verified
MIB = 1 << 20


async def raw_get(port: int, path: str, headers: list[tuple[str, str]] = (),  # type: ignore[assignment]
                  method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection; the answer read to EOF, byte for byte."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers)
        writer.write(head.encode("utf-8", "surrogateescape") + b"\r\n")
        raw = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    top, _, body = raw.partition(b"\r\n\r\n")
    lines = top.decode("latin-1").split("\r\n")
    hdrs = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), hdrs, body


def expected(header: str | None, length: int, piece: int, held: set[int]) -> int:
    """What the protocol says (docs/api.md, download port) for one Range header."""
    if header is None:
        return 400
    try:
        rng = parse_range(header, length)
    except RangeSyntaxError:
        return 400
    except RangeUnsatisfiable:
        return 416
    if rng.start // piece != rng.end // piece:
        return 400
    return 206 if rng.start // piece in held else 404


def range_cases(length: int, piece: int, unheld: int) -> list[str | None]:
    p = piece
    return [
        None, f"bytes=0-{p - 1}", f"bytes={p}-{2 * p - 1}", f"bytes={p + 5}-{p + 9}", f"bytes=-{length - 3 * p}",
        f"bytes={unheld * p}-{unheld * p + 9}", "bytes=", "bytes=-", "bytes=a-b", "bytes=0-1,2-3", "items=0-1",
        "BYTES=0-1", "bytes=5-2", f"bytes=0-{p}", "bytes=0-", f"bytes=-{length}", f"bytes={length}-{length + 5}",
        "bytes=-0", "bytes=" + "9" * 20 + "-", "bytes=" + "9" * 19 + "-", "bytes=0-9;x", "bytes=0x0-9",
        "bytes=+0-9", "bytes=0-9,", "bytes=\u0660-\u0669", "bytes=0-9 junk", "bytes = 0-9", "bytes=00000000000000000000-9",
        f"bytes={p - 1}-{p}", f"bytes={length - 1}-{length - 1}", f"bytes={length - 1}-" + "9" * 19,
    ]


async def check_ranges(port: int, path: str, data: bytes, piece: int, held: set[int], unheld: int) -> None:
    for header in range_cases(len(data), piece, unheld):
        status, hdrs, body = await raw_get(port, path, [("Range", header)] if header is not None else [])
        assert status == expected(header, len(data), piece, held), (header, status, body[:200])
        assert int(hdrs["content-length"]) == len(body), header  # always what was sent
        if status == 206:
            rng = parse_range(header, len(data))  # type: ignore[arg-type]
            assert body == data[rng.start:rng.end + 1], header
            assert hdrs["content-range"] == f"bytes {rng.start}-{rng.end}/{len(data)}"
        else:
            err = json.loads(body)
            assert set(err) == {"error", "message"} and err["error"] in (
                "bad_request", "not_found", "range_not_satisfiable"), (header, err)
    # two Range headers are two ranges
    status, _, body = await raw_get(port, path, [("Range", f"bytes=0-{piece - 1}"), ("Range", "bytes=0-9")])
    assert status == 400 and json.loads(body)["error"] == "bad_request"


CONDITIONAL = [[("Accept-Encoding", "gzip, br")], [("Accept-Encoding", "br")], [("If-Range", '"bogus"')],
               [("If-Range", "Mon, 01 Jan 1990 00:00:00 GMT")], [("If-None-Match", "*")], [("If-Match", '"x"')],
               [("If-Modified-Since", "Mon, 01 Jan 2091 00:00:00 GMT")],
               [("If-Unmodified-Since", "Mon, 01 Jan 1990 00:00:00 GMT")]]


async def check_only_the_range(port: int, path: str, data: bytes, file: Path) -> None:
    """Headers that make a plain file server send something else: a `.gz`/`.br` file
    next to ours (never registered), the whole file (unverified pieces too), 304/412."""
    for ext in (".gz", ".br"):
        Path(str(file) + ext).write_bytes(b"NOT-REGISTERED" * 100)
    for extra in CONDITIONAL:
        status, hdrs, body = await raw_get(port, path, [("Range", "bytes=0-9"), *extra])
        assert (status, body) == (206, data[:10]), (extra, status, body[:40])
        assert "content-encoding" not in hdrs and hdrs["content-length"] == "10", extra


HOSTILE_PATHS = [
    "/peer/file/..%2f..%2fetc%2fpasswd", "/peer/file/%2e%2e", "/peer/file/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "/peer/file/" + "cd" * 32, "/peer/file/" + "AB" * 32, "/peer/file/%00", "/peer/file/" + "ab" * 31 + "a%00",
    "/peer/file//etc/passwd", "/etc/passwd", "/peer/file/" + TID + "/../x", "/peer/file/" + TID + "%2f..",
    "/peer/file/" + TID[:-1] + "%C3%A9", "/peer/file/..\\..\\windows", "/peer/file/~root", "/peer/file",
    "/peer/file/" + "a" * 5000, "/peer/../peer/file/" + "cd" * 32,
]


async def check_paths(port: int) -> None:
    for path in HOSTILE_PATHS:
        status, hdrs, body = await raw_get(port, path, [("Range", "bytes=0-9")])
        assert status in (400, 404), (path, status)
        assert b"root:" not in body and json.loads(body)["error"] in ("not_found", "bad_request"), path
        assert int(hdrs["content-length"]) == len(body)


# --- the peer server ----------------------------------------------------------------------
@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[tuple[TestClient, ServerState, bytes]]:
    data = os.urandom(LENGTH)
    path = tmp_path / "f"
    path.write_bytes(data)
    state = ServerState(ServerConfig(home=tmp_path, max_uploads=2))
    state.table.register(FileEntry(task_id=TID, path=path, length=LENGTH, piece_size=PIECE,
                                   supernodes=[], verified={0, 1, 3}))
    async with TestClient(TestServer(build_peer_app(state, lambda e: None), host="127.0.0.1")) as client:
        yield client, state, data


async def test_peer_server_range_rules_and_exact_content_length(peer: Any) -> None:
    client, _, data = peer
    await check_ranges(client.port, f"/peer/file/{TID}", data, PIECE, {0, 1, 3}, unheld=2)


async def test_peer_server_never_builds_a_path_from_the_request(peer: Any) -> None:
    client, _, _ = peer
    await check_paths(client.port)


@pytest.mark.regression
async def test_peer_server_sends_the_range_whatever_the_other_headers_say(peer: Any) -> None:
    client, state, data = peer
    await check_only_the_range(client.port, f"/peer/file/{TID}", data, state.table.get(TID).path)


async def test_control_operations_are_not_on_the_network_port(peer: Any) -> None:
    client, state, _ = peer
    before = repr(state.table.files)
    for method in ("GET", "POST", "PUT", "DELETE"):
        for path in ("/files", f"/files/{TID}", f"/files/{TID}/verified", f"/files/{TID}/moved",
                     "/limits", "/shutdown", "/info", f"/peer/file/{TID}"):
            if method == "GET" and path.startswith("/peer/"):
                continue
            status, _, body = await raw_get(client.port, path, method=method)
            assert status in (404, 405), (method, path)
            assert json.loads(body)["error"] in ("not_found", "bad_request")
    assert not state.stop.is_set() and repr(state.table.files) == before


async def test_slow_reader_is_cut_off_and_frees_its_slot(tmp_path: Path) -> None:
    size = 24 * MIB  # more than the socket buffers hold
    path = tmp_path / "big"
    path.touch()
    os.truncate(path, size)  # sparse
    state = ServerState(ServerConfig(home=tmp_path, max_uploads=1, upload_timeout=2.0))
    state.table.register(FileEntry(task_id=TID, path=path, length=size, piece_size=size,
                                   supernodes=[], verified={0}))
    async with TestClient(TestServer(build_peer_app(state, lambda e: None), host="127.0.0.1")) as client:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", client.port))
        sock.sendall(f"GET /peer/file/{TID} HTTP/1.1\r\nHost: x\r\nRange: bytes=0-{size - 1}\r\n\r\n".encode())
        try:
            for _ in range(500):
                if state.active_uploads == 1:
                    break
                await asyncio.sleep(0.01)
            assert state.active_uploads == 1  # the never-reading client holds the one slot
            status, _, body = await raw_get(client.port, f"/peer/file/{TID}", [("Range", "bytes=0-9")])
            assert status == 503 and json.loads(body)["error"] == "busy"  # the one slot is taken
            for _ in range(800):  # the never-reading client is cut off after upload_timeout
                if state.active_uploads == 0:
                    break
                await asyncio.sleep(0.01)
            assert state.active_uploads == 0
            status, _, body = await raw_get(client.port, f"/peer/file/{TID}", [("Range", "bytes=0-9")])
            assert status == 206 and body == b"\0" * 10
        finally:
            sock.close()


# --- the seed (the supernode's download port) ------------------------------------------------
@pytest.fixture
async def seed(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[World]:
    # the range rules, with piece tokens off; tokens have their own tests (test_piece_auth)
    async for w in make_world(aiohttp_client, tmp_path, piece_auth=False):
        await w.setup_task()
        yield w


async def test_seed_range_rules_and_exact_content_length(seed: World) -> None:
    data = (seed.origin.root / "f.bin").read_bytes()
    ps = 4 * MIB
    await check_ranges(seed.st.download_port, f"/peer/file/{seed.tid}", data, ps, {0, 1, 2}, unheld=0)


@pytest.mark.regression
async def test_seed_sends_the_range_whatever_the_other_headers_say(seed: World) -> None:
    data = (seed.origin.root / "f.bin").read_bytes()
    await check_only_the_range(seed.st.download_port, f"/peer/file/{seed.tid}", data,
                               seed.st.cache.data_path(seed.tid))


async def test_seed_never_builds_a_path_from_the_request(seed: World) -> None:
    await check_paths(seed.st.download_port)
    status, _, body = await raw_get(seed.st.download_port, f"/peer/file/{seed.tid}", [("Range", "bytes=0-9")],
                                    method="POST")
    assert status == 405 and json.loads(body)["error"] == "bad_request"


async def test_seed_without_a_free_slot_or_draining_answers_503(seed: World) -> None:
    port, path = seed.st.download_port, f"/peer/file/{seed.tid}"
    s = seed.st.seed
    s.active = s.slots
    try:
        status, _, body = await raw_get(port, path, [("Range", "bytes=0-9")])
        assert status == 503 and json.loads(body)["error"] == "busy"
    finally:
        s.active = 0
    s.draining = True
    status, _, _ = await raw_get(port, path, [("Range", "bytes=0-9")])
    assert status == 503
    s.draining = False
    assert (await raw_get(port, path, [("Range", "bytes=0-9")]))[0] == 206


# --- the control API (Unix socket in production; its handlers here over TCP) -----------------
@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[tuple[TestClient, ServerState, list[Any]]]:
    (tmp_path / "f").write_bytes(b"x" * LENGTH)
    state = ServerState(ServerConfig(home=tmp_path))
    state.table.register(FileEntry(task_id=TID, path=tmp_path / "f", length=LENGTH, piece_size=PIECE,
                                   supernodes=["http://127.0.0.1:8002"], verified={0}))
    notified: list[Any] = []

    async def notify(entries: list[FileEntry]) -> None:
        notified.extend(entries)

    async with TestClient(TestServer(build_control_app(state, notify), host="127.0.0.1")) as client:
        yield client, state, notified


GOOD_FILE = {"task_id": "cd" * 32, "path": "/tmp/x", "length": 10, "piece_size": 4}


async def test_control_api_rejects_malformed_bodies_and_changes_nothing(control: Any, tmp_path: Path) -> None:
    client, state, notified = control
    before = (repr(state.table.files), state.throttle.bucket.rate, state.known_supernodes.copy())
    bad: list[tuple[str, str, object]] = [
        ("POST", "/files", {}), ("POST", "/files", {**GOOD_FILE, "task_id": "../x"}),
        ("POST", "/files", {**GOOD_FILE, "path": "etc/passwd"}), ("POST", "/files", {**GOOD_FILE, "path": "/a\x00b"}),
        ("POST", "/files", {**GOOD_FILE, "piece_size": 0}), ("POST", "/files", {**GOOD_FILE, "length": "10"}),
        ("POST", "/files", {**GOOD_FILE, "supernodes": ["file:///etc/passwd"]}),
        ("POST", "/files", {**GOOD_FILE, "supernodes": ["http://a:1"] * 65}),
        ("POST", "/files", {**GOOD_FILE, "owner_pid": "1"}), ("POST", "/files", "not an object"),
        ("POST", f"/files/{TID}/verified", {"pieces": [-1]}), ("POST", f"/files/{TID}/verified", {"pieces": [2**31]}),
        ("POST", f"/files/{TID}/verified", {"pieces": "0"}), ("POST", f"/files/{TID}/verified", {}),
        ("POST", f"/files/{TID}/moved", {"path": "relative"}), ("POST", "/limits", {"totallimit": -1}),
        ("POST", "/limits", {"totallimit": "1"}), ("POST", "/limits", {"totallimit": 1.5}),
    ]
    for method, path, body in bad:
        resp = await client.request(method, path, data=json.dumps(body))
        assert resp.status == 400, (path, body, resp.status)
        assert (await resp.json())["error"] == "bad_request"
    for method, path, body in [("POST", "/files/..%2f..%2fx/verified", {"pieces": [0]}),
                               ("POST", "/files/" + "cd" * 32 + "/verified", {"pieces": [0]}),
                               ("POST", "/files/" + "cd" * 32 + "/moved", {"path": "/tmp/x"}),
                               ("DELETE", "/files/" + "cd" * 32, None), ("DELETE", "/files/%2e%2e", None)]:
        resp = await client.request(method, path, data=json.dumps(body) if body is not None else None)
        assert resp.status == 404 and (await resp.json())["error"] == "not_found", path
    for raw in (b"{", b"\xff\xfe", b"[" * 100_000, b'{"a":' * 10_000):
        resp = await client.post("/files", data=raw)
        assert resp.status == 400 and (await resp.json())["error"] == "bad_request"
    assert (repr(state.table.files), state.throttle.bucket.rate, state.known_supernodes) == before
    assert not notified and not state.stop.is_set()
