"""The Redis connection and the translation of its failures.

Without a URL the supernode runs on an embedded in-process store (fakeredis, with Lua),
so a single command starts it. `redis://` and `rediss://` URLs use redis-py's asyncio
client; `redis+sentinel://[:password@]host:port[,host:port]/service_name[/db]` goes
through Sentinel (the password is the data nodes'); `redis+cluster://[:password@]host:port
[,host:port]` uses the Cluster client, every listed node a seed (docs/ha.md). Every redis exception is turned
into `StoreError` here and never leaks further.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rexc

from common.errors import Busy, StoreError

from . import scripts

P = ParamSpec("P")
R = TypeVar("R")

_TRANSIENT = (rexc.ConnectionError, rexc.TimeoutError, rexc.BusyLoadingError, OSError)


_HOLDING = contextvars.ContextVar("df_store_slot", default=False)
SLOTS = 256  # Redis operations in flight at once per process (Store.slot)
POOL_LIMIT = 4 * SLOTS  # connections at most: the slots, the pub/sub reader, and what runs outside a slot
SHED_AFTER = 1.0  # seconds an operation may wait for a slot before the request is shed


def translate(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """Decorator: redis failures become StoreError (503 at the HTTP edge). A method of a
    Store, or of an object with a `store`, runs under that store's admission (`slot`)."""

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        owner = args[0] if args else None
        store = owner if isinstance(owner, Store) else getattr(owner, "store", None)
        try:
            if isinstance(store, Store) and not _HOLDING.get():
                async with store.slot():
                    return await fn(*args, **kwargs)
            return await fn(*args, **kwargs)
        except _TRANSIENT as exc:
            raise StoreError(f"store unavailable: {type(exc).__name__}") from exc
        except rexc.RedisError as exc:
            raise StoreError(f"store error: {exc}") from exc

    return wrapper


def raise_if_cancelled() -> None:
    """redis-py (8.x) can swallow a cancellation that lands during a command: the call
    returns normally and the loop would go on forever, hanging shutdown. The request
    is still counted on the task, so honour it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


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
        # A plain pool: Store.slot already admits at most SLOTS operations at once (a
        # wait there, or 503 busy), so the pool never runs dry and its bound only guards
        # against a leak. redis-py's BlockingConnectionPool would queue every get and
        # release through one asyncio.Condition: 85 against 51 us of this process's CPU a
        # command, and 2.6x the p99 at 200 commands in flight (redis-py 8.2, loopback).
        pool = aioredis.ConnectionPool.from_url(url, max_connections=POOL_LIMIT, **common)
        pool.connection_class = _inline_send(pool.connection_class)
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
        cluster = RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in hosts], **auth, **common)
        # the nodes it discovers (every master, after CLUSTER SLOTS) are built from these;
        # RedisCluster takes no connection class of its own and rebuilds the seeds from them
        kw = cluster.nodes_manager.connection_kwargs
        kw["connection_class"] = _inline_send(kw.get("connection_class", aioredis.Connection))
        return cluster
    check_url(url)
    raise AssertionError("unreachable")


class _InlineSend:
    """A connection mixin: a command is sent under asyncio.timeout in the caller's task.
    redis-py sends it under asyncio.wait_for, which on Python 3.11 runs the send in a new
    Task: two more passes through the event loop's ready queue per command, each as long
    as that queue is. In the soak (700 requests/s, 850 commands/s) that was the whole of
    a command's round trip: 5 ms at p50 and 45 ms at p90 from taking the connection to
    the bytes leaving, then 0.02 ms for Redis to answer."""

    socket_timeout: float | None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout, self.socket_timeout = self.socket_timeout, None  # so the send runs inline
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        finally:
            self.socket_timeout = timeout


_INLINE: dict[type, type] = {}


def _inline_send(cls: type) -> type:
    """`cls` (a redis-py connection class: TCP, TLS, unix socket) with _InlineSend."""
    if issubclass(cls, _InlineSend):
        return cls
    if cls not in _INLINE:
        _INLINE[cls] = type(f"Inline{cls.__name__}", (_InlineSend, cls), {})
    return _INLINE[cls]


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


class Store:
    """The Redis client plus the registered Lua scripts.

    A script that changes a task (scripts.EVENTFUL) returns the change log it also
    published; `run` hands it to `on_event` before returning, so the caller's own
    changes are in this process's views of the task at once (the published copy, when
    it arrives, is recognised by its sequence number). On the embedded store that is the
    only way events travel: every subscriber lives in this process."""

    def __init__(self, client: Any, *, embedded: bool = False, slots: int = SLOTS,
                 shed_after: float = SHED_AFTER) -> None:
        self.client = client
        self.embedded = embedded
        self.on_event: Callable[[str, str], None] | None = None
        self._scripts = {name: client.register_script(src) for name, src in scripts.ALL.items()}
        self._slots = asyncio.Semaphore(slots)
        self.shed_after = shed_after
        self.shed = 0  # operations refused for want of a slot (a metric)
        self.on_op: Callable[[float], None] | None = None  # a script's round trip, seconds (a metric)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Admission: at most `slots` operations at once. One that cannot start within
        `shed_after` is refused with 503 busy + Retry-After, well before a pool wait
        would time out as an error: overload makes clients wait, it does not fail them."""
        if self._slots.locked():
            try:
                await asyncio.wait_for(self._slots.acquire(), self.shed_after)
            except TimeoutError:
                self.shed += 1
                raise Busy("the supernode's store is saturated; try again shortly",
                           detail={"retry_after": 1}) from None
        else:
            await self._slots.acquire()
        token = _HOLDING.set(True)
        try:
            yield
        finally:
            _HOLDING.reset(token)
            self._slots.release()

    @translate
    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        t0 = time.perf_counter()
        result = await self._scripts[name](keys=keys, args=args)
        if self.on_op is not None:
            self.on_op(time.perf_counter() - t0)
        if name not in scripts.EVENTFUL:
            return result
        event = result[0]
        if event and self.on_event is not None:
            task_id = keys[0].split("{", 1)[1].split("}", 1)[0]
            self.on_event(task_id, event.decode() if isinstance(event, bytes) else event)
        return result[1] if len(result) > 1 else None

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
