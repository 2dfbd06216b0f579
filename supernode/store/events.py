"""Long-poll wake-ups through Redis pub/sub: no busy polling, cluster-wide.

Every state change of a task is published on `df:ev:{T}` (by the Lua scripts, whichever
supernode ran them) as its change log (supernode/scheduling/view.py). One pub/sub connection per
supernode hands each message to `on_event` (the views, which replay it), and the views
call `wake` with what the change made: n new pieces or free slots wake the n (at least
`wake_batch`) longest-waiting pulls, so 200 waiting clients do not all re-schedule for
one freed slot; a status change wakes all of them.
A generation counter per task closes the race between reading state and starting to
wait: a pull remembers the generation before it reads, and returns at once if an event
arrived in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from . import keys
from .connection import raise_if_cancelled

log = logging.getLogger("supernode.events")


class EventHub:
    def __init__(self, client: Any, *, wake_batch: int = 8) -> None:
        self.client = client
        self.wake_batch = wake_batch
        self.on_event: Callable[[str, str], None] | None = None  # (task id, message)
        self.on_gap: Callable[[], None] | None = None  # messages may have been lost
        self._gen: dict[str, int] = {}
        self._waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self.connected = asyncio.Event()

    def generation(self, task_id: str) -> int:
        return self._gen.get(task_id, 0)

    async def wait(self, task_id: str, since: int, timeout: float,
                   parked: asyncio.Future[None] | None = None) -> bool:
        """Wait for an event on the task after generation `since`; False on timeout. A
        `parked` place (see `park`) is waited on instead: it was queued before the
        change that might have come since, so that change woke it or left it asleep."""
        if parked is None:
            if self._gen.get(task_id, 0) != since:
                return True
            parked = self.park(task_id)
        try:
            await asyncio.wait_for(parked, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.unpark(task_id, parked)

    def park(self, task_id: str) -> asyncio.Future[None]:
        """A place in the task's queue of waiting pulls, taken now: a pull that found
        nothing queues before its round's own change is applied, so that change wakes it
        only if it is among the first `new` in line (and does not make every pull of the
        round look again)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(task_id, deque()).append(fut)
        return fut

    def unpark(self, task_id: str, fut: asyncio.Future[None]) -> None:
        """Give up a place: a woken one is out of the queue already (no search)."""
        woken = fut.done() and not fut.cancelled()
        if not fut.done():
            fut.cancel()
        q = self._waiters.get(task_id)
        if q is None:
            return
        if not woken:
            with contextlib.suppress(ValueError):
                q.remove(fut)
        if not q:
            self._waiters.pop(task_id, None)

    def wake(self, task_id: str, new: int) -> None:
        """Something changed in the task: `new` pieces or slots appeared (-1: its status
        changed). Waiters re-read, so waking one too many costs one look."""
        self._gen[task_id] = self._gen.get(task_id, 0) + 1
        q = self._waiters.get(task_id)
        if not q or new == 0:
            return
        n = len(q) if new < 0 else max(self.wake_batch, new)
        while q and n > 0:
            fut = q.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def wake_all(self) -> None:
        for task_id in list(self._waiters):
            self.wake(task_id, -1)

    def forget(self, task_id: str) -> None:
        if task_id not in self._waiters:
            self._gen.pop(task_id, None)

    async def run_local(self) -> None:
        """Embedded store: events arrive through `dispatch` from the store itself."""
        self.connected.set()
        await asyncio.Event().wait()

    async def run(self) -> None:
        """Listen forever; reconnect with backoff; wake everyone after a gap."""
        delay = 0.1
        while True:
            pubsub = None
            try:
                if hasattr(self.client, "nodes_manager"):
                    # Redis Cluster: its pub/sub picks a node by slot, so the slot map must
                    # be loaded first (idempotent); any master receives every PUBLISH
                    await self.client.initialize()
                pubsub = self.client.pubsub()
                await pubsub.psubscribe(keys.EVENT_PATTERN)
                self.connected.set()
                if self.on_gap is not None:
                    self.on_gap()  # events may have been missed while disconnected
                self.wake_all()
                delay = 0.1
                while True:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
                    raise_if_cancelled()  # redis-py may have swallowed a cancellation
                    if msg is None:
                        continue
                    channel = msg["channel"]
                    channel = channel.decode() if isinstance(channel, bytes) else channel
                    task_id = keys.task_of_event_channel(channel)
                    if task_id and self.on_event is not None:
                        data = msg["data"]
                        self.on_event(task_id, data.decode() if isinstance(data, bytes) else str(data))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any transport failure: reconnect
                self.connected.clear()
                log.warning("event subscription lost (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
