"""Scenario 3: the supernode's Redis (our own redis-server, never the shared one) is
killed mid-download and started again on the same port, with its state kept (AOF) or
lost. The supernode reconnects; the download completes with the origin's bytes within
its deadline, and the origin is not asked for the file a second time."""

from __future__ import annotations

import asyncio
import random

import pytest

from . import checks
from .harness import MIB, World, await_for

pytestmark = pytest.mark.redis


def _in_flight(w: World, url: str) -> int:
    r = w.redis(url)
    try:
        tids = [t.decode() for t in r.zrange("df:tasks", 0, -1)]
        best = 0
        for tid in tids:
            for cid in r.hkeys(f"df:t:{{{tid}}}:peers"):
                best = max(best, r.hlen(f"df:t:{{{tid}}}:fly:{cid.decode()}"))
        return best
    finally:
        r.close()


def _cdn_done(w: World, url: str) -> bool:
    r = w.redis(url)
    try:
        tids = [t.decode() for t in r.zrange("df:tasks", 0, -1)]
        return bool(tids) and all(r.hget(f"df:t:{{{t}}}:meta", "status") == b"success" for t in tids)
    finally:
        r.close()


@pytest.mark.regression
@pytest.mark.parametrize("state", ["kept", "lost"])
async def test_redis_restart_mid_download(world: World, fault_rng: random.Random, state: str) -> None:
    size = 24 * MIB
    origin = world.origin()
    data = origin.put_random("s3.bin", size, seed=31)
    rds = world.private_redis(persist=state == "kept")
    sn = world.supernode(redis_url=rds.url)
    url = origin.url("s3.bin")
    out = world.tmp / "out.bin"

    d = await world.spawn(url, out, None, "-s", "8MB", "--verbose")
    await await_for(lambda: _in_flight(world, rds.url) >= 1, 20, "pieces in flight")
    # the CDN copy is whole first: the restart lands on the download (a fetch cut with
    # its lease lost would resume with Range, more origin bytes than this test allows)
    await await_for(lambda: _cdn_done(world, rds.url), 20, "the CDN copy")
    await asyncio.sleep(fault_rng.uniform(0.0, 0.5))
    rds.kill()
    await asyncio.sleep(fault_rng.uniform(0.2, 1.0))
    await asyncio.to_thread(rds.start)
    r = await d.wait()
    rep = checks.ok(r, out, data)
    assert rep["back_to_source"] is None, r.stderr
    assert checks.transferred(rep) == size, rep  # nothing fetched twice
    body, requests = origin.served("s3.bin")
    assert body == size, f"the origin sent {body} bytes in {requests} requests"
    assert "Traceback" not in sn.log_text()

    out2 = world.tmp / "again.bin"
    rep2 = checks.ok(await world.dfget(url, out2), out2, data)
    assert rep2["back_to_source"] is None
    assert origin.served("s3.bin")[0] == size
