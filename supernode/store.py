"""The Redis connection and the translation of its failures.

Without a URL the supernode runs on an embedded in-process store (fakeredis, with Lua),
so a single command starts it. `redis://` and `rediss://` URLs use redis-py's asyncio
client; `redis+sentinel://host:port[,host:port]/service_name[/db]` goes through Sentinel;
`redis+cluster://host:port` uses the Cluster client. Every redis exception is turned
into `StoreError` here and never leaks further.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import urlsplit

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

        return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer(), decode_responses=False)
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        # A blocking pool: with more concurrent pulls than connections a command waits
        # for a free connection instead of failing (MaxConnectionsError -> 503).
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=64, timeout=5.0, **common)
        return aioredis.Redis(connection_pool=pool)
    if scheme == "redis+sentinel":
        from redis.asyncio.sentinel import Sentinel

        parts = urlsplit(url)
        hosts = [h.rsplit(":", 1) for h in parts.netloc.split(",")]
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError("sentinel URL needs a service name: redis+sentinel://h:p/name[/db]")
        db = int(path[1]) if len(path) > 1 else 0
        sentinel = Sentinel([(h, int(p)) for h, p in hosts], **common)
        return sentinel.master_for(path[0], db=db)
    if scheme == "redis+cluster":
        from redis.asyncio.cluster import RedisCluster

        return RedisCluster.from_url("redis://" + url.split("://", 1)[1], **common)
    raise ValueError(f"unsupported store URL scheme {scheme!r} (redis, rediss, redis+sentinel, redis+cluster)")


# The event each script publishes (see scripts.py), for the embedded store's local fan-out.
_EVENTS = {"set_meta": "s", "publish_pieces": "p", "report": "p", "release": "p",
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


@contextlib.asynccontextmanager
async def open_store(url: str | None) -> AsyncIterator[Store]:
    store = Store(connect(url), embedded=not url)
    try:
        yield store
    finally:
        await store.close()
