"""Scenario 2: the supernode is restarted (same Redis, same --home, same ports) while a
dfget downloads, with pieces in flight and others not yet assigned. dfget carries on
with the restarted supernode (waiting for it and registering again under the same
client id when a request failed meanwhile), keeps every piece it had, and the origin is
not asked again."""

from __future__ import annotations

import asyncio
import random

import pytest

from . import checks
from .harness import MIB, World, await_for, most_pieces_held

pytestmark = pytest.mark.redis


def _in_flight(w: World, tid: str) -> int:
    r = w.redis()
    try:
        cids = [c.decode() for c in r.hkeys(f"df:t:{{{tid}}}:peers")]
        return max((r.hlen(f"df:t:{{{tid}}}:fly:{c}") for c in cids), default=0)
    finally:
        r.close()


def _task_ids(w: World) -> list[str]:
    r = w.redis()
    try:
        return [t.decode() for t in r.zrange("df:tasks", 0, -1)]
    finally:
        r.close()


@pytest.mark.regression
@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
async def test_supernode_restart_mid_download(world: World, fault_rng: random.Random, how: str) -> None:
    size = 24 * MIB  # 6 pieces; dfget at 8 MB/s is mid-download for ~3 s
    origin = world.origin()
    data = origin.put_random("s2.bin", size, seed=21)
    sn = world.supernode("--shutdown-timeout", "1s")
    url = origin.url("s2.bin")
    out = world.tmp / "out.bin"

    d = await world.spawn(url, out, None, "-s", "8MB", "--verbose")
    tids = await await_for(lambda: _task_ids(world), 20, "the task to be registered")
    # the CDN has the whole file first: this scenario is about the download (a supernode
    # killed mid-fetch, before its first cache sidecar, fetches again from the start)
    await await_for(lambda: sn.task(tids[0])["task"]["status"] == "success", 20, "the CDN copy")
    await await_for(lambda: _in_flight(world, tids[0]) >= 4 and most_pieces_held(world, tids[0]) == 0,
                    20, "the first four pieces in flight (two not assigned yet)")
    await asyncio.sleep(fault_rng.uniform(0.0, 0.5))
    if how == "sigkill":
        sn.kill()
    else:
        assert sn.stop() == 0
    await asyncio.to_thread(sn.start)
    # still running: it needed the supernode for the pieces not yet assigned when it died
    assert d.proc.returncode is None, "the download ended while no supernode was up"
    r = await d.wait()
    rep = checks.ok(r, out, data)

    # (it may or may not have needed a failover: a request made after the restart on a
    # fresh connection just works, with the same cid, since the state is in Redis)
    assert rep["back_to_source"] is None and rep["bytes_from_origin"] == 0
    # every piece was fetched exactly once: none re-downloaded after the restart
    assert checks.transferred(rep) == size, rep
    assert origin.served("s2.bin") == (size, 1), "the origin was asked twice"
    assert "Traceback" not in sn.log_text()

    # the restarted supernode serves the next download of the same file
    out2 = world.tmp / "again.bin"
    checks.ok(await world.dfget(url, out2), out2, data)
    assert origin.served("s2.bin") == (size, 1)
