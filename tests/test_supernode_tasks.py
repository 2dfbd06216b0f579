"""supernode/tasks.py: background tasks are owned, cancelled and awaited at close, and
waiting for them never swallows the waiter's own cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from supernode.tasks import TaskOwner, cancel_and_wait

log = logging.getLogger("test.tasks")


async def test_close_cancels_and_awaits_every_task() -> None:
    owner = TaskOwner(log)
    cleaned: list[str] = []

    async def loop(name: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.sleep(0)  # cleanup that itself awaits still runs to the end
            cleaned.append(name)

    a = owner.start("a", loop("a"), name="a")
    owner.start("b", loop("b"), name="b")
    await asyncio.sleep(0)
    assert set(owner) == {"a", "b"} and owner["a"] is a and "a" in owner
    await owner.close()
    assert sorted(cleaned) == ["a", "b"] and len(owner) == 0 and a.cancelled()


async def test_a_task_that_ends_leaves_the_owner_and_a_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner(log)

    async def boom() -> None:
        raise RuntimeError("bug")

    async def fine() -> None:
        return None

    t1, t2 = owner.start(1, boom(), name="boom"), owner.start(2, fine(), name="fine")
    with caplog.at_level(logging.ERROR, logger="test.tasks"):
        await asyncio.wait([t1, t2])
        await asyncio.sleep(0)  # done callbacks
    assert len(owner) == 0
    assert [r.getMessage() for r in caplog.records] == ["background task boom failed"]
    assert caplog.records[0].exc_info is not None


async def test_waiting_does_not_swallow_the_waiters_cancellation() -> None:
    stubborn_release = asyncio.Event()

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            await stubborn_release.wait()  # slow cleanup: the waiter is still waiting

    child = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    waiter = asyncio.create_task(cancel_and_wait(child))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    stubborn_release.set()
    await asyncio.wait([child])
    assert child.cancelled()
