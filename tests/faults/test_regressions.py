"""Fast regression tests (the supernode app and bench.origin in this process) for bugs
the fault scenarios found; each names the scenario that found it."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import file_bytes
from supernode_support import Api, app_for, peer, settings_for

from bench.origin import OriginServer
from common import wire
from common.errors import BadRequest, Conflict
from dfget.p2p import _without_refused

MIB = 1 << 20


class _Origin:
    """bench.origin in this process (no process start: these tests are about the API)."""

    def __init__(self, server: OriginServer) -> None:
        self.server = server

    def put_random(self, name: str, size: int, seed: int) -> None:
        (self.server.root / name).write_bytes(file_bytes(size, seed))

    def url(self, name: str) -> str:
        return self.server.url(name)


@pytest.fixture
async def origin(tmp_path: Path) -> AsyncIterator[_Origin]:
    root = tmp_path / "files"
    root.mkdir()
    async with OriginServer(root) as server:
        yield _Origin(server)


async def _registered(api: Api, origin, name: str, size: int) -> tuple[tuple[dict[str, object], str], str, str]:  # type: ignore[no-untyped-def]
    """A client registered on a task whose CDN copy is complete: ((its peer, the peer's
    secret), task id, client id)."""
    origin.put_random(name, size, seed=size)
    me = peer()
    reg = await api.register(origin.url(name), peer=me)
    tid, cid = reg["task"]["task_id"], reg["cid"]
    for _ in range(500):
        resp = await api.client.get(f"/api/v1/tasks/{tid}")
        if (await resp.json())["task"]["status"] == "success":
            return (me, reg["peer_secret"]), tid, cid
        await asyncio.sleep(0.02)
    raise AssertionError("the CDN did not finish the file")


@pytest.mark.regression
async def test_registering_again_under_own_cid_releases_its_assignments(api: Api, origin) -> None:  # type: ignore[no-untyped-def]
    # scenario 2: after a supernode restart the client's four in-flight assignments stayed
    # claimed until their deadlines (~94 s), so it got nothing and timed out
    (me, secret), tid, cid = await _registered(api, origin, "r.bin", 24 * MIB)
    first = await api.pull(tid, cid, limit=4)
    assert len(first["assignments"]) == 4
    again = await api.register(origin.url("r.bin"), peer=me, cid=cid, secret=secret)
    assert again["cid"] == cid
    second = await api.pull(tid, cid, limit=4, wait=0)
    assert len(second["assignments"]) == 4, second


@pytest.mark.regression
async def test_have_report_voids_an_assignment_of_that_piece(api: Api, origin) -> None:  # type: ignore[no-untyped-def]
    # scenario 3: a piece assigned while the client already held it (its report was lost
    # with Redis' state) kept a slot until its deadline; `have` now frees it
    _me, tid, cid = await _registered(api, origin, "h.bin", 24 * MIB)
    first = await api.pull(tid, cid, limit=4)
    held = [a["piece"] for a in first["assignments"]][:2]
    await api.report(tid, cid, [{"piece": n, "result": "have"} for n in held])
    second = await api.pull(tid, cid, limit=4, wait=0)
    got = {a["piece"] for a in second["assignments"]}
    assert len(got) == 2 and not got & {a["piece"] for a in first["assignments"]}, second


@pytest.mark.regression
async def test_refused_report_names_its_piece(api: Api, origin) -> None:  # type: ignore[no-untyped-def]
    # scenario 3: one refused report made dfget drop the whole batch (and a refused
    # piggy-backed batch ended P2P): the refusal now says which report it was
    _me, tid, cid = await _registered(api, origin, "n.bin", 8 * MIB)
    body = await api.report(tid, cid, [{"piece": 1, "result": "ok"}], status=409)
    assert body["error"] == "conflict" and body["detail"] == {"piece": 1}


@pytest.mark.regression
def test_dfget_sends_the_other_reports_again_without_the_refused_one() -> None:
    batch = [wire.Report(piece=n, result="have") for n in range(4)]
    rest = _without_refused(batch, BadRequest("piece 2 is not known", detail={"piece": 2}))
    assert [r.piece for r in rest] == [0, 1, 3]
    # no piece named (an older supernode), or one that is not in the batch: drop them all,
    # so a retry always has fewer reports and ends
    assert _without_refused(batch, Conflict("x")) == []
    assert _without_refused(batch, Conflict("x", detail={"piece": 9})) == []


@pytest.mark.regression
async def test_cdn_upload_to_a_dead_client_hides_its_piece_only_briefly(
        api: Api, origin, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    # scenario 6 (after main's super-seeding): a client SIGKILLed with CDN uploads in
    # flight never reports them; their pieces were left out of everyone's ranking until
    # the uploads' deadlines (~94 s for 4 MiB), so a rerun with nothing else to fetch hung
    import supernode.scheduling.dispatch as dispatch

    monkeypatch.setattr(dispatch, "PENDING_GRACE_MS", 2000)  # the next pull comes well within it
    _me, tid, dead = await _registered(api, origin, "g.bin", 8 * MIB)
    assert len((await api.pull(tid, dead, limit=4))["assignments"]) == 2  # and it dies
    other = (await api.register(origin.url("g.bin")))["cid"]
    fresh = await api.pull(tid, other, limit=4, wait=0)
    assert fresh["assignments"] == []  # young uploads: wait for their receiver to share
    await asyncio.sleep(2.1)
    later = await api.pull(tid, other, limit=4, wait=0)
    assert len(later["assignments"]) >= 1, later


class _Http:
    """What Api needs of a test client, over a real socket (see below)."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session, self.base = session, base

    async def post(self, path: str, json: object,
                   headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        return await self.session.post(self.base + path, json=json, headers=headers)

    async def get(self, path: str) -> aiohttp.ClientResponse:
        return await self.session.get(self.base + path)


@pytest.mark.regression
async def test_long_poll_of_a_client_that_went_away_claims_nothing(tmp_path, store_url, origin) -> None:  # type: ignore[no-untyped-def]
    # scenario 6: a SIGKILLed dfget's long-poll went on server-side and, woken by the
    # next event, claimed pieces for its cid; the same client resuming under that cid was
    # then never given them (they stayed in flight until their deadlines). The supernode
    # runs without handler cancellation (aiohttp's default; the test client cancels).
    runner = web.AppRunner(app_for(settings_for(tmp_path / "sn", store_url)), handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with aiohttp.ClientSession() as session:
            api = Api(_Http(session, f"http://127.0.0.1:{port}"))
            _me, tid, a = await _registered(api, origin, "z.bin", 4 * MIB)  # one piece
            assert [x["piece"] for x in (await api.pull(tid, a, limit=4))["assignments"]] == [0]
            b = (await api.register(origin.url("z.bin")))["cid"]
            async with aiohttp.ClientSession() as doomed:
                waiting = asyncio.create_task(doomed.post(
                    f"http://127.0.0.1:{port}/api/v1/tasks/{tid}/pull",
                    json={"cid": b, "limit": 4, "wait": 10}))
                await asyncio.sleep(0.3)  # b long-polls: the only piece is on its way to a
                waiting.cancel()  # b dies: its connection closes
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
            await asyncio.sleep(0.1)
            await api.report(tid, a, [{"piece": 0, "result": "ok"}])  # wakes b's long-poll
            await asyncio.sleep(0.3)
            again = await api.pull(tid, b, limit=4, wait=0)  # b, back under its cid
            assert [x["piece"] for x in again["assignments"]] == [0], again
    finally:
        await runner.cleanup()


@pytest.mark.regression
async def test_cancelled_piece_whose_write_failed_leaves_no_unretrieved_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # scenario 5 (soak): two pieces hit the full disk at once; the first ended P2P, the
    # second was cancelled mid-write and asyncio printed "Task exception was never
    # retrieved" with a traceback on dfget's stderr
    import gc
    import threading

    from dfget_support import start_app

    import dfget.piecefetch as pf
    from common import digest
    from common.errors import LocalDiskError
    from dfget.output import PartFile

    body = b"x" * (3 << 20)
    writing = threading.Event()

    def full_disk(*_args: object) -> None:
        writing.set()
        time.sleep(0.3)  # in the worker thread, as a slow failing write would
        raise LocalDiskError("No space left on device")

    async def piece(request: web.Request) -> web.Response:
        return web.Response(status=206, body=body, headers={"Content-Range": f"bytes 0-{len(body) - 1}/{len(body)}"})

    app = web.Application()
    app.router.add_get("/peer/file/{tid}", piece)
    runner, port = await start_app(app)
    monkeypatch.setattr(pf, "_write_and_hash", full_disk)
    loop = asyncio.get_running_loop()
    unretrieved: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _loop, ctx: unretrieved.append(ctx))
    part = PartFile(tmp_path / "out", "ab" * 32)
    part.open(len(body))
    src = wire.Source(cid="33" * 16, ip="127.0.0.1", port=port, kind="peer")
    a = wire.Assignment(piece=0, start=0, end=len(body) - 1, digest=digest.of(body), source=src)
    try:
        task = asyncio.create_task(pf.fetch_piece(None, "ab" * 32, a, part, pf.FetchLimits(1)))  # type: ignore[arg-type]
        await asyncio.to_thread(writing.wait, 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        del task
        gc.collect()
        await asyncio.sleep(0)
        assert not unretrieved, unretrieved
    finally:
        loop.set_exception_handler(None)
        part.close()
        await runner.cleanup()
