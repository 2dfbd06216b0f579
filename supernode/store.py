"""The Redis connection and the translation of its failures.

Without a URL the supernode runs on an embedded in-process store (fakeredis, with Lua),
so a single command starts it. `redis://` and `rediss://` URLs use redis-py's asyncio
client; `redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]` goes
through Sentinel (the password is the data nodes'); `redis+cluster://[:password@]host:port
[,host:port]` uses the Cluster client, every listed node a seed (docs/ha.md). Every redis exception is turned
into `StoreError` here and never leaks further.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc

from common.errors import StoreError

from . import scripts

P = ParamSpec("P")
R = TypeVar("R")

_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)


def translate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorator: redis failures become StoreError (503 at the HTTP edge)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except _TRANSIENT as exc:
            raise StoreError(f"store unavailable: {type(exc).__name__}") from exc
        except rexc.RedisError as exc:
            raise StoreError(f"store error: {exc}") from exc

    return wrapper


def connect(url: str | None) -> Any:
    """Build the client (no I/O yet)."""
    common = {"socket_timeout": 5.0, "socket_connect_timeout": 3.0, "health_check_interval": 15}
    if not url:
        import fakeredis

        # fakeredis's own pool allows 100 connections and fails the 101st at once: a
        # 50-host swarm (pulls, reports, heartbeats) hit that; in-process connections
        # cost next to nothing.
        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=False,
                                        max_connections=4096)
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        # A blocking pool: with more concurrent pulls than connections a command waits
        # for a free connection instead of failing (MaxConnectionsError -> 503).
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=256, timeout=5.0, **common)
        return aioredis.Redis(connection_pool=pool)
    if scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        auth, hosts, service, db = _sentinel_parts(url)
        # the password (if any) is the data nodes'; sentinels are asked without one
        sentinel = Sentinel(hosts, **common)
        return sentinel.master_for(service, db=db, **auth)
    if scheme == "redis+cluster":
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        auth, hosts = _cluster_parts(url)
        # every listed node is a seed: the client starts from whichever answers
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **auth, **common)
    check_url(url)
    raise AssertionError("unreachable")


def check_url(url: str) -> None:
    """ValueError with a one-line reason if `url` is not a store URL we can use (no I/O)."""
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        from redis.connection import parse_url

        parse_url(url)
    elif scheme == "redis+sentinel":
        _sentinel_parts(url)
    elif scheme == "redis+cluster":
        _cluster_parts(url)
    else:
        raise ValueError(f"unsupported store URL scheme {scheme!r} (redis, rediss, redis+sentinel, redis+cluster)")


def _sentinel_parts(url: str) -> tuple[dict[str, str], list[tuple[str, int]], str, int]:
    auth, hosts, path = _split_multi_host(url, 26379)
    if not path or len(path) > 2:
        raise ValueError("a sentinel URL needs a service name: redis+sentinel://h:p[,h:p]/name[/db]")
    if len(path) > 1 and not path[1].isdigit():
        raise ValueError(f"bad db number {path[1]!r} in the sentinel URL")
    return auth, hosts, path[0], int(path[1]) if len(path) > 1 else 0


def _cluster_parts(url: str) -> tuple[dict[str, str], list[tuple[str, int]]]:
    auth, hosts, path = _split_multi_host(url, 6379)
    if path:
        raise ValueError("a cluster URL has no path (Redis Cluster has only db 0)")
    return auth, hosts


def _split_multi_host(url: str, default_port: int) -> tuple[dict[str, str], list[tuple[str, int]], list[str]]:
    """`scheme://[[user]:password@]host[:port][,host[:port]...][/a/b]` -> (auth kwargs,
    [(host, port)], path segments). IPv6 hosts go in brackets."""
    rest = url.split("://", 1)[1]
    netloc, _, path = rest.partition("/")
    auth: dict[str, str] = {}
    if "@" in netloc:
        userinfo, netloc = netloc.rsplit("@", 1)
        user, sep, password = userinfo.partition(":")
        if user:
            auth["username"] = unquote(user)
        if sep:
            auth["password"] = unquote(password)
    hosts: list[tuple[str, int]] = []
    for item in netloc.split(","):
        host, port = item, str(default_port)
        if item.startswith("["):
            host, _, tail = item[1:].partition("]")
            if tail:
                port = tail.removeprefix(":")
        elif ":" in item:
            host, port = item.rsplit(":", 1)
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"bad host:port {item!r} in the store URL")
        hosts.append((host, int(port)))
    return auth, hosts, [p for p in path.split("?", 1)[0].split("/") if p]


# The event each script publishes (see scripts.py), for the embedded store's local fan-out.
_EVENTS = {"set_meta": "s", "publish_pieces": "p", "finish_task": "s", "adopt_cdn": "s", "report": "p",
           "release": "p",
           "remove_clients": "p", "delete_task": "s"}


class Store:
    """The Redis client plus the registered Lua scripts.

    On the embedded store every subscriber lives in this process, so events are handed
    to `local_listener` directly after each script instead of through fakeredis'
    pub/sub (whose blocking read is a poll)."""

    def __init__(self, client: Any, *, embedded: bool = False) -> None:
        self.client = client
        self.embedded = embedded
        self.local_listener: Callable[[str, str], None] | None = None
        self._scripts = {name: client.register_script(src) for name, src in scripts.ALL.items()}

    @translate
    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        result = await self._scripts[name](keys=keys, args=args)
        if self.local_listener is not None and name in _EVENTS:
            task_id = keys[0].split("{", 1)[1].split("}", 1)[0]
            self.local_listener(task_id, _EVENTS[name])
        return result

    @translate
    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.client.aclose()
        # a client built on a pool it was handed (ours, Sentinel's) leaves the pool open
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect()
            for s in getattr(getattr(pool, "sentinel_manager", None), "sentinels", ()):
                with contextlib.suppress(Exception):
                    await s.aclose()


@contextlib.asynccontextmanager
async def open_store(url: str | None) -> AsyncIterator[Store]:
    store = Store(connect(url), embedded=not url)
    try:
        yield store
    finally:
        await store.close()
