"""The supernode's possession challenges (supernode/pop/challenger.py) in-process, on
the real supernode app (its store, CDN cache and signing key) with a real origin
process, against peer servers on loopback: the real peer app (honest), and fakes that
answer garbage, answer late, or replay an old answer. Each is registered with the
supernode as a peer claiming every piece."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from conftest import file_bytes
from supernode_support import Api, app_for, download_all, peer, settings_for

from common import pop
from common.taskid import new_id
from common.wire import PieceKey
from dfget.server.app import build_peer_app
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry
from supernode.app import STATE
from supernode.pop.challenger import Challenger, PopSettings

MIB = 1 << 20
SIZE = 4 * MIB + 123_457  # two pieces: 4 MiB and a short one


@dataclass
class Swarm:
    api: Api
    st: Any
    tid: str
    data: bytes
    keys: list[PieceKey]
    tmp: Path
    servers: list[TestServer] = field(default_factory=list)

    async def join(self, app: web.Application, peer_id: str | None = None) -> tuple[str, str]:
        """A peer server at `app`, registered as a peer claiming every piece: (cid, peer id)."""
        server = TestServer(app, host="127.0.0.1")
        await server.start_server()
        self.servers.append(server)
        p = peer(port=server.port)
        if peer_id:
            p["peer_id"] = peer_id
        reg = await self.api.register(self.url, peer=p)
        cid = reg["cid"]
        await self.api.report(self.tid, cid, [{"piece": n, "result": "have"} for n in range(2)])
        return cid, p["peer_id"]

    url: str = ""

    def challenger(self, *, own_copy: bool = True, timeout: float = 2.0, max_failures: int = 3) -> Challenger:
        """own_copy=False: a supernode without the CDN copy (it asks for whole pieces)."""
        st = self.st
        return Challenger(st.repo, st.cache, st.keyring.signer, st.metrics, st.sn_id if own_copy else new_id(),
                          PopSettings(0, timeout, max_failures, 64 << 10), rng=random.Random(5))


@pytest.fixture
async def swarm(aiohttp_client, tmp_path: Path, origin) -> AsyncIterator[Swarm]:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, pop_interval=0)))
    api = Api(client)
    origin.put_random("p.bin", SIZE, seed=11)
    reg = await api.register(origin.url("p.bin"))
    tid = reg["task"]["task_id"]
    st = client.app[STATE]
    for _ in range(200):
        meta = await st.repo.get_meta(tid)
        if meta is not None and meta.status == "success":
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the CDN did not finish")
    s = Swarm(api, st, tid, file_bytes(SIZE, seed=11), [PieceKey(**k) for k in reg["keys"]], tmp_path)
    s.url = origin.url("p.bin")
    try:
        yield s
    finally:
        for server in s.servers:
            await server.close()


def honest_app(s: Swarm, peer_id: str, name: str = "honest") -> tuple[web.Application, Path]:
    path = s.tmp / name
    path.write_bytes(s.data)
    state = ServerState(ServerConfig(home=s.tmp), peer_id=peer_id)
    state.keys.add(s.keys)
    state.table.register(FileEntry(task_id=s.tid, path=path, length=SIZE, piece_size=4 * MIB, supernodes=[],
                                   verified={0, 1}))
    return build_peer_app(state, lambda e: None), path


@dataclass
class Fake:
    """A peer server that claims pieces: answers garbage, late, or an old answer again."""

    data: bytes
    how: str
    delay: float = 3.0
    piece_requests: int = 0
    first: bytes | None = None

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/peer/pop/{task_id}", self.answer)
        app.router.add_get("/peer/file/{task_id}", self.piece)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        ch, _body, _sig = pop.parse(request.headers.get(pop.HEADER))
        if self.how == "slow":
            await asyncio.sleep(self.delay)
        if self.how == "replay" and self.first is not None:
            return web.Response(body=self.first, content_type="application/octet-stream"
                                if ch.mode == pop.PIECE else "application/json")
        real = self.data[ch.start:ch.end + 1]
        if ch.mode == pop.PIECE:
            body = real if self.how in ("slow", "replay") else os.urandom(ch.length)
            self.first = body
            return web.Response(body=body, content_type="application/octet-stream")
        answer = pop.answer(ch.nonce, real) if self.how in ("slow", "replay") else "00" * 32
        self.first = json.dumps({"answer": answer}).encode()
        return web.Response(body=self.first, content_type="application/json")

    async def piece(self, request: web.Request) -> web.Response:
        self.piece_requests += 1
        return web.Response(status=206, body=os.urandom(16))


async def _held(s: Swarm, cid: str) -> list[int]:
    return (await s.st.repo.held_by(s.tid, cid)).members(2)


def _count(s: Swarm, result: str) -> float:
    return s.st.metrics.pop_results.labels(result)._value.get()  # type: ignore[no-any-return]


@pytest.mark.parametrize("own_copy", [True, False], ids=["range-hash", "whole-piece"])
async def test_an_honest_peer_passes(swarm: Swarm, own_copy: bool) -> None:
    peer_id = new_id()
    app, _ = honest_app(swarm, peer_id)
    cid, _ = await swarm.join(app, peer_id)
    ch = swarm.challenger(own_copy=own_copy)
    await ch.open()
    try:
        for _ in range(4):
            v = await ch.challenge_task(swarm.tid, cid)
            assert v is not None and v.result == "passed", v
    finally:
        await ch.close()
    assert await _held(swarm, cid) == [0, 1]
    assert _count(swarm, "passed") == 4 and _count(swarm, "failed") == 0
    assert swarm.st.metrics.pop_sent.labels("hash" if own_copy else "piece")._value.get() == 4
    assert len(ch.outstanding) == 0


async def test_our_own_rotten_copy_does_not_fail_an_honest_peer(swarm: Swarm) -> None:
    """The CDN copy no longer hashes to the digest: the piece is asked for whole instead."""
    peer_id = new_id()
    app, _ = honest_app(swarm, peer_id)
    cid, _ = await swarm.join(app, peer_id)
    path = swarm.st.cache.data_path(swarm.tid)
    path.write_bytes(bytes(len(swarm.data)))
    ch = swarm.challenger(own_copy=True)
    await ch.open()
    try:
        for _ in range(3):
            v = await ch.challenge_task(swarm.tid, cid)
            assert v is not None and v.result == "passed", v
    finally:
        await ch.close()
    assert swarm.st.metrics.pop_sent.labels("piece")._value.get() == 3
    assert await _held(swarm, cid) == [0, 1]


@pytest.mark.parametrize("own_copy", [True, False], ids=["range-hash", "whole-piece"])
async def test_a_peer_answering_garbage_loses_the_piece_then_the_task(swarm: Swarm, own_copy: bool,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    fake = Fake(swarm.data, "garbage")
    liar, _ = await swarm.join(fake.app())
    ch = swarm.challenger(own_copy=own_copy, max_failures=3)
    await ch.open()
    try:
        v = await ch.challenge_task(swarm.tid, liar)
        assert v is not None and v.result == "failed"
        assert len(await _held(swarm, liar)) == 1  # the piece challenged is gone, the other not yet
        assert liar not in await swarm.st.repo.bad_sources(swarm.tid)
        v = await ch.challenge_task(swarm.tid, liar)
        assert v is not None and v.result == "failed"
        assert await _held(swarm, liar) == []
        # nothing left to challenge it about: a third failure needs a claim again
        assert await ch.challenge_task(swarm.tid, liar) is None
        await swarm.api.report(swarm.tid, liar, [{"piece": 0, "result": "have"}])
        v = await ch.challenge_task(swarm.tid, liar)
        assert v is not None and v.result == "failed"
    finally:
        await ch.close()
    assert liar in await swarm.st.repo.bad_sources(swarm.tid)
    assert swarm.st.metrics.pop_dropped.labels("task")._value.get() == 1
    assert any("failed a possession challenge" in m and "dropped as a source" in m for m in caplog.messages)
    # another client gets the whole file, never from the liar
    reg = await swarm.api.register(swarm.url, peer=peer())
    assert await download_all(swarm.api, swarm.tid, reg["cid"], SIZE) == swarm.data
    assert fake.piece_requests == 0


async def test_a_peer_answering_late_fails_as_timed_out(swarm: Swarm) -> None:
    fake = Fake(swarm.data, "slow", delay=3.0)
    slow, _ = await swarm.join(fake.app())
    ch = swarm.challenger(timeout=0.5)
    await ch.open()
    try:
        t0 = time.monotonic()
        v = await ch.challenge_task(swarm.tid, slow)
        assert time.monotonic() - t0 < 2.5
    finally:
        await ch.close()
    assert v is not None and v.result == "timeout"
    assert len(await _held(swarm, slow)) == 1
    assert _count(swarm, "timeout") == 1


async def test_an_old_answer_replayed_fails(swarm: Swarm) -> None:
    fake = Fake(swarm.data, "replay")
    cid, _ = await swarm.join(fake.app())
    ch = swarm.challenger()
    await ch.open()
    try:
        v = await ch.challenge_task(swarm.tid, cid)
        assert v is not None and v.result == "passed"  # its first answer is honest
        v = await ch.challenge_task(swarm.tid, cid)
    finally:
        await ch.close()
    assert v is not None and v.result == "failed"


async def test_a_peer_whose_file_changed_on_disk_fails(swarm: Swarm) -> None:
    peer_id = new_id()
    app, path = honest_app(swarm, peer_id, "corrupt")
    cid, _ = await swarm.join(app, peer_id)
    with path.open("r+b") as f:  # truncated after it reported its pieces
        f.truncate(100)
    ch = swarm.challenger()
    await ch.open()
    try:
        v = await ch.challenge_task(swarm.tid, cid)
    finally:
        await ch.close()
    assert v is not None and v.result == "failed" and "404" in v.why


@pytest.mark.parametrize("own_copy", [True, False], ids=["range-hash", "whole-piece"])
async def test_a_peer_whose_bytes_rotted_unnoticed_fails(swarm: Swarm, own_copy: bool) -> None:
    """Same size, the peer server sees nothing wrong: only the answer gives it away."""
    peer_id = new_id()
    app, path = honest_app(swarm, peer_id, "rotten")
    cid, _ = await swarm.join(app, peer_id)
    path.write_bytes(bytes(b ^ 0x55 for b in swarm.data))
    ch = swarm.challenger(own_copy=own_copy)
    await ch.open()
    try:
        v = await ch.challenge_task(swarm.tid, cid)
    finally:
        await ch.close()
    assert v is not None and v.result == "failed" and v.why in ("wrong answer", "wrong piece bytes")
    assert len(await _held(swarm, cid)) == 1


async def test_a_challenge_relayed_to_another_peer_is_refused(swarm: Swarm) -> None:
    """A liar cannot borrow an honest peer's answer: the challenge names the liar."""
    honest_id = new_id()
    app, _ = honest_app(swarm, honest_id)
    await swarm.join(app, honest_id)
    relay_to = swarm.servers[-1].port

    async def relay(request: web.Request) -> web.Response:
        import aiohttp

        async with aiohttp.ClientSession() as s:
            async with s.post(f"http://127.0.0.1:{relay_to}{request.path}",
                              headers={pop.HEADER: request.headers[pop.HEADER]}) as r:
                return web.Response(status=r.status, body=await r.read(), content_type=r.content_type)

    relay_app = web.Application()
    relay_app.router.add_post("/peer/pop/{task_id}", relay)
    liar, _ = await swarm.join(relay_app)
    ch = swarm.challenger()
    await ch.open()
    try:
        v = await ch.challenge_task(swarm.tid, liar)
    finally:
        await ch.close()
    assert v is not None and v.result == "failed" and "403" in v.why


async def test_pop_interval_0_sends_no_challenge(swarm: Swarm) -> None:
    """The swarm's supernode runs with --pop-interval 0: a liar is never asked."""
    fake = Fake(swarm.data, "garbage")
    liar, _ = await swarm.join(fake.app())
    await asyncio.sleep(1.0)
    assert fake.first is None
    assert sum(swarm.st.metrics.pop_sent.labels(m)._value.get() for m in ("hash", "piece")) == 0
    assert await _held(swarm, liar) == [0, 1]


async def test_no_piece_auth_turns_pop_off_and_says_so(aiohttp_client, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    """Peers get no keys without piece tokens: challenges could not be verified, and
    every honest peer would be dropped."""
    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, piece_auth=False,
                                                       pop_interval=0.05)))
    await asyncio.sleep(0.3)
    assert any("proof of possession is off" in m for m in caplog.messages)
    assert client.app[STATE].settings.piece_auth is False
