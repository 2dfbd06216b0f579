"""Owners of background tasks: every task the supernode starts outside a request belongs
to one `TaskOwner` (the app's loops, the CDN's fetches and lease watchers, the cache
repairs), which keeps a reference until the task ends and, at shutdown, cancels every
task and waits for all of them.

Waiting uses `asyncio.wait`, which neither raises a task's own exception nor swallows a
cancellation of the waiting task (`contextlib.suppress(BaseException)` around
`await task` did both). A task that fails with an exception is logged, with its
traceback, when it fails.

Imports nothing of the supernode: any layer may use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Hashable, Iterator, Mapping
from typing import Any


class TaskOwner(Mapping[Hashable, "asyncio.Task[Any]"]):
    """The running tasks by key (a task id, a name); a read-only mapping."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self._tasks: dict[Hashable, asyncio.Task[Any]] = {}

    def start(self, key: Hashable, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks[key] = task
        task.add_done_callback(lambda t, k=key: self._ended(k, t))
        return task

    def _ended(self, key: Hashable, task: asyncio.Task[Any]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.log.error("background task %s failed", task.get_name(), exc_info=exc)

    def __getitem__(self, key: Hashable) -> asyncio.Task[Any]:
        return self._tasks[key]

    def __iter__(self) -> Iterator[Hashable]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self) -> None:
        """Cancel every task and wait until all have ended."""
        await cancel_and_wait(*self._tasks.values())


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Cancel the tasks (those not done) and wait until all have ended. Their outcome is
    their owner's business: a task that was awaited has already raised, and the rest are
    logged by their TaskOwner."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: asyncio would log it again at garbage collection
