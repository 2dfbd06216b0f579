"""Hostile input to the supernode API (docs/hostile-input.md, "Supernode API"): bad ids,
piece numbers and bodies in JSON and msgpack, reports by the wrong client, oversized,
split and chunked bodies, floods. Every rejection is a 4xx with the JSON error body and
leaves the store exactly as it was (compared key by key)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from supernode.store import keys
from aiohttp.test_utils import TestClient
from conftest import file_bytes
from supernode_support import Api, app_for, peer, settings_for

from bench.origin import OriginServer
from common.ratelimit import KeyedLimiter, TokenBucket
from common.taskid import new_id
from supernode.state import STATE

MIB = 1 << 20
JSON = {"Content-Type": "application/json"}
MSGPACK = {"Content-Type": "application/msgpack"}


async def store_snapshot(redis: Any) -> dict[bytes, tuple[str, object]]:
    """Every key with its type and value (TTLs left out: they tick)."""
    out: dict[bytes, tuple[str, object]] = {}
    async for key in redis.scan_iter(count=1000):
        if key == keys.PIECE_KEYS.encode() or key.startswith(keys.supernode("").encode()):
            continue  # rewritten on a timer by the supernode itself (liveness, token key)
        kind = (await redis.type(key)).decode()
        value: object
        if kind == "string":
            value = await redis.get(key)
        elif kind == "hash":
            value = await redis.hgetall(key)
        elif kind == "set":
            value = frozenset(await redis.smembers(key))
        elif kind == "zset":
            value = tuple(await redis.zrange(key, 0, -1, withscores=True))
        elif kind == "list":
            value = tuple(await redis.lrange(key, 0, -1))
        else:
            continue  # expired between SCAN and TYPE
        out[key] = (kind, value)
    return out


async def assert_error(resp: Any, *statuses: int) -> dict[str, Any]:
    """A 4xx (one of `statuses`) with the documented error body, JSON or msgpack."""
    raw = await resp.read()
    assert resp.status in statuses, (resp.status, raw[:300])
    body = msgpack.unpackb(raw) if resp.content_type == "application/msgpack" else json.loads(raw)
    assert isinstance(body, dict) and isinstance(body.get("error"), str) and isinstance(body.get("message"), str), body
    return body


class World:
    """One in-process supernode (embedded store) and one in-process origin; a task
    fully fetched and one client holding one assignment."""

    def __init__(self, client: TestClient, origin: OriginServer) -> None:
        self.client = client
        self.api = Api(client)
        self.origin = origin
        self.st = client.app[STATE]
        self.tid = ""
        self.cid = ""
        self.assigned: dict[str, Any] = {}

    async def snapshot(self) -> dict[bytes, tuple[str, object]]:
        return await store_snapshot(self.st.store.client)

    async def settled(self, tid: str) -> dict[str, Any]:
        """The task once its CDN fetch is over (nothing changes the store behind our back)."""
        for _ in range(500):
            task = (await (await self.client.get(f"/api/v1/tasks/{tid}")).json())["task"]
            if task["status"] in ("success", "failed") and tid not in self.st.cdn.running:
                return task  # type: ignore[no-any-return]
            await asyncio.sleep(0.01)
        raise AssertionError(f"task {tid} did not settle")

    async def setup_task(self) -> None:
        reg = await self.api.register(self.origin.url("f.bin"))
        self.tid, self.cid = reg["task"]["task_id"], reg["cid"]
        await self.settled(self.tid)
        res = await self.api.pull(self.tid, self.cid, limit=1, wait=0)
        self.assigned = res["assignments"][0]


async def make_world(aiohttp_client: Any, tmp_path: Path, **over: Any) -> AsyncIterator[World]:
    root = tmp_path / "origin"
    root.mkdir(exist_ok=True)
    (root / "f.bin").write_bytes(file_bytes(9 * MIB, seed=3))
    async with OriginServer(root) as origin:
        client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, **over)))
        yield World(client, origin)


@pytest.fixture
async def world(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[World]:
    async for w in make_world(aiohttp_client, tmp_path):
        await w.setup_task()
        yield w


def encode(body: object, mp: bool) -> tuple[bytes, dict[str, str]]:
    if mp:
        return msgpack.packb(body, use_bin_type=True), MSGPACK
    return json.dumps(body).encode(), JSON


# --- ids -------------------------------------------------------------------------------
BAD_IDS = ["AB" * 32, "ab" * 31, "ab" * 33, "zz" * 32, "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..",
           "ab" * 31 + "%00a", "é" * 64, "ab" * 31 + "a%20", "0x" + "a" * 62, "-1"]


async def test_bad_task_ids_in_paths_are_refused_before_the_store(world: World) -> None:
    before = await world.snapshot()
    for bad in BAD_IDS:
        calls = [("GET", f"/api/v1/tasks/{bad}", None), ("DELETE", f"/api/v1/tasks/{bad}", None),
                 ("GET", f"/api/v1/tasks/{bad}/digests", None),
                 ("POST", f"/api/v1/tasks/{bad}/pull", {"cid": world.cid, "wait": 0}),
                 ("POST", f"/api/v1/tasks/{bad}/report", {"cid": world.cid, "reports": []})]
        for method, path, body in calls:
            await assert_error(await world.client.request(method, path, json=body), 400, 404)
    assert await world.snapshot() == before


BAD_CIDS = ["A" * 32, "../" * 10 + "ab", 12, None, "a" * 31, "ａ" * 32, "a" * 31 + "\x00", [], {"cid": "a"}]


@pytest.mark.parametrize("mp", [False, True], ids=["json", "msgpack"])
async def test_bad_client_and_peer_ids_in_bodies_are_400(world: World, mp: bool) -> None:
    before = await world.snapshot()
    for value in BAD_CIDS:
        calls = [(f"/api/v1/tasks/{world.tid}/pull", {"cid": value, "wait": 0}),
                 (f"/api/v1/tasks/{world.tid}/report", {"cid": value, "reports": []}),
                 ("/api/v1/peers/heartbeat", {"peer_id": value}), ("/api/v1/peers/down", {"peer_id": value}),
                 ("/api/v1/peers/down", {"peer_id": new_id(), "tasks": [world.tid, value]}),
                 ("/api/v1/tasks", {"url": world.origin.url("f.bin"),
                                    "peer": {"peer_id": value, "ip": "127.0.0.1", "port": 1}})]
        if value is not None:  # a registration without cid is a new client
            calls.append(("/api/v1/tasks", {"url": world.origin.url("f.bin"), "cid": value}))
        for path, body in calls:
            data, headers = encode(body, mp)
            await assert_error(await world.client.post(path, data=data, headers=headers), 400)
    assert await world.snapshot() == before


# --- piece numbers ----------------------------------------------------------------------
PIECES = [-1, 2**31, 2**63 - 1, -(2**63), 1.5, "1", True, None, [0], {"n": 0}, 1e308]


@pytest.mark.parametrize("mp", [False, True], ids=["json", "msgpack"])
async def test_piece_numbers_of_the_wrong_type_or_range_are_400(world: World, mp: bool) -> None:
    before = await world.snapshot()
    for piece in PIECES:
        rep = {"piece": piece, "result": "ok", "source": world.assigned["source"]["cid"]}
        for path, body in [(f"/api/v1/tasks/{world.tid}/report", {"cid": world.cid, "reports": [rep]}),
                           (f"/api/v1/tasks/{world.tid}/pull", {"cid": world.cid, "wait": 0, "reports": [rep]})]:
            data, headers = encode(body, mp)
            await assert_error(await world.client.post(path, data=data, headers=headers), 400)
    assert await world.snapshot() == before


async def test_piece_number_past_the_piece_count_is_400(world: World) -> None:
    before = await world.snapshot()
    for piece in (3, 4, 2**31 - 1):
        for result in ("ok", "have", "failed"):
            rep = {"piece": piece, "result": result, "reason": "timeout"}
            body = await world.api.report(world.tid, world.cid, [rep], status=400)
            assert body["error"] == "bad_request"
    assert await world.snapshot() == before


# --- who may report what ----------------------------------------------------------------
async def test_reports_only_as_itself_on_its_own_assignments(world: World) -> None:
    other = await world.api.register(world.origin.url("f.bin"))
    a = world.assigned
    before = await world.snapshot()
    # another client reporting the piece assigned to the first one
    r = await world.api.report(world.tid, other["cid"], [{"piece": a["piece"], "result": "ok"}], status=409)
    assert r["error"] == "conflict"
    # the right client naming a source the piece was not assigned from
    r = await world.api.report(world.tid, world.cid, [{"piece": a["piece"], "result": "ok",
                                                       "source": other["cid"]}], status=409)
    assert r["error"] == "conflict"
    # a made-up client id, and a real one of this task used on another task
    await world.api.report(world.tid, new_id(), [{"piece": a["piece"], "result": "ok"}], status=404)
    assert await world.snapshot() == before
    (world.origin.root / "g.bin").write_bytes(b"x" * 100)
    g = await world.api.register(world.origin.url("g.bin"))
    await world.settled(g["task"]["task_id"])
    before_g = await world.snapshot()
    await world.api.report(g["task"]["task_id"], world.cid, [{"piece": 0, "result": "ok"}], status=404)
    # all or nothing: one bad report in a batch and the good one is not applied either
    unassigned = next(n for n in range(3) if n != a["piece"])
    await world.api.report(world.tid, world.cid, [{"piece": a["piece"], "result": "ok"},
                                                  {"piece": unassigned, "result": "ok"}], status=409)
    assert await world.snapshot() == before_g


# --- bodies -------------------------------------------------------------------------------
MALFORMED_JSON = [
    b"", b"null", b"[]", b'"x"', b"{", b'{"url": "http://127.0.0.1/x"', b'{"url": "\xff\xfe"}',
    b'\xef\xbb\xbf{"url": "http://127.0.0.1/x"}', b'{"url": NaN}', b'{"url": "http://127.0.0.1/x"} trailing',
    b'{"url": "http://127.0.0.1/x", "headers": {"a": 1}}', b'{"url": "http://127.0.0.1/x", "headers": []}',
    b'{"url": "http://127.0.0.1/x", "filter": "Signature"}', b'{"url": "http://127.0.0.1/x", "pattern": "p3p"}',
    b'{"url": "http://127.0.0.1/x", "md5": "xyz"}', b'{"url": "http://127.0.0.1/x", "peer": {"ip": "1.2.3.4"}}',
    b'{"url": "http://127.0.0.1/x", "peer": {"peer_id": "' + b"a" * 32 + b'", "ip": "1.2.3.4", "port": 0}}',
    b'{"url": "http://127.0.0.1/x", "peer": {"peer_id": "' + b"a" * 32 + b'", "ip": "1.2.3.4", "port": 70000}}',
    b'{"url": "' + b"h" * 9000 + b'"}', b'{"url": ""}', b'{"url": "http://127.0.0.1/x", "identifier": "' + b"i" * 300 + b'"}',
    b'{"url": "http://127.0.0.1/x", "headers": {"' + b"A" * 300 + b'": "v"}}',
    b'{"url": "http://127.0.0.1/x", "headers": {"Bad Name": "v"}}',
    b'{"url": "http://127.0.0.1/x", "range": "bytes=0-1\\r\\nX: y"}',
    b"{" * 50_000, b'{"a":' * 10_000 + b"1" + b"}" * 10_000,
]
MALFORMED_MSGPACK = [
    b"", b"\xc1", b"\x81", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\x91" * 60_000,
    b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", msgpack.packb({1: 2}), msgpack.packb([1, 2]),
    msgpack.packb({"url": b"http://127.0.0.1/x"}), msgpack.packb({"url": "http://127.0.0.1/x", "headers": {1: "x"}}),
    msgpack.packb({"url": "http://127.0.0.1/x", "headers": {"a": b"bin"}}),
    msgpack.packb({"url": "http://127.0.0.1/x", "filter": [None]}),
    msgpack.packb({"url": "http://127.0.0.1/x", "peer": {"peer_id": "a" * 32, "ip": "1.2.3.4", "port": 2**64 - 1}}),
    msgpack.packb({"url": "http://127.0.0.1/x"}) + b"\x00",
    msgpack.packb(msgpack.ExtType(5, b"\x00" * 8)),
]


async def test_registration_without_url_needs_a_known_digest_and_nothing_else(world: World) -> None:
    """No URL: only `identifier: sha256:<hex>` of a task the swarm has (404 unknown_digest
    otherwise); anything else is 400, and nothing is stored either way."""
    before = await world.snapshot()
    unknown = "sha256:" + "ab" * 32
    for body, status in [({}, 400), ({"identifier": "x"}, 400), ({"identifier": unknown.upper()}, 400),
                         ({"identifier": unknown, "md5": "0" * 32}, 400),
                         ({"identifier": unknown, "range": "bytes=0-1"}, 400), ({"identifier": unknown}, 404)]:
        body = {**body, "peer": {"peer_id": "a" * 32, "ip": "127.0.0.1", "port": 15001}}
        resp = await world.client.post("/api/v1/tasks", data=json.dumps(body), headers=JSON)
        err = await assert_error(resp, status)
        if status == 404:
            assert err["error"] == "unknown_digest"
    assert await world.snapshot() == before and world.origin.stats.requests == 1


async def test_malformed_json_registration_is_400(world: World) -> None:
    before = await world.snapshot()
    for i, body in enumerate(MALFORMED_JSON):
        resp = await world.client.post("/api/v1/tasks", data=body, headers=JSON)
        assert resp.status == 400, (i, body[:80])
        await assert_error(resp, 400)
    assert await world.snapshot() == before and world.origin.stats.requests == 1


async def test_malformed_msgpack_bodies_are_400(world: World) -> None:
    before = await world.snapshot()
    for i, body in enumerate(MALFORMED_MSGPACK):
        for path in ("/api/v1/tasks", f"/api/v1/tasks/{world.tid}/pull", f"/api/v1/tasks/{world.tid}/report",
                     "/api/v1/peers/heartbeat", "/api/v1/peers/down"):
            resp = await world.client.post(path, data=body, headers=MSGPACK)
            assert resp.status == 400, (i, path, body[:80])
            await assert_error(resp, 400)
    assert await world.snapshot() == before


async def test_msgpack_body_sent_as_json_and_the_reverse_are_400(world: World) -> None:
    before = await world.snapshot()
    good = {"url": world.origin.url("f.bin"), "peer": peer()}
    await assert_error(await world.client.post("/api/v1/tasks", data=msgpack.packb(good), headers=JSON), 400)
    await assert_error(await world.client.post("/api/v1/tasks", data=json.dumps(good), headers=MSGPACK), 400)
    assert await world.snapshot() == before


async def test_body_over_the_cap_is_413_before_parsing(world: World) -> None:
    before = await world.snapshot()
    big = b'{"url": "' + b"x" * (64 * 1024) + b'"}'
    await assert_error(await world.client.post("/api/v1/tasks", data=big, headers=JSON), 413)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the cap counts what arrives
        for _ in range(100):
            yield b" " * 1024

    resp = await world.client.post("/api/v1/tasks", data=chunked(), headers=JSON)
    assert (await assert_error(resp, 413))["error"] == "payload_too_large"
    assert await world.snapshot() == before


@pytest.mark.regression
@pytest.mark.parametrize("mp", [False, True], ids=["json", "msgpack"])
async def test_body_arriving_in_pieces_is_read_whole(world: World, mp: bool) -> None:
    """The body used to be read with one `content.read(n)`, which returns whatever has
    arrived: a registration split over two segments failed as malformed."""
    data, headers = encode({"url": world.origin.url("f.bin"), "peer": peer()}, mp)

    async def slowly() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 7):
            yield data[i:i + 7]
            await asyncio.sleep(0.002)

    resp = await world.client.post("/api/v1/tasks", data=slowly(), headers=headers)
    assert resp.status == 200, await resp.read()


# --- floods -------------------------------------------------------------------------------
async def test_registration_flood_is_rate_limited_per_address(aiohttp_client: Any, tmp_path: Path) -> None:
    async for w in make_world(aiohttp_client, tmp_path, register_rate=1.0):  # bursts of 10
        statuses = []
        for i in range(14):
            (w.origin.root / f"n{i}").write_bytes(b"x" * 10)
            resp = await w.client.post("/api/v1/tasks", json={"url": w.origin.url(f"n{i}")})
            statuses.append(resp.status)
            if resp.status == 429:
                body = await assert_error(resp, 429)
                assert body["error"] == "too_many_requests"
                assert int(resp.headers["Retry-After"]) >= 1
        assert statuses[:10] == [200] * 10 and statuses[10:] == [429] * 4
        tasks = (await (await w.client.get("/api/v1/tasks")).json())["tasks"]
        assert len(tasks) == 10  # the refused ones left nothing behind
        assert set(w.origin.stats.by_file) == {f"n{i}" for i in range(10)}  # nor reached the origin


async def test_registration_flood_cannot_start_unbounded_origin_fetches(aiohttp_client: Any, tmp_path: Path) -> None:
    async for w in make_world(aiohttp_client, tmp_path, max_fetches=2, register_wait=0.05):
        for i in range(8):
            (w.origin.root / f"s{i}").write_bytes(b"x" * 10)
            # each fetch holds its slot for 5 s: far longer than the registrations and the
            # check below take, even on a loaded machine
            resp = await w.client.post("/api/v1/tasks", json={"url": w.origin.url(f"s{i}", mode="delay=5")})
            assert resp.status == 200
        await asyncio.sleep(0.3)
        assert w.origin.stats.requests == 2  # the rest wait for a fetch slot
        assert len(w.st.cdn.running) == 8


async def test_pull_flood_is_rate_limited_per_client(aiohttp_client: Any, tmp_path: Path) -> None:
    async for w in make_world(aiohttp_client, tmp_path, pull_rate=1.0):  # bursts of 2
        reg = await w.api.register(w.origin.url("f.bin"))
        other = await w.api.register(w.origin.url("f.bin"))
        tid = reg["task"]["task_id"]
        await w.settled(tid)  # the CDN fetch writes to the store until it ends
        for _ in range(2):
            await w.api.pull(tid, reg["cid"], wait=0)
        before = await w.snapshot()
        resp = await w.client.post(f"/api/v1/tasks/{tid}/pull", json={
            "cid": reg["cid"], "wait": 0, "reports": [{"piece": 0, "result": "have"}]})
        assert (await assert_error(resp, 429))["error"] == "too_many_requests"
        assert resp.headers["Retry-After"] == "1"
        assert await w.snapshot() == before  # its reports were not applied
        await w.api.pull(tid, other["cid"], wait=0)  # another client is not affected
        await asyncio.sleep(1.05)
        await w.api.pull(tid, reg["cid"], wait=0)


async def test_too_many_requests_in_progress_is_503_busy(aiohttp_client: Any, tmp_path: Path) -> None:
    async for w in make_world(aiohttp_client, tmp_path, max_requests=2):
        await w.setup_task()
        others = [await w.api.register(w.origin.url("f.bin")) for _ in range(9)]
        for o in others[:8]:  # fill the CDN's per-task upload cap so the long-polls wait
            await w.api.pull(w.tid, o["cid"], limit=1, wait=0)
        polls = [asyncio.create_task(w.client.post(f"/api/v1/tasks/{w.tid}/pull",
                                                   json={"cid": c, "limit": 1, "wait": 3}))
                 for c in (others[8]["cid"], w.cid)]
        await asyncio.sleep(0.2)
        # parked long-polls do no work: they do not hold the two slots
        assert (await w.client.get(f"/api/v1/tasks/{w.tid}")).status == 200
        # two requests whose bodies are still arriving do
        slow = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(w.client.server.host, w.client.server.port)
            writer.write(f"POST /api/v1/tasks/{w.tid}/report HTTP/1.1\r\nHost: x\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            await writer.drain()
            slow.append(writer)
        await asyncio.sleep(0.2)
        resp = await w.client.get(f"/api/v1/tasks/{w.tid}")
        body = await assert_error(resp, 503)
        assert body["error"] == "busy" and resp.headers["Retry-After"] == "1"
        assert (await w.client.get("/_ping")).status == 200  # health checks still answer
        for writer in slow:
            writer.close()
        for p in polls:
            p.cancel()
        await asyncio.gather(*polls, return_exceptions=True)


# --- the limiter itself (pure) -------------------------------------------------------------
def test_token_bucket_take_runs_up_no_debt() -> None:
    b = TokenBucket(rate=2.0, burst=2.0)
    assert b.take(1, 0.0) == 0.0 and b.take(1, 0.0) == 0.0
    assert b.take(1, 0.0) == pytest.approx(0.5)
    assert b.take(1, 0.1) == pytest.approx(0.4)  # refusals did not dig a hole
    assert b.take(1, 0.5) == 0.0


def test_keyed_limiter_keys_are_independent_and_bounded() -> None:
    lim = KeyedLimiter(rate=1.0, burst=1.0, max_keys=3)
    assert lim.check("a", 0.0) == 0.0 and lim.check("a", 0.0) > 0
    assert lim.check("b", 0.0) == 0.0
    for k in "cdefg":
        lim.check(k, 0.0)
    assert len(lim) == 3
    assert KeyedLimiter(rate=0, burst=1).check("x", 0.0) == 0.0
