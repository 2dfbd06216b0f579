"""Property-based fuzzing of the supernode API (issue 5, "Bad input").

Hypothesis builds requests from the valid ones dfget sends (register, pull, report,
heartbeat, peer down, the GET endpoints) and mutates them: wrong types, huge numbers,
unicode, deep nesting, missing and extra keys, bad ids and paths, other methods, odd
Content-Type / Accept / Range / Content-Encoding headers, JSON for msgpack and back,
truncated and chunked bodies. Every answer must hold:

- no 5xx (a registration whose origin host does not resolve is 502 origin_unavailable,
  as documented; nothing else);
- every error answer carries the error body ({"error", "message"} strings), in the
  encoding asked for;
- nothing is logged at ERROR or with a traceback;
- a rejected request (any 4xx) leaves the store exactly as it was: every key and its
  serialized value (DUMP) is compared before and after.

It runs the real app factory in-process (aiohttp test server on 127.0.0.1) against an
in-process origin, on the embedded store (fakeredis) for the big run and on the real
Redis (REDIS_URL) for a smaller one. derandomize=True: the same examples every run.
No name is resolved through DNS and no address outside 127.0.0.0/8 is ever dialled: the
test's loop resolves only "localhost", and the origin policy denies everything else.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import string
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import aiohttp.web
import msgpack
import pytest
from conftest import LogTrap, file_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from supernode_support import app_for, settings_for
from yarl import URL

from bench.origin import OriginServer
from common.netpolicy import AddressPolicy, parse_networks
from common.taskid import new_id
from supernode.api import guard
from supernode.store import keys
from supernode.config import Settings
from supernode.state import STATE

API_EXAMPLES = int(os.environ.get("FUZZ_API_EXAMPLES", "2000"))  # examples of 3-4 requests each
API_REQUESTS = 3 * API_EXAMPLES  # sent at least (asserted): 6,000 by default
REDIS_EXAMPLES = 100
MIB = 1 << 20

# One round trip: every key with its serialized value (DUMP: type and value, no TTL). A
# rejected request must not write at all, so even a rewrite of an equal value in another
# order counts as a change here.
SNAPSHOT_LUA = r"""
local out = {}
for _, k in ipairs(redis.call('KEYS', '*')) do
  out[#out + 1] = k; out[#out + 1] = redis.call('DUMP', k)
end
return out
"""


def maintained_on_a_timer(key: bytes) -> bool:
    """Keys the supernode rewrites by itself every few seconds, whatever the requests:
    its liveness record and its published piece-token key."""
    return key == keys.PIECE_KEYS.encode() or key.startswith(keys.supernode("").encode())


async def snapshot(redis: Any) -> dict[bytes, Any]:
    flat = await redis.eval(SNAPSHOT_LUA, 0)
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)
            if flat[i + 1] is not None and not maintained_on_a_timer(flat[i])}


# Commands that cannot change the dataset. Anything else (EVALSHA included: a script
# may write) counts as a possible write.
READ_ONLY = frozenset(b"""GET MGET HGET HGETALL HMGET HEXISTS HLEN HKEYS HVALS SMEMBERS SISMEMBER SCARD
EXISTS TYPE TTL PTTL KEYS SCAN SSCAN HSCAN ZSCAN ZRANGE ZRANGEBYSCORE ZSCORE ZCARD ZCOUNT BITCOUNT
GETBIT GETRANGE STRLEN LRANGE LLEN PING ECHO INFO TIME DBSIZE SCRIPT PUBLISH SUBSCRIBE PSUBSCRIBE
UNSUBSCRIBE PUNSUBSCRIBE CLIENT SELECT HELLO""".split())


class WriteCounter:
    """Counts commands sent to the store that may change it (the snapshot is taken only
    when one ran: comparing the whole store after every example would dominate the run)."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        from redis.asyncio.client import Pipeline

        self.writes = 0
        self.paused = False
        counter = self

        def note(args: tuple[Any, ...]) -> None:
            name = args[0].encode() if isinstance(args[0], str) else bytes(args[0])
            if not counter.paused and name.upper().split(b" ")[0] not in READ_ONLY:
                counter.writes += 1

        cls = type(client)
        real = cls.execute_command

        async def execute_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            if self is client:
                note(args)
            return await real(self, *args, **kwargs)

        real_pipe = Pipeline.execute_command

        def pipe_command(self: Any, *args: Any, **kwargs: Any) -> Any:
            note(args)
            return real_pipe(self, *args, **kwargs)

        monkeypatch.setattr(cls, "execute_command", execute_command)
        monkeypatch.setattr(Pipeline, "execute_command", pipe_command)


@dataclass
class Fixture:
    """The world every example runs against (built once, on the test's own loop)."""

    web_runner: aiohttp.web.AppRunner
    session: aiohttp.ClientSession
    base: str
    redis: Any
    app: Any
    origin: OriginServer
    tid: str
    cids: list[str]
    peer_ids: list[str]
    source: str
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    counter: WriteCounter | None = None
    known: dict[bytes, Any] | None = None
    known_writes: int = -1
    snapshots: int = 0

    async def baseline(self) -> dict[bytes, Any]:
        """The store as it is now, re-read only if something may have written to it."""
        assert self.counter is not None
        if self.known is None or self.known_writes != self.counter.writes:
            self.known = await self.snapshot()
            self.known_writes = self.counter.writes
        return self.known

    async def snapshot(self) -> dict[bytes, Any]:
        assert self.counter is not None
        self.counter.paused = True
        try:
            self.snapshots += 1
            return await snapshot(self.redis)
        finally:
            self.counter.paused = False


def _local_only_getaddrinfo(loop: asyncio.AbstractEventLoop) -> None:
    """Names other than localhost do not resolve: the fuzz never reaches a DNS server."""
    real = loop.getaddrinfo

    async def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        h = host.decode() if isinstance(host, bytes) else host
        if h in ("localhost", "127.0.0.1") or (isinstance(h, str) and h.replace(".", "").isdigit() and h.startswith("127.")):
            return await real("127.0.0.1" if h == "localhost" else h, port, *args, **kwargs)
        raise socket.gaierror(socket.EAI_NONAME, "not resolved in this test")

    loop.getaddrinfo = getaddrinfo  # type: ignore[method-assign]


STRICT_POLICY = AddressPolicy(allow=parse_networks(["127.0.0.0/8"]), deny=parse_networks(["0.0.0.0/0", "::/0"]))


async def build(tmp: Path, redis_url: str | None) -> Fixture:
    _local_only_getaddrinfo(asyncio.get_running_loop())
    root = tmp / "origin"
    root.mkdir(parents=True, exist_ok=True)
    (root / "f.bin").write_bytes(file_bytes(5 * MIB, seed=5))
    (root / "small").write_bytes(b"small file")
    origin = OriginServer(root)
    await origin.start()
    settings = settings_for(tmp / "sn", redis_url, pull_wait_max=0.05, register_wait=0.5,
                            register_rate=0, pull_rate=0)
    app = app_for(settings)
    runner = aiohttp.web.AppRunner(app, access_log=None, **guard.runner_kwargs(settings.header_timeout))
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    st_ = app[STATE]
    fx = Fixture(runner, session, base, st_.store.client, app, origin, "", [], [], "")
    peers = [{"peer_id": new_id(), "ip": "127.0.0.1", "port": 15000 + i} for i in range(2)]
    fx.peer_ids.extend(new_id() for _ in range(2))  # never registered before the run
    for p in peers:
        async with session.post(base + "/api/v1/tasks", json={"url": origin.url("f.bin"), "peer": p}) as r:
            reg = await r.json()
            assert r.status == 200, reg
        fx.tid = reg["task"]["task_id"]
        fx.cids.append(reg["cid"])
        fx.peer_ids.append(p["peer_id"])
    for _ in range(1000):
        if fx.tid not in st_.cdn.running:
            break
        await asyncio.sleep(0.01)
    async with session.post(f"{base}/api/v1/tasks/{fx.tid}/pull", json={"cid": fx.cids[0], "limit": 1, "wait": 0}) as r:
        fx.source = (await r.json())["assignments"][0]["source"]["cid"]
    return fx


async def teardown(fx: Fixture) -> None:
    await fx.session.close()
    await fx.web_runner.cleanup()
    await fx.origin.stop()


# --- strategies ----------------------------------------------------------------------------
# All strategies are built once here: building one per draw cost more than the request.
def hexs(n: int) -> st.SearchStrategy[str]:
    return st.text("0123456789abcdef", min_size=n, max_size=n)


BAD_IDS = st.one_of(
    st.sampled_from(["", "..", "../..", "%2e%2e", "%2e%2e%2f%2e%2e", "%00", "ab" * 31 + "%00a", "AB" * 32,
                     "ab" * 33, "%C3%A9" * 64, "-1", "0x" + "a" * 62, "null", "{id}", "%ff%fe", "a%2fb", "a/b"]),
    st.text(max_size=70).map(lambda s: quote(s, safe="")), hexs(64), hexs(32), hexs(63),
)
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30), st.sampled_from(["", "ok", "have", "failed", "p2p", "cdn", "finished", "aborted", "\x00",
                                          "\ufffd", "\u202e", "a" * 9000]),
    st.integers(-1, 5), hexs(32), hexs(64),
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(st.text(max_size=8), SCALARS, max_size=3))
ANY = st.integers(0, 1 << 30)  # an index into a list that is only known at draw time
OPS = st.lists(st.sampled_from(["drop", "retype", "extra", "nest", "list_item", "replace_all", "id"]), max_size=3)
NEST = st.tuples(st.sampled_from([3, 64, 400]), st.sampled_from(["list", "dict"]))
EXTRA_KEYS = st.sampled_from(["url", "cid", "peer_id", "reports", "wait", "limit", "event", "tasks", "piece",
                              "headers", "__proto__"]) | st.text(max_size=12)
KINDS = st.sampled_from(["register", "pull", "report", "heartbeat", "down", "task", "digests", "list", "delete",
                         "ping", "version", "metrics"])
REPORT = st.tuples(st.integers(0, 2), st.sampled_from(["ok", "failed", "have"]),
                   st.sampled_from(["timeout", "digest_mismatch", None]))
URL_PICK = st.integers(0, 11)
QUERY = st.text(max_size=20)
HOW = st.sampled_from(["json", "json", "msgpack", "msgpack", "raw", "truncated", "badutf8"])
RAW = st.binary(max_size=200) | st.sampled_from([b"[" * 50_000, b'{"a":' * 12_000, b"\x91" * 60_000,
                                                 b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff"])
BAD_UTF8 = st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])
CONTENT_TYPES = st.sampled_from(["application/json", "application/msgpack", "application/msgpack", "text/plain", "",
                                 "application/json; charset=latin-1", "multipart/form-data; boundary=x",
                                 "application/x-www-form-urlencoded", "application/msgpack; x=1", "*/*"])
HEADER_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=40)
HEAD_WHAT = st.sampled_from(["none"] * 4 + ["method", "path_id", "path_tail", "ctype", "accept", "range", "encoding",
                                            "garbage_header", "body_on_get"])
# (methods aiohttp's parser knows: others get its plain-text 400 before any handler)
METHODS = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "PROPFIND",
                           "MKCOL", "LOCK", "PURGE", "SEARCH"])
TAILS = st.sampled_from(["/", "//", "/..", "/%2e%2e/x", "?a=" + "b" * 3000, "/extra", "%00", ";x", "#f",
                         "/" + "a" * 4000])
ACCEPTS = st.sampled_from(["application/msgpack", "application/json", "*/*", "text/html",
                           "application/msgpack, application/json;q=0.1"]) | HEADER_TEXT
RANGES = st.sampled_from(["bytes=0-1", "bytes=0-1,2-3", "items=1"]) | HEADER_TEXT
ENCODINGS = st.sampled_from(["gzip", "deflate", "br", "zstd", "identity", "x"])
HEADER_NAMES = st.text(string.ascii_letters + "-", min_size=1, max_size=20)
SMALL_BINARY = st.binary(max_size=100)
CHUNKED = st.integers(0, 9)


def deep(depth: int, kind: str) -> Any:
    v: Any = 1
    for _ in range(depth):
        v = [v] if kind == "list" else {"a": v}
    return v


def mutate(draw: st.DrawFn, body: dict[str, Any]) -> Any:
    """A valid body, then 0-3 mutations."""
    out: Any = body
    for op in draw(OPS):
        keys = list(out) if isinstance(out, dict) else []
        if op == "replace_all":
            out = draw(VALUES)
            continue
        if not keys:
            continue
        key = keys[draw(ANY) % len(keys)]
        if op == "drop":
            out.pop(key)
        elif op == "retype":
            out[key] = draw(VALUES)
        elif op == "extra":
            out[draw(EXTRA_KEYS)] = draw(VALUES)
        elif op == "nest":
            out[key] = deep(*draw(NEST))
        elif op == "id":
            out[key] = draw(BAD_IDS)
        elif op == "list_item" and isinstance(out[key], list) and out[key] and isinstance(out[key][0], dict) \
                and out[key][0]:
            item = out[key][0]
            item[sorted(item)[draw(ANY) % len(item)]] = draw(VALUES)
    return out


class Req:
    def __init__(self, method: str, path: str, headers: dict[str, str], data: bytes | None,
                 chunked: bool = False) -> None:
        self.method, self.path, self.headers, self.data, self.chunked = method, path, headers, data, chunked

    def __repr__(self) -> str:
        return f"Req({self.method} {self.path} {self.headers} {self.data[:300] if self.data else None!r} chunked={self.chunked})"


def encode_body(draw: st.DrawFn, body: Any) -> tuple[bytes, str]:
    how = draw(HOW)
    if how == "raw":
        return draw(RAW), draw(CONTENT_TYPES)
    if how == "msgpack":
        try:
            return msgpack.packb(body, use_bin_type=True), "application/msgpack"
        except (OverflowError, TypeError, ValueError):
            pass
    data = json.dumps(body).encode("utf-8", "surrogatepass")
    if how == "truncated" and data:
        data = data[:draw(ANY) % len(data)]
    elif how == "badutf8" and data:
        i = draw(ANY) % (len(data) + 1)
        data = data[:i] + draw(BAD_UTF8) + data[i:]
    return data, "application/json"


DOWN_PEERS = [new_id() for _ in range(3)]


def template(draw: st.DrawFn, fx: Fixture) -> tuple[str, str, Any]:
    tid = fx.tid
    kind = draw(KINDS)
    if kind in ("pull", "report"):
        piece, result, reason = draw(REPORT)
        report = {"piece": piece, "result": result, "source": fx.source, "reason": reason}
        cid = fx.cids[draw(ANY) % len(fx.cids)]
        if kind == "pull":
            return "POST", f"/api/v1/tasks/{tid}/pull", {"cid": cid, "limit": 2, "wait": 0, "reports": [report]}
        return "POST", f"/api/v1/tasks/{tid}/report", {"cid": cid, "reports": [report], "event": None}
    if kind == "register":
        urls = [fx.origin.url("f.bin")] * 6 + [fx.origin.url("small"), fx.origin.url("missing"),
                                                f"http://localhost:{fx.origin.port}/files/small",
                                                "http://unresolvable.invalid/x"]
        pick = draw(URL_PICK)
        url = urls[pick] if pick < len(urls) else (  # a new task now and then
            f"http://127.0.0.1:{fx.origin.port}/files/small?x=" + quote(draw(QUERY)))
        # peer ids from a small pool: a new one per request would grow the store (and the
        # cost of comparing it) for the whole run
        return "POST", "/api/v1/tasks", {
            "url": url, "peer": {"peer_id": fx.peer_ids[draw(ANY) % len(fx.peer_ids)], "ip": "127.0.0.1",
                                 "port": 15001},
            "headers": {"X-A": "b"}, "md5": None, "identifier": None, "filter": ["Signature"], "range": None,
            "pattern": "p2p", "cid": None}
    if kind == "heartbeat":
        return "POST", "/api/v1/peers/heartbeat", {"peer_id": fx.peer_ids[draw(ANY) % len(fx.peer_ids)]}
    if kind == "down":  # never a registered peer: keep the world
        return "POST", "/api/v1/peers/down", {"peer_id": DOWN_PEERS[draw(ANY) % len(DOWN_PEERS)], "tasks": [tid]}
    return {"task": ("GET", f"/api/v1/tasks/{tid}", None), "digests": ("GET", f"/api/v1/tasks/{tid}/digests", None),
            "list": ("GET", "/api/v1/tasks", None), "delete": ("DELETE", f"/api/v1/tasks/{new_id() + new_id()}", None),
            "ping": ("GET", "/_ping", None), "version": ("GET", "/version", None),
            "metrics": ("GET", "/metrics", None)}[kind]


@st.composite
def api_requests(draw: st.DrawFn, fx: Fixture) -> Req:
    method, path, body = template(draw, fx)
    headers: dict[str, str] = {}
    data: bytes | None = None
    if body is not None:
        data, headers["Content-Type"] = encode_body(draw, mutate(draw, body))
    what = draw(HEAD_WHAT)  # the request line and headers
    if what == "method":
        method = draw(METHODS)
    elif what == "path_id" and fx.tid in path:
        path = path.replace(fx.tid, draw(BAD_IDS))
    elif what == "path_tail":
        path += draw(TAILS)
    elif what == "ctype":
        headers["Content-Type"] = draw(CONTENT_TYPES | HEADER_TEXT)
    elif what == "accept":
        headers["Accept"] = draw(ACCEPTS)
    elif what == "range":
        headers["Range"] = draw(RANGES)
    elif what == "encoding" and data is not None:
        headers["Content-Encoding"] = draw(ENCODINGS)
    elif what == "garbage_header":
        headers[draw(HEADER_NAMES)] = draw(HEADER_TEXT)
    elif what == "body_on_get" and data is None:
        data = draw(SMALL_BINARY)
    return Req(method, path, headers, data, chunked=data is not None and draw(CHUNKED) == 0)


# --- the oracle -----------------------------------------------------------------------------
async def send(fx: Fixture, req: Req) -> tuple[int, aiohttp.typedefs.LooseHeaders, bytes]:
    payload: Any = req.data
    if req.chunked and req.data is not None:
        data = req.data

        async def gen() -> AsyncIterator[bytes]:
            for i in range(0, len(data), 16):
                yield data[i:i + 16]
        payload = gen()
    url = URL(fx.base + req.path, encoded=True)
    async with fx.session.request(req.method, url, data=payload, headers=req.headers,
                                  skip_auto_headers=["Content-Type"] if "Content-Type" not in req.headers else ()) as r:
        return r.status, r.headers, await r.read()


async def settle(fx: Fixture) -> None:
    """Let fetches started by an accepted registration end (or cut them off): nothing may
    change the store behind the next example's back."""
    running = fx.app[STATE].cdn.running
    for _ in range(200):
        if not running:
            return
        await asyncio.sleep(0.01)
    for t in list(running.values()):
        t.cancel()
    for _ in range(200):
        if not running:
            return
        await asyncio.sleep(0.01)


ORIGIN_CODES = {"origin_unavailable"}


async def check_one(fx: Fixture, req: Req, trap: LogTrap) -> None:
    assert fx.counter is not None
    before = await fx.baseline()
    status, headers, body = await send(fx, req)
    fx.sent += 1
    fx.statuses[status] = fx.statuses.get(status, 0) + 1
    ctype = headers.get("Content-Type", "")
    parsed: Any = None
    if req.method != "HEAD" and (status >= 400 or ctype.startswith(("application/json", "application/msgpack"))):
        try:
            parsed = msgpack.unpackb(body) if ctype.startswith("application/msgpack") else json.loads(body)
        except ValueError:
            raise AssertionError(f"answer is not {ctype or 'JSON'}: {status} {dict(headers)} {body[:300]!r}") from None
    if status >= 400 and req.method != "HEAD":
        assert isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and isinstance(parsed.get("message"), str), (status, body[:300])
        wants_mp = "application/msgpack" in req.headers.get("Accept", "") or (
            req.headers.get("Content-Type", "").split(";")[0].strip() == "application/msgpack"
            and "json" not in req.headers.get("Accept", ""))
        assert ctype.startswith("application/msgpack" if wants_mp else "application/json"), (ctype, req.headers)
    if status >= 500:
        route = req.path.split("?")[0].split("#")[0]  # a query or a fragment still reaches the route
        assert status == 502 and route == "/api/v1/tasks" and parsed["error"] in ORIGIN_CODES, (status, parsed)
    if status >= 400:
        if fx.counter.writes != fx.known_writes:  # it ran a script or wrote: compare it all
            after = await fx.snapshot()
            assert after == before, f"rejected request changed the store: {_diff(before, after)}"
            fx.known, fx.known_writes = after, fx.counter.writes
    else:
        await settle(fx)
    assert not trap.bad, [f"{r.levelname} {r.name}: {r.getMessage()}" for r in trap.bad]


async def check_all(fx: Fixture, reqs: list[Req], trap: LogTrap) -> None:
    for req in reqs:
        await check_one(fx, req, trap)


def _diff(a: dict[bytes, Any], b: dict[bytes, Any]) -> list[str]:
    return sorted(k.decode(errors="replace") for k in set(a) | set(b) if a.get(k) != b.get(k))


def run_fuzz(tmp_path: Path, redis_url: str | None, examples: int, trap: LogTrap,
             monkeypatch: pytest.MonkeyPatch) -> Fixture:
    monkeypatch.setattr(Settings, "origin_policy", lambda self: STRICT_POLICY)
    runner = asyncio.Runner()
    fx = runner.run(build(tmp_path, redis_url))
    fx.counter = WriteCounter(fx.redis, monkeypatch)
    try:
        # A few requests per example: they also meet the state the ones before left.
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(reqs=st.lists(api_requests(fx), min_size=3, max_size=4))
        def one(reqs: list[Req]) -> None:
            runner.run(check_all(fx, reqs, trap))

        one()
    finally:
        runner.run(teardown(fx))
        runner.close()
    return fx


def test_fuzz_supernode_api(tmp_path: Path, log_trap: LogTrap, monkeypatch: pytest.MonkeyPatch) -> None:
    fx = run_fuzz(tmp_path, None, API_EXAMPLES, log_trap, monkeypatch)
    assert fx.sent >= API_REQUESTS, fx.sent
    assert fx.snapshots > API_EXAMPLES // 20  # the store was really read and compared
    assert sum(n for s, n in fx.statuses.items() if s < 300) > fx.sent // 10, fx.statuses  # not all refused
    assert sum(n for s, n in fx.statuses.items() if 400 <= s < 500) > fx.sent // 4, fx.statuses


@pytest.mark.redis
def test_fuzz_supernode_api_on_redis(tmp_path: Path, redis_url: str | None, log_trap: LogTrap,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    fx = run_fuzz(tmp_path, redis_url, REDIS_EXAMPLES, log_trap, monkeypatch)
    assert fx.sent >= REDIS_EXAMPLES and fx.snapshots > 10
