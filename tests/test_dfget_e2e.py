"""End to end with real processes: an origin (in-process aiohttp), the real supernode
(`python -m supernode`), several dfget with their own --home and peer servers."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import free_ports
from dfget_support import PY, origin_app, run_dfget, start_app, stop_server


def blob(n: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(str(i).encode()).digest()
        i += 1
    return bytes(out[:n])


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files: dict[str, bytes] = {}
        self.homes: list[Path] = []
        self.runner: web.AppRunner | None = None
        self.sn: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.runner, self.origin_port = await start_app(origin_app(self.files))
        self.api, dl = free_ports(2)
        log = open(self.tmp / "supernode.log", "wb")
        self.sn = await asyncio.create_subprocess_exec(
            PY, "-m", "supernode", "--port", str(self.api), "--download-port", str(dl),
            "--home", str(self.tmp / "sn"), "--advertise-ip", "127.0.0.1",
            "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8", stdout=log, stderr=log)
        log.close()
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"http://127.0.0.1:{self.api}/_ping") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                if self.sn.returncode is not None:
                    break
                await asyncio.sleep(0.05)
        pytest.fail("the supernode did not start: " + (self.tmp / "supernode.log").read_text()[-500:])

    def add(self, name: str, data: bytes) -> str:
        self.files["/" + name] = data
        return f"http://127.0.0.1:{self.origin_port}/{name}"

    def args(self, url: str, out: Path, *extra: str) -> list[str]:
        home = self.tmp / f"home{len(self.homes)}"
        self.homes.append(home)
        return ["-u", url, "-o", str(out), "-n", f"127.0.0.1:{self.api}", "--home", str(home),
                "--ip", "127.0.0.1", "--json", "-s", "0", *extra]

    async def close(self) -> None:
        for h in self.homes:
            await stop_server(h)
        if self.sn is not None and self.sn.returncode is None:
            self.sn.terminate()
            try:
                await asyncio.wait_for(self.sn.wait(), 10)
            except TimeoutError:
                self.sn.kill()
                await self.sn.wait()
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.start()
    yield w
    await w.close()


MIB = 1 << 20


async def test_sizes_identical_bytes(world: World) -> None:
    for size in (0, 1, 4 * MIB + 7, 9 * MIB):
        url = world.add(f"f{size}", blob(size))
        out = world.tmp / f"out{size}"
        r = await run_dfget(*world.args(url, out))
        assert r.code == 0, r.stderr
        assert out.read_bytes() == world.files[f"/f{size}"], size
        assert r.report["back_to_source"] is None
        assert r.report["length"] == size


async def test_second_dfget_fetches_from_first_peer(world: World) -> None:
    url = world.add("shared", blob(13 * MIB))
    r1 = await run_dfget(*world.args(url, world.tmp / "a"))
    assert r1.code == 0, r1.stderr
    r2 = await run_dfget(*world.args(url, world.tmp / "b"))
    assert r2.code == 0, r2.stderr
    assert (world.tmp / "b").read_bytes() == world.files["/shared"]
    assert r2.report["bytes_from_peers"] > 0


async def test_peer_killed_mid_transfer_download_completes(world: World) -> None:
    url = world.add("k", blob(24 * MIB))
    r1 = await run_dfget(*world.args(url, world.tmp / "a"))
    assert r1.code == 0, r1.stderr
    first_home = world.homes[0]
    # The second download is slow (rate limit) and gets pieces from the first peer,
    # whose server is killed while it runs.
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "dfget", *world.args(url, world.tmp / "b", "-s", "8MB", "--minrate", "1MB"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)
    assert await stop_server(first_home) is not None
    out, err = await asyncio.wait_for(proc.communicate(), 100)
    assert proc.returncode == 0, err.decode()
    assert (world.tmp / "b").read_bytes() == world.files["/k"]
