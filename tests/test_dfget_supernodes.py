"""dfget's supernode client: a supernode that answers 503 (alive, overloaded) is asked
again with backoff; one that does not answer is given up on at once."""

from __future__ import annotations

import pytest
from aiohttp import web

from common import wire
from common.errors import SupernodeUnavailable
from common.taskid import new_id
from conftest import free_port
from dfget import supernodes as sn_mod
from dfget.config import Node
from dfget.httpclient import HttpClient
from dfget.supernodes import Supernodes

TID = "a" * 64
REQ = wire.RegisterRequest(url="http://127.0.0.1:1/f")


def _reply() -> bytes:
    return wire.encode(wire.RegisterReply(cid=new_id(), supernode_id=new_id(), task=wire.TaskInfo(
        task_id=TID, length=1, piece_size=4 << 20, piece_count=1, status="success")))


async def _serve(aiohttp_server, busy_answers: int, code: str = "store_unavailable"):  # type: ignore[no-untyped-def]
    calls = []

    async def register(request: web.Request) -> web.Response:
        calls.append(1)
        if len(calls) <= busy_answers:
            return web.json_response({"error": code, "message": "store unavailable: busy"}, status=503)
        return web.Response(body=_reply(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/api/v1/tasks", register)
    server = await aiohttp_server(app, host="127.0.0.1")
    return server, calls


async def test_a_busy_supernode_is_asked_again_not_abandoned(aiohttp_server, monkeypatch) -> None:
    monkeypatch.setattr(sn_mod, "BUSY_DELAY_MAX", 0.5)
    server, calls = await _serve(aiohttp_server, busy_answers=3)
    async with HttpClient() as session:
        reply = await Supernodes(session, (Node("127.0.0.1", server.port),)).register(REQ)
    assert reply.task.task_id == TID and len(calls) == 4


async def test_busy_retries_stop_at_the_budget(aiohttp_server, monkeypatch) -> None:
    monkeypatch.setattr(sn_mod, "BUSY_BUDGET", 1.0)
    server, calls = await _serve(aiohttp_server, busy_answers=1000)
    async with HttpClient() as session:
        with pytest.raises(SupernodeUnavailable, match="store unavailable"):
            await Supernodes(session, (Node("127.0.0.1", server.port),)).register(REQ)
    assert 2 <= len(calls) <= 3  # 0.5 s backoff, then the next would pass the budget


async def test_a_dead_supernode_is_not_retried(aiohttp_server) -> None:
    server, calls = await _serve(aiohttp_server, busy_answers=0)
    dead = Node("127.0.0.1", free_port())
    async with HttpClient() as session:
        with pytest.raises(SupernodeUnavailable):
            await Supernodes(session, (dead,)).register(REQ)
        # with a live one after it, the dead one is skipped without delay
        reply = await Supernodes(session, (dead, Node("127.0.0.1", server.port))).register(REQ)
    assert reply.task.task_id == TID and len(calls) == 1
