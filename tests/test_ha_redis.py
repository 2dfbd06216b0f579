"""The supernode on real Redis topologies of our own: a 3-master Redis Cluster and a
master behind Sentinel (both on free loopback ports, started once per session), plus a
plain redis-server watched with MONITOR to prove every script stays in its task's slot.

In cluster mode every key a Lua script touches must hash to the slot of its KEYS[1];
Redis itself only refuses keys of *another node*, so the slot rule is checked from what
the scripts really ran (MONITOR + COMMAND GETKEYS), and the cluster runs them for real.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import redis
from conftest import file_bytes
from dfget_support import stop_server
from ha_support import (
    Monitor,
    RedisCluster,
    RedisSentinel,
    exercise_store,
    finish,
    metric,
    reap,
    redis_cluster,
    redis_sentinel,
    redis_standalone,
    start_dfget,
)
from redis.crc import key_slot

from supernode.store import keys, scripts

MIB = 1 << 20


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    with redis_cluster(tmp_path_factory.mktemp("cluster")) as c:
        yield c


@pytest.fixture
def fresh_cluster(cluster: RedisCluster) -> RedisCluster:
    cluster.flushall()
    return cluster


@pytest.fixture(scope="session")
def sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    with redis_sentinel(tmp_path_factory.mktemp("sentinel")) as s:
        yield s


@pytest.fixture(scope="session")
def plain_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with redis_standalone(tmp_path_factory.mktemp("plain")) as port:
        yield port


def _keys_of(r: redis.Redis, args: list[bytes]) -> list[str]:
    try:
        return [k.decode() if isinstance(k, bytes) else str(k) for k in r.command_getkeys(*args)]
    except redis.ResponseError:
        return []  # a command without keys (PUBLISH)


async def test_every_script_touches_only_its_tasks_slot(plain_redis: int) -> None:
    r = redis.Redis(port=plain_redis)
    r.flushall()
    mon = Monitor(plain_redis)
    try:
        seen = await exercise_store(f"redis://127.0.0.1:{plain_redis}/0")
        commands = mon.drain()
    finally:
        mon.close()
    tag = "{" + seen["task_id"] + "}"
    shas = {hashlib.sha1(src.encode()).hexdigest(): name for name, src in scripts.ALL.items()}
    ran = {shas[a[1].decode()] for kind, a in commands if kind == "client" and a[0].upper() in (b"EVALSHA", b"EVAL")
           if a[1].decode() in shas}
    ran |= {next(n for n, s in scripts.ALL.items() if s.encode() == a[1])
            for kind, a in commands if kind == "client" and a[0].upper() == b"EVAL"}
    assert ran == set(scripts.ALL)  # each script ran at least once
    in_scripts = [a for kind, a in commands if kind == "lua"]
    assert len(in_scripts) > 50
    for args in in_scripts:
        for key in _keys_of(r, args):
            assert tag in key, f"script command {args[:3]} touches {key!r} outside the task's slot"
    # multi-key commands sent by the client itself: only the ones redis-py splits by slot
    cross = {a[0].upper() for kind, a in commands if kind == "client" and a[0].upper() not in (b"EVALSHA", b"EVAL")
             and len({key_slot(k.encode()) for k in _keys_of(r, a)}) > 1}
    assert cross <= {b"DEL"}, cross
    r.close()


async def test_every_script_and_multi_key_command_runs_on_a_3_master_cluster(fresh_cluster: RedisCluster) -> None:
    seen = await exercise_store(fresh_cluster.url)
    assert seen["meta"].status == "fetching" and seen["meta"].piece_count == 4
    # the global keys really are spread: not a single-node accident
    slots = {fresh_cluster.node_of(k) for k in (keys.TASK_INDEX, keys.host("a" * 32), keys.meta("d" * 63 + "1"))}
    assert len(slots) >= 2


async def test_sentinel_url_runs_every_script(sentinel: RedisSentinel) -> None:
    sentinel.flushall()
    seen = await exercise_store(sentinel.url(db=3))
    assert seen["meta"].status == "fetching"
    r3, r0 = redis.Redis(port=sentinel.master_port, db=3), redis.Redis(port=sentinel.master_port, db=0)
    assert r3.keys("df:sn:*") and not r0.keys("df:*")  # written to the db the URL names
    r3.close()
    r0.close()


def _two_nodes_apart(cluster: RedisCluster, origin, name: str) -> str:  # type: ignore[no-untyped-def]
    """A URL whose task lives on another master than the one the event hubs subscribe
    on (the owner of the pattern's slot), so an event has to cross the cluster bus."""
    from common.taskid import task_id

    hub_node = cluster.node_of(keys.EVENT_PATTERN)
    for i in range(200):
        url = origin.url(name, v=i)
        if cluster.node_of(keys.meta(task_id(url))) != hub_node:
            return url  # type: ignore[no-any-return]
    raise AssertionError("no task id on another node in 200 tries")


@pytest.mark.regression
async def test_long_poll_on_one_supernode_wakes_on_a_piece_published_by_another(
    fresh_cluster: RedisCluster, supernode, origin_factory
) -> None:  # type: ignore[no-untyped-def]
    """Across supernodes and across cluster nodes. (The event hub subscribed before the
    cluster client had loaded its slot map: every subscription failed until some other
    command loaded it, and start-up waited 5 s for the hub.)"""
    from common.taskid import new_id

    origin = origin_factory(rate=2 * MIB)  # piece 0 (4 MiB) lands after about 2 s
    origin.put_random("w.bin", 8 * MIB, seed=21)
    url = _two_nodes_apart(fresh_cluster, origin, "w.bin")
    a = supernode(redis_url=fresh_cluster.url)
    b = supernode(redis_url=fresh_cluster.url)
    rc = redis.RedisCluster(host="127.0.0.1", port=fresh_cluster.ports[0])

    async with aiohttp.ClientSession() as s:
        async def register(sn) -> dict:  # type: ignore[no-untyped-def,type-arg]
            body = {"url": url, "peer": {"peer_id": new_id(), "ip": "127.0.0.1", "port": 15000}}
            async with s.post(f"{sn.url}/api/v1/tasks", json=body) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()  # type: ignore[no-any-return]

        reg_a = await register(a)  # a starts the fetch
        tid = reg_a["task"]["task_id"]
        reg_b = await register(b)
        assert rc.get(keys.lease(tid)) == reg_a["supernode_id"].encode()
        assert not rc.hlen(keys.digests(tid))  # nothing yet: b's pull has to wait

        async def pull() -> tuple[dict, float]:  # type: ignore[type-arg]
            async with s.post(f"{b.url}/api/v1/tasks/{tid}/pull", json={"cid": reg_b["cid"], "wait": 20}) as resp:
                assert resp.status == 200
                return await resp.json(), time.monotonic()  # type: ignore[no-any-return]

        waiter = asyncio.create_task(pull())
        t0 = not_yet = time.monotonic()  # the last moment piece 0 was seen missing
        while time.monotonic() - t0 < 25 and not waiter.done():
            t = time.monotonic()
            if not rc.hlen(keys.digests(tid)):
                not_yet = t
            await asyncio.sleep(0.005)
        res, answered = await waiter
    rc.close()
    assert res["state"] == "continue" and res["assignments"][0]["piece"] == 0, res
    assert answered - t0 > 0.5  # it did wait for the piece (about 2 s at the origin's rate)
    wake = answered - not_yet  # an upper bound of the wake-up delay
    for sn in (a, b):
        assert "subscription lost" not in (sn.home / "supernode.log").read_text()
    assert wake < 1.0, f"the pull woke {wake:.3f}s after the piece appeared"
    print(f"cluster: pull on supernode b woke {wake * 1000:.0f} ms after supernode a published piece 0")


def _registrations(base_url: str) -> float:
    """Task registrations a supernode answered with 200."""
    return metric(base_url, "supernode_requests_total", endpoint="/api/v1/tasks", method="POST", status="200")


async def test_cluster_download_three_supernodes_one_killed_mid_download(
    fresh_cluster: RedisCluster, supernode, origin, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """3 supernodes on the cluster, 6 dfget spread over them and rate-limited so they are
    mid-download when one non-CDN supernode is SIGKILLed. Its clients move on with their
    pieces; the origin serves the file exactly once."""
    from common.taskid import task_id

    size = 16 * MIB
    origin.put_random("c.bin", size, seed=22)
    url = origin.url("c.bin")
    tid = task_id(url)
    sns = [supernode(redis_url=fresh_cluster.url) for _ in range(3)]
    rc = redis.RedisCluster(host="127.0.0.1", port=fresh_cluster.ports[1])
    homes = [tmp_path / f"h{i}" for i in range(6)]
    dls: list = []  # type: ignore[type-arg]
    t0 = time.monotonic()
    try:
        for i in range(6):
            order = sns[i % 3:] + sns[:i % 3]
            dls.append(await start_dfget(url, homes[i], tmp_path / f"o{i}",
                                         [f"127.0.0.1:{s.port}" for s in order], "-s", "2MB"))

        def registered() -> bool:
            return rc.hlen(keys.peers(tid)) >= 6 and rc.hget(keys.meta(tid), "cdn") is not None

        end = time.monotonic() + 60
        while not registered():
            assert time.monotonic() < end, "clients did not register"
            await asyncio.sleep(0.02)
        cdn_id = rc.hget(keys.meta(tid), "cdn").decode()
        # kill a supernode that is not the CDN and has clients (a client whose first choice
        # answered slowly under load registers with the next one): their bytes must not
        # come again, and they must move on
        others = [s for s in sns if (s.home / "supernode.id").read_text().strip() != cdn_id]
        victim = max(others, key=lambda s: _registrations(s.url))
        assert _registrations(victim.url) >= 1, "no client registered with a supernode other than the CDN's"
        assert all(not d.out.exists() for d in dls)  # nobody finished yet
        victim.runner.kill()
        killed = time.monotonic() - t0
        for d in dls:
            await finish(d, 90)
    finally:
        await reap(dls)
        await asyncio.gather(*(stop_server(h) for h in homes))
        rc.close()
    elapsed = time.monotonic() - t0
    want = file_bytes(size, seed=22)
    moved = 0
    for d in dls:
        assert d.code == 0, d.stderr[-3000:]
        assert d.out.read_bytes() == want
        assert d.report["back_to_source"] is None
        # kept its pieces across the failover: every byte arrived exactly once
        assert d.report["bytes_from_peers"] + d.report["bytes_from_supernode"] == size, d.report
        assert d.report["supernode"] != victim.url, d.report  # nobody finished on the dead one
        if d.report["failovers"]:
            moved += 1
    # the victim's clients moved on
    assert moved >= 1
    st = origin.stats()["by_file"]["c.bin"]
    assert (st["requests"], st["bytes"]) == (1, size)
    alive = [s for s in sns if s is not victim]
    assert all(metric(s.url, "supernode_assignments_total") > 0 for s in alive)
    print(f"cluster: 3 supernodes x 6 clients, one supernode killed at {killed:.1f}s; origin "
          f"{st['bytes']} bytes (1.00x); done in {elapsed:.1f}s")


async def test_sentinel_download_through_two_supernodes(
    sentinel: RedisSentinel, supernode, origin, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sentinel.flushall()
    size = 6 * MIB + 3
    origin.put_random("s.bin", size, seed=23)
    sns = [supernode(redis_url=sentinel.url(db=2)) for _ in range(2)]
    homes = [tmp_path / "h0", tmp_path / "h1"]
    dls: list = []  # type: ignore[type-arg]
    try:
        for i in range(2):
            dls.append(await start_dfget(origin.url("s.bin"), homes[i], tmp_path / f"o{i}",
                                         [f"127.0.0.1:{sns[i].port}"]))
        for d in dls:
            await finish(d, 60)
    finally:
        await reap(dls)
        await asyncio.gather(*(stop_server(h) for h in homes))
    for d in dls:
        assert d.code == 0, d.stderr[-3000:]
        assert d.out.read_bytes() == file_bytes(size, seed=23)
    assert origin.stats()["by_file"]["s.bin"]["bytes"] == size
    r = redis.Redis(port=sentinel.master_port, db=2)
    assert r.exists(keys.meta(dls[0].report["task_id"]))  # the state is on the sentinel's master, db 2
    r.close()
