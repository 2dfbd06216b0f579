"""The fetch lease: one supernode at a time fetches a task from its origin.

A fetch runs only while its supernode holds the task's lease in Redis (SET NX PX,
renewed every third of its TTL by `keep`; lost, the fetch is cancelled). A supernode
that finds the lease held by another watches it (`watch_lease`): when the holder dies
its lease expires and the watcher takes the fetch over at once, rather than at some
later pull. A finished task whose seed, the supernode with its CDN copy, died is
watched the same way (`watch_seed`) and seeded again here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from common import errors
from supernode.store.repo import Repo, TaskMeta
from supernode.tasks import TaskOwner

from .cache import PieceCache

log = logging.getLogger("supernode.cdn")


class Leases:
    """This supernode's side of the fetch leases. `running` holds the ids of the tasks
    fetched here; `start(task_id)` starts a fetch, the lease already taken."""

    def __init__(self, repo: Repo, cache: PieceCache, sn_id: str, ttl_ms: int,
                 running: TaskOwner, start: Callable[[str], None]) -> None:
        self.repo, self.cache, self.sn_id, self.ttl_ms = repo, cache, sn_id, ttl_ms
        self.running, self.start = running, start
        self.watchers = TaskOwner(log)  # task id -> the watcher of its lease or seed
        self._seed_checked: dict[str, float] = {}

    async def close(self) -> None:
        await self.watchers.close()

    async def seed_gone(self, meta: TaskMeta, *, fresh: bool = False) -> bool:
        """A finished task whose CDN copy is on no live supernode: its supernode's liveness
        record expired (it died), or it is us without the file (an emptied cache). At
        most one Redis look-up per task a second."""
        now = time.monotonic()
        if not fresh and now - self._seed_checked.get(meta.task_id, -10.0) < 1.0:
            return False
        if len(self._seed_checked) > 10_000:
            self._seed_checked.clear()
        self._seed_checked[meta.task_id] = now
        if meta.cdn == self.sn_id:
            return meta.task_id not in self.cache.entries
        return not meta.cdn or await self.repo.supernode_address(meta.cdn) is None

    def watch(self, task_id: str, watcher: Callable[[], Coroutine[Any, Any, None]]) -> None:
        if task_id not in self.watchers:
            self.watchers.start(task_id, watcher(), name=f"watch-{task_id[:12]}")

    async def watch_seed(self, task_id: str, cdn: str) -> None:
        """One look when the seed's liveness record would expire: if it did (the seed
        died) and the finished task still names it, seed the task here. One-shot: the
        next idle pull arms it again."""
        with contextlib.suppress(errors.StoreError):
            left = await self.repo.supernode_ttl_ms(cdn)
            await asyncio.sleep(min(max(left, 0), 300_000) / 1000 + 0.05)
            meta = await self.repo.get_meta(task_id)
            if (meta is not None and meta.status == "success" and meta.cdn == cdn
                    and task_id not in self.running and await self.seed_gone(meta, fresh=True)
                    and await self.repo.take_lease(task_id, self.sn_id, self.ttl_ms)):
                self.start(task_id)

    async def watch_lease(self, task_id: str) -> None:
        """Sleep until the holder's lease would expire, then try to take it; ends when
        the task is finished, failed, gone or fetched here."""
        while True:
            try:
                left = await self.repo.lease_ttl_ms(task_id)
                await asyncio.sleep(max(left, 0) / 1000 + 0.05)
                meta = await self.repo.get_meta(task_id)
                if meta is None or meta.status in ("success", "failed") or task_id in self.running:
                    return
                if await self.repo.take_lease(task_id, self.sn_id, self.ttl_ms):
                    log.info("task %s: the fetch's lease expired; taking it over", task_id[:12])
                    self.start(task_id)
                    return
            except errors.StoreError:
                await asyncio.sleep(1.0)  # Redis blip: try again, the task is still unfinished

    async def keep(self, task_id: str, owner: asyncio.Task[Any] | None) -> None:
        period = self.ttl_ms / 3000
        while True:
            await asyncio.sleep(period)
            try:
                ttl = self.ttl_ms
                # a renewal that came late (a stalled loop, a Redis blip longer than the
                # TTL) may take back a lease nobody else took: no one else is fetching
                ok = (await self.repo.keep_lease(task_id, self.sn_id, ttl)
                      or await self.repo.take_lease(task_id, self.sn_id, ttl))
            except errors.StoreError:
                continue  # Redis blip: keep fetching; the next renewal decides
            if not ok and owner is not None:
                log.warning("task %s: lease lost, stopping the fetch", task_id[:12])
                owner.cancel()
                return
