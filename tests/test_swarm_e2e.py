"""The swarm harness end to end (bench/swarm.py, the same code `python -m bench.swarm`
runs): a counting origin, the real supernode, 4 real dfget hosts each with its own peer
server on its own 127.0.0.x, all started together."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from bench import swarm

MIB = 1 << 20
SIZE = 24 * MIB  # 6 pieces of 4 MiB
N = 4


def _assert_all_stopped(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        # a zombie of ours would still answer kill(0): check its state
        stat = Path(f"/proc/{pid}/stat").read_text().split()
        assert stat[2] == "Z", f"process {pid} still running"


async def test_four_hosts_origin_once_peers_share(tmp_path: Path) -> None:
    # caps slow enough that pieces overlap in time (peers must share), fast enough for CI
    caps = swarm.Caps(origin=40 * MIB, cdn_up=8 * MIB, peer_down=8 * MIB, peer_up=8 * MIB)
    files = tmp_path / "files"
    want = swarm.make_blob(files / "blob", SIZE)
    cluster = swarm.Cluster(tmp_path / "run", files, caps, redis_url=None)
    pids: list[int] = []
    try:
        await asyncio.to_thread(cluster.start_origin)
        await asyncio.to_thread(cluster.start_supernode)
        await asyncio.to_thread(cluster.start_peer_servers, N)
        assert len({h.ip for h in cluster.hosts}) == N
        results = await swarm.run_swarm(cluster, cluster.origin_url("blob", "t"),
                                        tmp_path / "out", timeout=90)
        origin_bytes = cluster.origin_stats()["bytes_sent"]
        outputs = [tmp_path / "out" / f"host{k + 1}" for k in range(N)]
        assert all(r.ok for r in results), [r.error for r in results]
        assert all(swarm.sha256_file(p) == want for p in outputs)
        assert origin_bytes == SIZE  # the origin served the file exactly once
        assert not any(r.back_to_source for r in results)
        assert all(r.bytes_from_peers + r.bytes_from_supernode == SIZE for r in results)
        assert sum(r.bytes_from_peers for r in results) > 0  # peers served each other
        s = swarm.summarize(results, SIZE, origin_bytes, 1.0, 0.0, N)
        assert s["origin_ratio"] == 1.0 and s["ok"] == N
    finally:
        pids = [p.pid for p in cluster.procs] + [h.server_pid for h in cluster.hosts]
        cluster.close()
    _assert_all_stopped(pids)


def test_lower_bound_and_percentiles() -> None:
    caps = swarm.Caps(origin=50 * MIB, cdn_up=50 * MIB, peer_down=20 * MIB, peer_up=20 * MIB)
    t, term = swarm.lower_bound(256 * MIB, 20, caps)
    assert term == "F/peer_down" and t == pytest.approx(12.8)
    # upload-bound when peers upload slower than they download
    t, term = swarm.lower_bound(100 * MIB, 10, swarm.Caps(0, 10 * MIB, 100 * MIB, 1 * MIB))
    assert term == "N*F/(cdn_up+N*peer_up)" and t == pytest.approx(50.0)
    assert swarm.percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.0
    assert swarm.percentile([3.0, 1.0, 2.0, 4.0], 90) == 4.0
    assert swarm.percentile([5.0], 50) == 5.0
