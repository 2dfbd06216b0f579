"""Scenario 6: dfget is SIGKILLed at a random point of its download (seeded: see
--fault-seed) and run again with the same output and home: it resumes from its part
file as the same client, keeping every piece it had verified, and finishes with the
origin's bytes without waiting for the dead run's assignments to expire."""

from __future__ import annotations

import asyncio
import random

import pytest

from . import checks
from .harness import MIB, World, await_for, most_pieces_held

pytestmark = pytest.mark.redis


@pytest.mark.regression
async def test_dfget_sigkilled_at_random_point_resumes(world: World, fault_rng: random.Random) -> None:
    size = 24 * MIB  # 6 pieces, ~2 s at 12 MB/s
    origin = world.origin()
    data = origin.put_random("k.bin", size, seed=81)
    world.supernode()
    url = origin.url("k.bin")
    home = world.host()
    out = world.tmp / "k.bin"

    d = await world.spawn(url, out, home, "-s", "12MB")
    def part_and_cid() -> bool:  # the part file and who wrote it (two separate steps)
        parts = checks.parts(out)
        return bool(parts) and parts[0].with_name(parts[0].name + ".cid").exists()

    await await_for(part_and_cid, 20, "the part file and its .cid")
    await asyncio.sleep(fault_rng.uniform(0.0, 1.8))
    d.kill()
    first = await d.wait()
    if first.code == 0:  # it finished before the kill: nothing to resume, still correct
        checks.ok(first, out, data)
        return
    if out.exists():  # killed after the atomic rename, while sending its last report
        assert out.read_bytes() == data, "a killed dfget left a wrong output file"
        assert not checks.parts(out)
        return
    assert first.code == -9, first.stderr
    assert not out.exists(), "a killed dfget left an output file"
    part = checks.parts(out)[0]
    tid = part.name.rsplit(".", 2)[-2]  # .<name>.<task id prefix>.dfget-part
    cid = part.with_name(part.name + ".cid").read_text().strip()  # who it was
    r = world.redis()
    try:
        full = next(t.decode() for t in r.zrange("df:tasks", 0, -1) if t.decode().startswith(tid))
    finally:
        r.close()
    verified = most_pieces_held(world, full)  # pieces it had verified and reported before dying

    rep = checks.ok(await world.dfget(url, out, home), out, data)
    assert rep["pieces_resumed"] >= verified, (rep, verified)
    assert rep["bytes_resumed"] + checks.transferred(rep) == size
    assert origin.served("k.bin") == (size, 1)
    # the second run was the same client (so what the dead one had assigned was released)
    r = world.redis()
    try:
        peers = {c.decode(): v.decode().split("|")[0] for c, v in r.hgetall(f"df:t:{{{full}}}:peers").items()}
        if len(peers) == 2 and cid in peers:
            # Killed before the peer server it was starting (under a peer id it chose) came
            # up: the second run started one under another id, and a client id is never
            # taken over by another peer: the new client is under another peer id.
            (new,) = [c for c in peers if c != cid]
            assert peers[new] != peers[cid], peers
        else:
            assert list(peers) == [cid], peers
    finally:
        r.close()
    assert not list(world.tmp.glob(".k.bin*")), "resume files left after success"
