"""A request that cannot be done in time is answered 503 busy, in time for its client
(supernode/api/guard.py, time budgets), and dfget waits that out instead of taking the
supernode for dead and going to the origin."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aiohttp import web

from common import wire
from common.httperrors import error_middleware
from supernode.api import guard


def _app(delays: dict[str, float]) -> web.Application:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(delays[guard.route_of(request)])
        return web.json_response({"ok": True})

    app = web.Application(middlewares=[error_middleware(logger=logging.getLogger("test")),
                                       guard.guard_middleware])
    app[guard.GUARD] = guard.Guard(guard.Limits(register_rate=0, pull_rate=0))
    app.router.add_post(guard.REGISTER_ROUTE, slow)
    app.router.add_post(guard.PULL_ROUTE, slow)
    app.router.add_post("/api/v1/peers/heartbeat", slow)
    app.router.add_get("/api/v1/tasks", slow)
    return app


@pytest.fixture
def budgets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(guard, "REGISTER_BUDGET", 0.3)
    monkeypatch.setattr(guard, "CALL_BUDGET", 0.2)
    monkeypatch.setattr(guard, "PULL_BUDGET", 0.2)


async def test_a_late_request_is_answered_busy_with_retry_after(aiohttp_client, budgets) -> None:  # type: ignore[no-untyped-def]
    delays = {guard.REGISTER_ROUTE: 5.0, guard.PULL_ROUTE: 5.0, "/api/v1/peers/heartbeat": 5.0,
              "/api/v1/tasks": 0.5}
    app = _app(delays)
    client = await aiohttp_client(app)
    loop = asyncio.get_running_loop()
    for path, body, budget in ((guard.REGISTER_ROUTE, b"{}", 0.3),
                               ("/api/v1/peers/heartbeat", b"{}", 0.2),
                               ("/api/v1/tasks/" + "a" * 32 + "/pull", b'{"cid": "' + b"b" * 32 + b'", "wait": 0.3}',
                                0.5)):
        t0 = loop.time()
        r = await client.post(path, data=body, headers={"Content-Type": wire.JSON_TYPE})
        took = loop.time() - t0
        assert r.status == 503, (path, r.status)
        assert (await r.json())["error"] == "busy" and r.headers["Retry-After"] == "1"
        assert budget <= took < budget + 2.0, (path, took)
    assert app[guard.GUARD].refused["late"] == 3
    assert app[guard.GUARD].active == 0
    # an admin listing has no budget: it takes what it takes
    r = await client.get("/api/v1/tasks")
    assert r.status == 200


async def test_a_request_within_its_budget_is_untouched(aiohttp_client, budgets) -> None:  # type: ignore[no-untyped-def]
    app = _app({guard.REGISTER_ROUTE: 0.05, guard.PULL_ROUTE: 0.05, "/api/v1/peers/heartbeat": 0.05,
                "/api/v1/tasks": 0.0})
    client = await aiohttp_client(app)
    r = await client.post(guard.REGISTER_ROUTE, data=b"{}", headers={"Content-Type": wire.JSON_TYPE})
    assert r.status == 200 and app[guard.GUARD].refused["late"] == 0


def test_pull_budget_follows_the_pulls_own_wait() -> None:
    pull = guard._Pull("a" * 32, 12.0)
    assert guard.budget_for("POST", guard.PULL_ROUTE, pull) == 12.0 + guard.PULL_BUDGET
    assert guard.budget_for("POST", guard.PULL_ROUTE, None) == wire.MAX_PULL_WAIT + guard.PULL_BUDGET
    assert guard.budget_for("POST", guard.PULL_ROUTE, guard._Pull("a" * 32, float("inf"))) == (
        wire.MAX_PULL_WAIT + guard.PULL_BUDGET)
    assert guard.budget_for("POST", guard.PULL_ROUTE, guard._Pull("a" * 32)) == wire.DEFAULT_PULL_WAIT + guard.PULL_BUDGET
    assert guard.budget_for("POST", guard.REGISTER_ROUTE, None) == guard.REGISTER_BUDGET
    assert guard.budget_for("POST", "/api/v1/tasks/{task_id}/report", None) == guard.CALL_BUDGET
    assert guard.budget_for("GET", "/metrics", None) is None
    assert guard.budget_for("GET", guard.REGISTER_ROUTE, None) is None  # the task listing
