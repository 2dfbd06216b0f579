"""Overload is back-pressure, never failure: a supernode that may work on only two API
requests at once, and a dozen real dfget hosts starting together. Every request over the
limit is answered 503 busy with Retry-After; dfget waits it out (jittered) instead of
leaving the swarm, so every host finishes through P2P and the origin serves the file
once."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

from bench import swarm

MIB = 1 << 20
SIZE = 24 * MIB
N = 12


async def test_a_dozen_clients_on_a_supernode_allowed_two_requests_all_finish_p2p(tmp_path: Path) -> None:
    caps = swarm.Caps(origin=64 * MIB, cdn_up=16 * MIB, peer_down=0, peer_up=0)
    files = tmp_path / "files"
    want = swarm.make_blob(files / "blob", SIZE)
    cluster = swarm.Cluster(tmp_path / "run", files, caps, redis_url=None)
    try:
        await asyncio.to_thread(cluster.start_origin)
        await asyncio.to_thread(cluster.start_supernode, "--max-requests", "2")
        await asyncio.to_thread(cluster.start_peer_servers, N)
        results = await swarm.run_swarm(cluster, cluster.origin_url("blob", "overload"), tmp_path / "out",
                                        timeout=240)
        assert all(r.ok for r in results), [r.error for r in results]
        assert all(swarm.sha256_file(tmp_path / "out" / f"host{k + 1}") == want for k in range(N))
        assert not any(r.back_to_source for r in results), [r.back_to_source for r in results]
        assert all(r.bytes_from_origin == 0 for r in results)
        assert cluster.origin_stats()["bytes_sent"] == SIZE  # the CDN's one fetch
        with urllib.request.urlopen(f"http://{swarm.LOOPBACK}:{cluster.api_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        # the limit really was hit: requests were shed, and waited out
        shed = [line for line in metrics.splitlines()
                if line.startswith("supernode_requests_total{") and 'status="503"' in line]
        assert shed and sum(float(line.rsplit(" ", 1)[1]) for line in shed) > 0, shed
    finally:
        cluster.close()


async def test_a_supernode_that_answers_late_is_waited_for_not_left_for_the_origin(tmp_path: Path) -> None:
    """The supernode is paused (SIGSTOP: what a saturated host or a long pause looks like
    from outside) for longer than dfget's register timeout. Its kernel still takes the
    connections, so dfget's request times out instead of being refused: dfget asks again
    (SLOW_BUDGET) and, once the supernode runs again, downloads through it. The origin
    serves the file once, to the CDN."""
    import os
    import signal

    from dfget.supernodes import REGISTER_TIMEOUT, SLOW_BUDGET

    caps = swarm.Caps(origin=64 * MIB, cdn_up=64 * MIB, peer_down=0, peer_up=0)
    files = tmp_path / "files"
    want = swarm.make_blob(files / "blob", 4 * MIB)
    cluster = swarm.Cluster(tmp_path / "run", files, caps, redis_url=None)
    try:
        await asyncio.to_thread(cluster.start_origin)
        await asyncio.to_thread(cluster.start_supernode)
        sn = cluster.procs[-1]
        await asyncio.to_thread(cluster.start_peer_servers, 1)
        pause = REGISTER_TIMEOUT + 4
        assert pause < SLOW_BUDGET
        os.kill(sn.pid, signal.SIGSTOP)
        try:
            job = asyncio.ensure_future(swarm.run_swarm(cluster, cluster.origin_url("blob", "late"), tmp_path / "out",
                                                        timeout=pause + 60))
            await asyncio.sleep(pause)
            assert not job.done()  # still waiting for the supernode, not at the origin
        finally:
            os.kill(sn.pid, signal.SIGCONT)
        (r,) = await job
        assert r.ok, r.error
        assert not r.back_to_source and r.bytes_from_origin == 0
        assert r.seconds > REGISTER_TIMEOUT  # it really waited out a timeout
        assert swarm.sha256_file(tmp_path / "out" / "host1") == want
        assert cluster.origin_stats()["bytes_sent"] == 4 * MIB
    finally:
        cluster.close()
