"""Small HA pieces, fast and in-process: store URLs, the takeover's run planning, a
failing-over client's stale assignments, and a CDN that is not alive any more."""

from __future__ import annotations

import asyncio

import pytest
from ha_support import exercise_store
from supernode_support import Api, app_for, peer, settings_for

from supernode.store.connection import _split_multi_host, check_url
from supernode.cdn.takeover import runs as _runs

MIB = 1 << 20


def test_multi_host_urls() -> None:
    assert _split_multi_host("redis+sentinel://:s3cr%40t@a:1,[::1]:2,b/svc/4", 26379) == (
        {"password": "s3cr@t"}, [("a", 1), ("::1", 2), ("b", 26379)], ["svc", "4"])
    assert _split_multi_host("redis+cluster://u:p@h", 6379) == (
        {"username": "u", "password": "p"}, [("h", 6379)], [])


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/3", "rediss://h:1/0", "unix:///run/redis.sock",
    "redis+sentinel://h1:26379,h2:26380/mymaster", "redis+sentinel://:pw@h/mymaster/2",
    "redis+cluster://h1:7000,h2:7001", "redis+cluster://[::1]:7000",
])
def test_good_store_urls(url: str) -> None:
    check_url(url)


@pytest.mark.parametrize(("url", "why"), [
    ("foo://x", "unsupported store URL scheme"),
    ("redis+sentinel://h:1", "needs a service name"),
    ("redis+sentinel://h:1/svc/x", "bad db number"),
    ("redis+sentinel://h:1/svc/1/2", "needs a service name"),
    ("redis+cluster://h:1/0", "no path"),
    ("redis+cluster://h:99999", "bad host:port"),
    ("redis+cluster://h:1,,h:2", "bad host:port"),
])
def test_bad_store_urls(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_url(url)


async def test_every_script_runs_on_the_embedded_store() -> None:
    seen = await exercise_store(None)  # fakeredis: the same scripts, the same answers
    assert seen["meta"].status == "fetching"


def test_runs() -> None:
    assert _runs([]) == []
    assert _runs([7, 1, 2, 3]) == [(1, 4), (7, 8)]
    assert _runs([0, 2, 4, 5]) == [(0, 1), (2, 3), (4, 6)]


async def _fetched(api: Api, tid: str) -> None:
    for _ in range(500):
        resp = await api.client.get(f"/api/v1/tasks/{tid}")
        if (await resp.json())["task"]["status"] == "success":
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the CDN fetch did not finish")


@pytest.fixture
async def api(aiohttp_client, tmp_path, redis_url) -> Api:  # type: ignore[no-untyped-def]
    assert redis_url, "used only by tests marked redis"
    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", redis_url)))
    return Api(client)


@pytest.mark.redis
@pytest.mark.regression
async def test_reregistering_client_gets_its_in_flight_pieces_again(api: Api, origin) -> None:
    """A dfget failing over re-registers with its cid; what it had in flight under the old
    registration is void. Those entries used to stay until their deadlines (~94 s for a
    4 MiB piece) and hid the pieces from that client."""
    origin.put_random("r.bin", 8 * MIB, seed=31)
    p = peer()
    reg = await api.register(origin.url("r.bin"), peer=p)
    tid, cid = reg["task"]["task_id"], reg["cid"]
    await _fetched(api, tid)
    first = await api.pull(tid, cid, limit=2)
    held = {a["piece"] for a in first["assignments"]}
    assert len(held) == 2
    assert (await api.pull(tid, cid, limit=2, wait=0))["assignments"] == []  # both pieces are in flight
    again = await api.register(origin.url("r.bin"), peer=p, cid=cid, secret=reg["peer_secret"])
    assert again["cid"] == cid
    res = await api.pull(tid, cid, limit=2, wait=0)
    assert {a["piece"] for a in res["assignments"]} == held


@pytest.mark.redis
@pytest.mark.regression
async def test_a_cdn_that_is_not_alive_is_no_source_and_no_503(api: Api, origin, redis_url) -> None:
    """A task whose CDN supernode has no liveness record (dead) used to answer every pull
    with 503 (the address lookup failed), which sent clients hopping over every
    supernode; now that CDN is simply not a source, and this supernode seeds the task."""
    import redis

    from supernode.store import keys

    origin.put_random("d.bin", 4 * MIB, seed=32)
    reg = await api.register(origin.url("d.bin"))
    tid, cid = reg["task"]["task_id"], reg["cid"]
    await _fetched(api, tid)
    r = redis.Redis.from_url(redis_url)
    try:
        r.hset(keys.meta(tid), "cdn", "f" * 32)  # a supernode that never announced itself
        res = await api.pull(tid, cid, limit=1, wait=5)
        # the dead CDN is skipped; this supernode seeds the task and hands the piece out
        assert res["state"] == "continue", res
        assert res["assignments"][0]["source"]["cid"] == reg["supernode_id"]
        assert r.hget(keys.meta(tid), "cdn").decode() == reg["supernode_id"]
    finally:
        r.close()


@pytest.mark.redis
@pytest.mark.regression
async def test_a_late_renewal_takes_back_a_lease_nobody_took_and_stops_if_someone_did(
    aiohttp_client, tmp_path, redis_url, origin_factory
) -> None:  # type: ignore[no-untyped-def]
    """A renewal that finds the lease expired (the loop stalled past the TTL) used to stop
    a healthy fetch although nobody else had taken it; then the task waited for another
    takeover. Now it takes the lease back; only another owner stops it."""
    import redis

    from supernode.store import keys
    from supernode.state import STATE

    assert redis_url, "used only by tests marked redis"
    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", redis_url, lease_ttl=1.0)))
    api, st = Api(client), client.server.app[STATE]
    origin = origin_factory(rate=1 * MIB)
    origin.put_random("l.bin", 8 * MIB, seed=33)
    tid = (await api.register(origin.url("l.bin")))["task"]["task_id"]
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.get(keys.lease(tid)) == st.sn_id.encode() and tid in st.cdn.running
        r.delete(keys.lease(tid))  # as if it had expired before the renewal came
        for _ in range(150):  # the next renewal (every ttl/3) takes it back; 3 s at most
            if r.get(keys.lease(tid)) == st.sn_id.encode():
                break
            await asyncio.sleep(0.02)
        assert r.get(keys.lease(tid)) == st.sn_id.encode() and tid in st.cdn.running
        r.set(keys.lease(tid), "f" * 32)  # someone else owns the fetch now
        for _ in range(250):
            if tid not in st.cdn.running:
                break
            await asyncio.sleep(0.02)
        assert tid not in st.cdn.running
        assert origin.stats()["by_file"]["l.bin"]["requests"] == 1
    finally:
        r.delete(keys.lease(tid))
        r.close()
