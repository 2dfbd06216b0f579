"""Going back to the origin is never silent, real processes (origin, supernode, dfget and
its peer server): one line on stderr with the reason, the reason in --json, and a count
by reason on the peer server's and (when one answered) the supernode's /metrics."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
from conftest import file_bytes, free_port
from dfget_support import run_dfget, stop_server

from dfget.server.launcher import ControlClient, PeerServerError

MIB = 1 << 20


async def _metric(url: str, name: str, reason: str) -> float:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
    m = re.search(rf'^{name}\{{reason="{reason}"\}} (\S+)$', text, re.M)
    assert m, f"{name}{{reason={reason}}} not in {url}:\n{text}"
    return float(m.group(1))


async def _peer_metrics_url(home: Path) -> str:
    """dfget does not wait for a peer server it starts to come up: it may still be starting."""
    client = ControlClient(home)
    try:
        for _ in range(200):
            try:
                info = await client.info()
                break
            except PeerServerError:
                await asyncio.sleep(0.05)
        else:
            info = await client.info()
    finally:
        await client.close()
    return f"http://{info.ip}:{info.port}/metrics"


def _origin_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "downloading from the origin" in ln]


async def test_no_supernode_says_so_and_the_peer_server_counts_it(origin, tmp_path: Path) -> None:
    size = 300 * 1024 + 7
    origin.put_random("a.bin", size, seed=61)
    out, home = tmp_path / "a.bin", tmp_path / "home"
    dead = f"127.0.0.1:{free_port()}"
    try:
        r = await run_dfget("-u", origin.url("a.bin"), "-o", str(out), "-n", dead, "--home", str(home),
                            "--ip", "127.0.0.1", "--json")
        assert r.code == 0, r.stderr
        assert out.read_bytes() == file_bytes(size, 61)
        lines = _origin_lines(r.stderr)
        assert len(lines) == 1 and lines[0].startswith("dfget: downloading from the origin: no supernode"), r.stderr
        assert dead in lines[0]  # the reason names who did not answer
        assert str(r.report["back_to_source"]).startswith("no supernode")
        assert r.report["bytes_from_origin"] == size
        peer = await _peer_metrics_url(home)
        assert await _metric(peer, "dfget_peer_back_to_source_total", "no_supernode") == 1
        assert await _metric(peer, "dfget_peer_back_to_source_total", "p2p_failed") == 0
    finally:
        await stop_server(home)


async def test_a_stalled_swarm_is_counted_by_the_supernode_and_the_peer_server(
        supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The supernode answers but its CDN fetch stalls (the origin's first answer sends
    headers then nothing): dfget gives up on P2P after --stall-timeout, tells the supernode
    and its peer server why, and gets the file from the origin (which now answers)."""
    sn = supernode()
    size = 200 * 1024
    origin.put_random("s.bin", size, seed=62)
    url = origin.url("s.bin", mode="stall_after=0", times=1)
    out, home = tmp_path / "s.bin", tmp_path / "home"
    before = await _metric(f"{sn.url}/metrics", "supernode_back_to_source_total", "p2p_failed")
    try:
        r = await run_dfget("-u", url, "-o", str(out), "-n", f"127.0.0.1:{sn.port}", "--home", str(home),
                            "--ip", "127.0.0.1", "--json", "--stall-timeout", "2s", timeout=90)
        assert r.code == 0, r.stderr
        assert out.read_bytes() == file_bytes(size, 62)
        lines = _origin_lines(r.stderr)
        assert len(lines) == 1 and "p2p failed: no piece verified" in lines[0], r.stderr
        assert str(r.report["back_to_source"]).startswith("p2p failed")
        assert await _metric(f"{sn.url}/metrics", "supernode_back_to_source_total", "p2p_failed") == before + 1
        assert await _metric(f"{sn.url}/metrics", "supernode_back_to_source_total", "no_supernode") == 0
        peer = await _peer_metrics_url(home)
        assert await _metric(peer, "dfget_peer_back_to_source_total", "p2p_failed") == 1
    finally:
        await stop_server(home)


async def test_a_p2p_download_prints_nothing_about_the_origin(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()
    origin.put_random("ok.bin", 100 * 1024, seed=63)
    home = tmp_path / "home"
    try:
        r = await run_dfget("-u", origin.url("ok.bin"), "-o", str(tmp_path / "ok.bin"), "-n",
                            f"127.0.0.1:{sn.port}", "--home", str(home), "--ip", "127.0.0.1", "--json")
        assert r.code == 0, r.stderr
        assert r.report["back_to_source"] is None and not _origin_lines(r.stderr), r.stderr
        for reason in ("no_supernode", "p2p_failed", "error", "pattern_source"):
            assert await _metric(f"{sn.url}/metrics", "supernode_back_to_source_total", reason) == 0
    finally:
        await stop_server(home)
