"""Property-based fuzzing of the peer server's network side (issue 5, "Bad input").

Requests are built around the one a downloader sends (GET /peer/file/{task} with one
Range inside one verified piece) and mutated: ranges of every shape (edges, suffixes,
open ends, several ranges, several Range headers, junk, other digits), bad task ids and
paths, other methods, conditional and encoding headers, bodies on a GET. The server runs
with the options `dfget server` gives it (dfget.server.app.runner_kwargs) on 127.0.0.1.
Every answer must hold:

(Framing headers such as Transfer-Encoding are left to the raw-socket tests in
test_hostile_slow.py: set by hand they make the HTTP client itself send broken requests.)

- the status is exactly what the protocol model says (docs/api.md, download port) for a
  well-formed request, and never 5xx but 503 busy;
- a 206 carries exactly the asked bytes of a verified piece, with Content-Length equal
  to the bytes sent, the right Content-Range and no Content-Encoding;
- every error answer carries the JSON error body;
- nothing is logged at ERROR or with a traceback, and no request changes the file table
  (verified pieces, paths) or leaves an upload slot taken.
"""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from conftest import LogTrap
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from test_fuzz_api import BAD_IDS, HEADER_TEXT, METHODS, SMALL_BINARY, TAILS
from test_hostile_peer import expected
from yarl import URL

from dfget.server.app import build_peer_app, runner_kwargs
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry

PEER_EXAMPLES = int(os.environ.get("FUZZ_PEER_EXAMPLES", "1350"))  # examples of 3-4 requests each
PEER_REQUESTS = 3 * PEER_EXAMPLES  # sent at least (asserted): 4,050 by default
PIECE = 1000
FILES = {"ab" * 32: (3500, {0, 1, 3}, False), "cd" * 32: (2000, {0, 1}, True)}  # length, verified, complete


@dataclass
class World:
    state: ServerState
    runner: web.AppRunner
    session: aiohttp.ClientSession
    base: str
    data: dict[str, bytes]
    dropped: list[FileEntry]
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)

    def table(self) -> list[tuple[Any, ...]]:
        return sorted((e.task_id, str(e.path), e.length, e.piece_size, sorted(e.verified), e.complete, e.stamp)
                      for e in self.state.table.files.values())


async def build(tmp: Path) -> World:
    state = ServerState(ServerConfig(home=tmp, max_uploads=64))
    data = {}
    for tid, (length, verified, complete) in FILES.items():
        path = tmp / tid[:4]
        data[tid] = os.urandom(length)
        path.write_bytes(data[tid])
        for ext in (".gz", ".br"):  # a plain file server would send these for Accept-Encoding
            Path(str(path) + ext).write_bytes(b"NOT-REGISTERED")
        state.table.register(FileEntry(task_id=tid, path=path, length=length, piece_size=PIECE,
                                       supernodes=[], verified=set(verified)))
        if complete:
            state.table.moved(tid, path)
    dropped: list[FileEntry] = []
    runner = web.AppRunner(build_peer_app(state, dropped.append), access_log=None,
                           **runner_kwargs(state))  # type: ignore[arg-type]
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=20))
    return World(state, runner, session, f"http://127.0.0.1:{runner.addresses[0][1]}", data, dropped)


async def teardown(w: World) -> None:
    await w.session.close()
    await w.runner.cleanup()


# --- strategies (built once) -----------------------------------------------------------------
EDGE = st.sampled_from([0, 1, 9, 999, 1000, 1001, 1999, 2000, 2999, 3000, 3499, 3500, 3501, 10**18, 10**19 - 1,
                        10**19, 10**20])
NUM = st.integers(0, 4000) | EDGE
RANGE = st.one_of(
    st.tuples(NUM, NUM).map(lambda ab: f"bytes={ab[0]}-{ab[1]}"),
    st.tuples(NUM, st.integers(0, 999)).map(lambda ab: f"bytes={ab[0]}-{ab[0] + ab[1]}"),  # often inside a piece
    NUM.map(lambda n: f"bytes=-{n}"), NUM.map(lambda n: f"bytes={n}-"),
    st.lists(st.tuples(NUM, NUM), min_size=2, max_size=3).map(
        lambda rs: "bytes=" + ",".join(f"{a}-{b}" for a, b in rs)),
    st.sampled_from(["bytes=", "bytes=-", "bytes=0-9 ", " bytes=0-9", "BYTES=0-9", "bytes = 0-9", "bytes=0x1-9",
                     "bytes=+1-9", "bytes=1-9;x", "bytes=\u0660-\u0669", "bytes=\u00b2-9", "items=0-9", "bytes=-0",
                     "bytes=00000000000000000000000-1", "bytes=0-9,"]),
    HEADER_TEXT,
)
RANGES = st.one_of(st.lists(RANGE, min_size=1, max_size=1), st.lists(RANGE, min_size=0, max_size=3))
EXTRA = st.lists(st.sampled_from([
    ("Accept-Encoding", "gzip, br"), ("If-Range", '"x"'), ("If-None-Match", "*"), ("If-Match", '"x"'),
    ("If-Modified-Since", "Mon, 01 Jan 2091 00:00:00 GMT"), ("If-Unmodified-Since", "Mon, 01 Jan 1990 00:00:00 GMT"),
    ("Connection", "close"), ("X-Junk", "\u00e9"),
    ("Content-Type", "application/json"), ("Host", "evil.example"), ("Cookie", "a=b"),
]), max_size=2, unique_by=lambda kv: kv[0])  # twice the same singleton header: the parser's own 400
TIDS = st.sampled_from(sorted(FILES))
PATH_WHAT = st.sampled_from(["exact"] * 7 + ["bad_id", "tail", "other"])
OTHER_PATHS = st.sampled_from(["/", "/_ping", "/peer", "/peer/file", "/peer/file/", "/files", "/shutdown",
                               "/limits", "/info", "/peer/file/..%2f..%2fetc%2fpasswd", "//peer/file"])
METHOD_WHAT = st.sampled_from(["GET"] * 8) | METHODS
BODY = st.none() | st.none() | st.none() | SMALL_BINARY


class PeerReq:
    def __init__(self, method: str, path: str, tid: str | None, ranges: list[str],
                 extra: list[tuple[str, str]], body: bytes | None) -> None:
        self.method, self.path, self.tid, self.ranges, self.extra, self.body = method, path, tid, ranges, extra, body

    def __repr__(self) -> str:
        return f"PeerReq({self.method} {self.path} ranges={self.ranges} extra={self.extra} body={self.body!r})"


@st.composite
def peer_requests(draw: st.DrawFn) -> PeerReq:
    tid = draw(TIDS)
    what = draw(PATH_WHAT)
    exact: str | None = tid
    if what == "exact":
        path = f"/peer/file/{tid}"
    elif what == "bad_id":
        path, exact = f"/peer/file/{draw(BAD_IDS)}", None
    elif what == "tail":
        path = f"/peer/file/{tid}{draw(TAILS)}"
        if path.split("?")[0].split("#")[0] != f"/peer/file/{tid}":  # a query or fragment still names it
            exact = None
    else:
        path, exact = draw(OTHER_PATHS), None
    return PeerReq(draw(METHOD_WHAT), path, exact, draw(RANGES), draw(EXTRA), draw(BODY))


# --- the oracle --------------------------------------------------------------------------------
async def send(w: World, req: PeerReq) -> tuple[int, Any, bytes]:
    headers: CIMultiDict[str] = CIMultiDict()
    for r in req.ranges:
        headers.add("Range", r)
    for k, v in req.extra:
        headers.add(k, v)
    async with w.session.request(req.method, URL(w.base + req.path, encoded=True), headers=headers,
                                 data=req.body, skip_auto_headers=["Accept-Encoding", "Content-Type"]) as r:
        return r.status, r.headers, await r.read()


async def check_one(w: World, req: PeerReq, trap: LogTrap) -> None:
    before = w.table()
    status, headers, body = await send(w, req)
    w.sent += 1
    w.statuses[status] = w.statuses.get(status, 0) + 1
    assert status < 500 or status == 503, (status, body[:200])
    if req.method != "HEAD":
        assert int(headers["Content-Length"]) == len(body)  # always what was sent
    if status >= 400 and req.method != "HEAD":
        err = json.loads(body)
        assert isinstance(err.get("error"), str) and isinstance(err.get("message"), str), err
        if status == 503:
            assert err["error"] == "busy"
    plain = req.method == "GET" and req.tid is not None and req.body is None
    if plain:
        assert req.tid is not None
        length, verified, _ = FILES[req.tid]
        want = expected(req.ranges[0] if len(req.ranges) == 1 else None, length, PIECE, verified)
        assert status == want, (status, want, body[:200])
    if status == 206:
        assert req.tid is not None and len(req.ranges) == 1
        data = w.data[req.tid]
        first, _, last = headers["Content-Range"].removeprefix("bytes ").partition("/")[0].partition("-")
        start, end = int(first), int(last)
        assert headers["Content-Range"] == f"bytes {start}-{end}/{len(data)}"
        assert body == data[start:end + 1] and start // PIECE == end // PIECE
        assert start // PIECE in FILES[req.tid][1]
        assert "Content-Encoding" not in headers
    assert w.table() == before and not w.dropped and not w.state.stop.is_set()
    assert not trap.bad, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in trap.bad]


async def check_all(w: World, reqs: list[PeerReq], trap: LogTrap) -> None:
    for req in reqs:
        await check_one(w, req, trap)


def test_fuzz_peer_server(tmp_path: Path, log_trap: LogTrap) -> None:
    runner = asyncio.Runner()
    w = runner.run(build(tmp_path))
    try:
        @settings(max_examples=PEER_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(reqs=st.lists(peer_requests(), min_size=3, max_size=4))
        def one(reqs: list[PeerReq]) -> None:
            runner.run(check_all(w, reqs, log_trap))

        one()

        async def slots_free() -> int:
            for _ in range(100):
                if w.state.active_uploads == 0:
                    break
                await asyncio.sleep(0.01)
            return w.state.active_uploads

        assert runner.run(slots_free()) == 0
    finally:
        runner.run(teardown(w))
        runner.close()
    assert w.sent >= PEER_REQUESTS, w.sent
    assert w.statuses.get(206, 0) > w.sent // 10 and w.statuses.get(400, 0) > w.sent // 10, w.statuses
