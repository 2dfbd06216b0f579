"""The views this supernode keeps (supernode/scheduling/view.py): loaded on a task's first pull here,
fed by every event (the store's replies and pub/sub), reloaded after a gap, dropped
when idle or deleted."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict

from supernode.store.events import EventHub
from supernode.store.repo import Repo

from .view import TaskView

log = logging.getLogger("supernode.views")
IDLE_S = 120.0  # a view not used for this long is dropped (reloaded on the next pull)
MAX_VIEWS = 2048
_SEEN_CAP = 20_000


class Views:
    def __init__(self, repo: Repo, hub: EventHub, *, peer_cap: int = 0) -> None:
        self.repo = repo
        self.peer_cap = peer_cap  # a peer's upload cap: what TaskView.free counts against
        self.hub = hub
        self.views: OrderedDict[str, TaskView] = OrderedDict()  # least recently used first
        self._used: dict[str, float] = {}
        self._loading: dict[str, list[tuple[int, list[str]]]] = {}  # events during a load
        self._load_tasks: dict[str, asyncio.Future[TaskView | None]] = {}
        self._seen: OrderedDict[str, int] = OrderedDict()  # last seq per task without a view
        self.loads = 0  # full loads so far (a metric: reloads mean lost events)

    # --- events -------------------------------------------------------------------------
    def on_event(self, task_id: str, message: str) -> None:
        head, _, rest = message.partition("\n")
        if not head.isdigit():
            return  # not ours
        seq, ops = int(head), rest.split("\n") if rest else []
        buf = self._loading.get(task_id)
        if buf is not None:
            buf.append((seq, ops))
        view = self.views.get(task_id)
        if view is not None:
            new = view.offer(seq, ops, time.monotonic())
            if view.deleted:
                self.drop(task_id)
            self.hub.wake(task_id, new)
            return
        last = self._seen.get(task_id, 0)
        if seq <= last:
            return  # our own change, already handed over by the store
        self._seen[task_id] = seq
        self._seen.move_to_end(task_id)
        if len(self._seen) > _SEEN_CAP:
            self._seen.popitem(last=False)
        self.hub.wake(task_id, _status_or_new(ops))

    def invalidate_all(self) -> None:
        """Pub/sub (re)connected: what was missed meanwhile is unknown."""
        for view in self.views.values():
            view.stale = True

    def drop(self, task_id: str) -> None:
        self.views.pop(task_id, None)
        self._used.pop(task_id, None)

    # --- access -------------------------------------------------------------------------
    async def get(self, task_id: str) -> TaskView | None:
        """The task's view, current as far as this process knows (None: no such task)."""
        now = time.monotonic()
        view = self.views.get(task_id)
        if view is not None and (view.stale or view.gap_expired(now)):
            if view.gap_expired(now):
                log.info("task %s: event %d never arrived; reloading", task_id[:12], view.seq + 1)
            self.drop(task_id)
            view = None
        if view is None:
            view = await self._load(task_id)
            if view is None:
                return None
        self._used[task_id] = now
        self.views.move_to_end(task_id)
        if view.meta_stale:
            view.meta_stale = False  # before the read: a change during it marks it again
            meta = await self.repo.get_meta(task_id)
            if meta is None:
                self.drop(task_id)
                return None
            view.meta = meta
        self._evict(now)
        return view

    async def reload(self, task_id: str) -> TaskView | None:
        self.drop(task_id)
        return await self.get(task_id)

    async def _load(self, task_id: str) -> TaskView | None:
        fut = self._load_tasks.get(task_id)
        if fut is None:
            fut = asyncio.ensure_future(self._do_load(task_id))
            self._load_tasks[task_id] = fut
            fut.add_done_callback(lambda _: self._load_tasks.pop(task_id, None))
        return await asyncio.shield(fut)

    async def _do_load(self, task_id: str) -> TaskView | None:
        self._loading[task_id] = buf = []
        try:
            data = await self.repo.load_view(task_id)
        finally:
            self._loading.pop(task_id, None)
        self.loads += 1
        if data is None:
            return None
        view = TaskView.load(**data, now=time.monotonic(), peer_cap=self.peer_cap)
        now = time.monotonic()
        for seq, ops in sorted(buf, key=lambda e: e[0]):
            view.offer(seq, ops, now)  # those after the load's instant
        if not view.deleted:
            self.views[task_id] = view
            self._seen.pop(task_id, None)
        return view

    def _evict(self, now: float) -> None:
        while self.views:
            tid, _ = next(iter(self.views.items()))
            if len(self.views) <= MAX_VIEWS and now - self._used.get(tid, now) < IDLE_S:
                break
            self.drop(tid)


def _status_or_new(ops: list[str]) -> int:
    new = 0
    for op in ops:
        c = op[:1]
        if c in "MAZ":
            return -1
        if c in "HGRD":
            new += 1
    return new
