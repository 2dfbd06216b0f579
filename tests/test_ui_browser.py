"""The dashboard in headless Chromium during a real download: a rate-capped origin
(`python -m bench.origin`), the real supernode on the real Redis (REDIS_URL), two real
dfget processes on their own loopback addresses. The page is read through its DOM.

Needs Debian's `chromium`: skipped without it on a developer machine, a failure in CI.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.cdp import Chromium, find_chromium
from conftest import in_ci
from dfget_support import stop_server

MIB = 1 << 20
SIZE = 24 * MIB  # 6 pieces of 4 MiB
HOSTS = ("127.0.0.2", "127.0.0.3")

# the piece map as the page shows it: one entry per row (CDN first, then each client)
MAP_JS = """(() => {
  if (document.getElementById('detail').hidden) return null;
  return [...document.querySelectorAll('#piecemap .maprow')].map(r => ({
    row: r.dataset.row, name: r.querySelector('.name').textContent,
    held: +r.dataset.held, count: +r.dataset.count,
    cells: r.querySelectorAll('.cell').length,
    heldCells: r.querySelectorAll('.cell.held').length,
    fetching: r.querySelectorAll('.cell.fetch-cdn, .cell.fetch-peer').length}));
})()"""
INFLIGHT_JS = """[...document.querySelectorAll('#inflight tbody tr')].map(
  tr => [...tr.cells].map(td => td.textContent))"""


def require_chromium() -> None:
    if find_chromium() is None:
        if in_ci():
            pytest.fail("chromium is not installed (apt-get install chromium): the dashboard "
                        "test cannot run", pytrace=False)
        pytest.skip("chromium is not installed (apt-get install chromium)")


async def start_dfget(url: str, sn_url: str, out: Path, home: Path, ip: str) -> Any:
    # -s: each host downloads at 3 MiB/s, so the download lasts several seconds
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dfget", "-u", url, "-o", str(out), "-n", sn_url.split("//")[1],
        "--home", str(home), "--ip", ip, "--json", "--no-showbar", "-s", "3MB",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_dashboard_follows_a_live_download(tmp_path: Path, origin_factory, supernode) -> None:  # type: ignore[no-untyped-def]
    require_chromium()
    origin = await asyncio.to_thread(origin_factory, 8 * MIB)
    origin.put_random("live.bin", SIZE, seed=5)
    want = hashlib.sha256(origin.dir.joinpath("live.bin").read_bytes()).hexdigest()
    sn = await asyncio.to_thread(supernode)
    homes = [tmp_path / f"host{i}" for i in range(len(HOSTS))]
    procs: list[Any] = []
    try:
        async with Chromium(tmp_path / "browser") as b:
            await b.navigate(sn.url + "/ui")
            assert await b.evaluate("document.title") == "dragonfly-py · supernode"
            url = origin.url("live.bin")
            procs = [await start_dfget(url, sn.url, tmp_path / f"out{i}", homes[i], ip)
                     for i, ip in enumerate(HOSTS)]

            # the task shows up in the list; select it as a person would, by a click
            tid = await b.wait_for(
                "document.querySelector('#tasks tbody tr[data-task-id]')?.dataset.taskId", 20)
            await b.evaluate(f"document.querySelector('tr[data-task-id=\"{tid}\"]').click()")
            assert await b.evaluate("location.hash") == f"#task={tid}"
            row = await b.wait_for(f"""(() => {{
                const tr = document.querySelector('tr[data-task-id="{tid}"]');
                return tr && tr.querySelector('.clients').textContent === '2'
                    && [...tr.cells].map(td => td.textContent); }})()""", 20)
            assert row[2] in ("fetching", "success") and row[3] == "24.0 MiB"
            assert row[4].endswith("/ 6 (" + row[4].split("(")[1])  # "k / 6 (bytes)"

            # mid-download: CDN row + one row per host, pieces held and fetches in flight
            live_map, live_inflight = None, []
            for _ in range(200):  # ~20 s at most
                rows = await b.evaluate(MAP_JS)
                inflight = await b.evaluate(INFLIGHT_JS)
                running = all(p.returncode is None for p in procs)
                clients = rows[1:] if rows else []
                if (running and len(clients) == 2 and inflight
                        and any(0 < c["held"] < 6 for c in clients)):
                    live_map, live_inflight = rows, inflight
                    break
                await asyncio.sleep(0.1)
            assert live_map is not None, f"no live piece map seen; last: {rows}, {inflight}"
            assert live_map[0]["row"] == "cdn" and live_map[0]["count"] == 6
            assert sorted(r["name"].split(":")[0] for r in live_map[1:]) == list(HOSTS)
            for r in live_map:
                assert r["cells"] == 6 and r["heldCells"] == r["held"]
            hosts = {r["name"] for r in live_map[1:]}
            for client, piece, source in live_inflight:
                assert client in hosts and 0 <= int(piece) < 6
                assert source == "CDN" or source in hosts  # where each client fetches from
            assert sum(r["fetching"] for r in live_map[1:]) >= 1 or live_inflight

            # the peers table lists both peer servers with their addresses
            peers = await b.wait_for("""(() => { const a = [...document.querySelectorAll(
                '#peers tbody tr')].map(tr => tr.querySelector('.addr').textContent);
                return a.length >= 2 && a; })()""", 10)
            assert sorted(a.split(":")[0] for a in peers) == list(HOSTS)

            # the downloads finish with the right bytes, and the map fills up
            outs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 90)
            for i, (out, err) in enumerate(outs):
                assert procs[i].returncode == 0, err.decode()[-2000:]
                assert json.loads(out.decode().splitlines()[-1])["length"] == SIZE
                assert hashlib.sha256((tmp_path / f"out{i}").read_bytes()).hexdigest() == want
            final = await b.wait_for(f"""(() => {{ const rows = {MAP_JS};
                return rows && rows.length === 3
                    && rows.every(r => r.held === 6 && r.heldCells === 6) && rows; }})()""", 10)
            assert len(final) == 3
            done = await b.wait_for(f"""(() => {{
                const t = document.querySelector('tr[data-task-id="{tid}"] .done-text');
                return t && t.textContent.includes('12 / 12') && t.textContent; }})()""", 10)
            assert "100%" in done and "48.0 MiB" in done
            assert await b.evaluate("document.getElementById('error').hidden") is True
            assert b.errors == []
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        for home in homes:
            await stop_server(home)


def test_missing_chromium_fails_in_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHROMIUM", "no-such-browser-here")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="chromium is not installed"):
        require_chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_chromium()
