"""Scenario 1: a peer server is SIGKILLed while it uploads pieces to a downloader; the
downloader completes from the other sources and the next download still works."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest

from . import checks
from .harness import MIB, World, await_for

pytestmark = pytest.mark.redis


def _uploading(w: World, tid: str, cid: str) -> bool:
    r = w.redis()
    try:
        return bool(r.zcard(f"df:t:{{{tid}}}:up:{cid}"))
    finally:
        r.close()


def _listening(w: World, home: Path) -> tuple[str, int] | None:
    try:
        return w.peer_server(home)
    except (OSError, AssertionError):
        return None


def _cid_of_port(w: World, tid: str, port: int) -> str | None:
    r = w.redis()
    try:
        for cid, raw in r.hgetall(f"df:t:{{{tid}}}:peers").items():
            if raw.decode().split("|")[2] == str(port):
                return cid.decode()
    finally:
        r.close()
    return None


async def test_peer_killed_mid_upload_downloader_completes(world: World, fault_rng: random.Random) -> None:
    size = 16 * MIB
    origin = world.origin()
    data = origin.put_random("s1.bin", size, seed=11)
    world.supernode()
    url = origin.url("s1.bin")

    # Host A serves slowly (3 MB/s for all its uploads), so B is mid-piece when A dies.
    a = world.host()
    server = world.peer_server_process(a, "--totallimit", "3MB")  # dfget A will reuse it
    _peer_id, port = await await_for(lambda: _listening(world, a), 20, "A's peer server")
    rep_a = checks.ok(await world.dfget(url, world.tmp / "a.bin", a), world.tmp / "a.bin", data)
    tid = rep_a["task_id"]
    cid_a = _cid_of_port(world, tid, port)
    assert cid_a is not None

    b_out = world.tmp / "b.bin"
    b = await world.spawn(url, b_out)
    await await_for(lambda: _uploading(world, tid, cid_a), 20, "A to start uploading to B")
    await asyncio.sleep(fault_rng.uniform(0.1, 0.8))
    server.kill()  # SIGKILL
    rep_b = checks.ok(await b.wait(), b_out, data)
    # the kill landed mid-transfer: B saw A fail, and finished from the other sources
    assert sum(rep_b["peer_failures"].values()) >= 1, rep_b
    assert rep_b["back_to_source"] is None and rep_b["bytes_from_origin"] == 0
    assert checks.transferred(rep_b) == size  # no piece counted twice

    # State left consistent: a third host downloads the same file.
    c_out = world.tmp / "c.bin"
    rep_c = checks.ok(await world.dfget(url, c_out), c_out, data)
    assert rep_c["back_to_source"] is None
    assert origin.served("s1.bin") == (size, 1)  # the origin was asked once, in all
