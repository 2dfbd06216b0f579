"""The store's Redis connections: a command is sent in the caller's task (no Task per
send), a send that hangs still times out, and every kind of URL gets that connection."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest
import redis.asyncio as aioredis

from supernode.store import connection
from supernode.store.connection import _inline_send, _InlineSend, connect


def test_every_connection_class_sends_inline() -> None:
    tcp = connect("redis://127.0.0.1:1/0")
    assert issubclass(tcp.connection_pool.connection_class, _InlineSend)
    assert issubclass(tcp.connection_pool.connection_class, aioredis.Connection)
    tls = connect("rediss://127.0.0.1:1/0")
    assert issubclass(tls.connection_pool.connection_class, aioredis.SSLConnection)
    assert issubclass(tls.connection_pool.connection_class, _InlineSend)
    unix = connect("unix:///tmp/nonexistent.sock")
    assert issubclass(unix.connection_pool.connection_class, aioredis.UnixDomainSocketConnection)
    assert issubclass(unix.connection_pool.connection_class, _InlineSend)
    cluster = connect("redis+cluster://127.0.0.1:1,127.0.0.1:2")
    assert issubclass(cluster.nodes_manager.connection_kwargs["connection_class"], _InlineSend)
    # no pool of its own that blocks: Store.slot is the admission
    assert type(tcp.connection_pool) is aioredis.ConnectionPool
    assert tcp.connection_pool.max_connections == connection.POOL_LIMIT > connection.SLOTS
    assert _inline_send(_inline_send(aioredis.Connection)) is _inline_send(aioredis.Connection)


class _Hanging(_InlineSend, aioredis.Connection):
    """A connection whose socket never takes the bytes."""

    async def _send_packed_command(self, command: Any) -> None:
        await asyncio.sleep(3600)


class _Writer:
    closed = False

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        return None


async def test_a_send_that_hangs_times_out_and_drops_the_connection() -> None:
    conn = _Hanging(host="127.0.0.1", port=1, socket_timeout=0.2)
    conn._writer = _Writer()  # type: ignore[assignment]  # "connected" as far as the send can tell
    conn._reader = object()  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(TimeoutError):
        await conn.send_packed_command(b"PING\r\n", check_health=False)
    assert loop.time() - t0 < 2.0
    assert conn.socket_timeout == 0.2  # restored for the reads that follow
    assert not conn.is_connected  # a half-sent command leaves nothing to reuse


@pytest.mark.redis
async def test_commands_make_no_task_per_send() -> None:
    client = connect(os.environ["REDIS_URL"])
    loop = asyncio.get_running_loop()
    created = 0
    default = loop.get_task_factory()

    def factory(lp: asyncio.AbstractEventLoop, coro: Any, **kw: Any) -> asyncio.Task[Any]:
        nonlocal created
        created += 1
        return default(lp, coro, **kw) if default else asyncio.Task(coro, loop=lp, **kw)

    try:
        await client.ping()  # the connection is made before counting
        loop.set_task_factory(factory)
        for i in range(50):
            await client.set("df:test:inline", str(i))
        assert await client.get("df:test:inline") == b"49"
        await client.delete("df:test:inline")
    finally:
        loop.set_task_factory(default)
        await client.aclose()
        await client.connection_pool.disconnect()
    assert created == 0  # redis-py's own send (asyncio.wait_for) makes one a command on 3.11
