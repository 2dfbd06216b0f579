"""Screenshot of the supernode dashboard in the middle of a real swarm download.

    python -m bench.dashboard [--out docs/dashboard.png] [--clients 4] [--size 96MiB]

Starts on loopback only (bench/swarm.py's Cluster): a capped origin, a supernode
(embedded store, or --redis-url), N hosts with their own peer servers on 127.0.0.x, and
one dfget per host; opens /ui in headless Chromium (Debian's `chromium`), selects the
task, waits until hosts hold pieces and fetches are in flight, and saves the page as a
PNG. Everything is stopped at the end. This writes the picture kept in docs/; the test
suite never does.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from common.units import parse_size

from .cdp import Chromium
from .swarm import MIB, Caps, Cluster, make_blob, run_swarm

READY_JS = """(() => {
  const rows = [...document.querySelectorAll('#piecemap .maprow')].slice(1);
  const held = rows.map(r => +r.dataset.held);
  return rows.length >= %d && held.filter(h => h > 0).length >= 2
    && held.some(h => h < +rows[0].dataset.count)
    && document.querySelectorAll('#inflight tbody tr').length >= 2
    && document.querySelectorAll('#peers tbody tr').length >= %d; })()"""


async def shoot(out: Path, clients: int, size: int, redis_url: str | None, workdir: Path) -> Path:
    # slow enough that the picture catches the swarm mid-way: ~8 s per host at 12 MiB/s
    caps = Caps(origin=24 * MIB, cdn_up=16 * MIB, peer_down=12 * MIB, peer_up=8 * MIB)
    files = workdir / "files"
    make_blob(files / "model.bin", size)
    cluster = Cluster(workdir / "run", files, caps, redis_url=redis_url)
    try:
        await asyncio.to_thread(cluster.start_origin)
        await asyncio.to_thread(cluster.start_supernode)
        await asyncio.to_thread(cluster.start_peer_servers, clients)
        ui = f"http://127.0.0.1:{cluster.api_port}/ui"
        async with Chromium(workdir / "browser", width=1440, height=900) as b:
            await b.navigate(ui)
            swarm = asyncio.create_task(
                run_swarm(cluster, cluster.origin_url("model.bin", "shot"), workdir / "out", 300))
            try:
                tid = await b.wait_for(
                    "document.querySelector('#tasks tbody tr[data-task-id]')?.dataset.taskId", 30)
                await b.evaluate(f"document.querySelector('tr[data-task-id=\"{tid}\"]').click()")
                await b.wait_for(READY_JS % (clients, clients), 60)
                await asyncio.sleep(0.3)  # let the last poll's repaint land
                await b.screenshot(out)
            finally:
                results = await swarm
            if b.errors:
                raise RuntimeError(f"page errors: {b.errors}")
        failed = [r.error for r in results if not r.ok]
        if failed:
            raise RuntimeError(f"downloads failed: {failed}")
        return out
    finally:
        cluster.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dashboard",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--size", default="96MiB")
    p.add_argument("--redis-url", default=None, help="default: the supernode's embedded store")
    args = p.parse_args(argv)
    if not 2 <= args.clients <= 20:
        p.error("--clients must be 2..20")
    workdir = Path(tempfile.mkdtemp(prefix="df-dashboard-"))
    try:
        out = asyncio.run(shoot(args.out, args.clients, parse_size(args.size), args.redis_url,
                                workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
