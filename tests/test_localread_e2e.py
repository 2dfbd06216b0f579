"""The peer server's local reads and job states, end to end: a real supernode, a real
`dfget server` and real dfget processes; the test reads over the control socket."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from dfget_support import PY
from test_dfget_e2e import World, blob

from common.pieces import DEFAULT_PIECE_SIZE
from common.taskid import task_id
from dfget.server.jobs import verified_until
from dfget.server.protocol import socket_path
from dfget.server.table import FileEntry

MIB = 1 << 20
P = DEFAULT_PIECE_SIZE


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.start()
    yield w
    await w.close()


class Host:
    """A home with its peer server started by the test (so readers can come first)."""

    def __init__(self, world: World) -> None:
        self.world = world
        self.home = world.tmp / f"home{len(world.homes)}"
        world.homes.append(self.home)
        self.server: asyncio.subprocess.Process | None = None
        self.session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.home.mkdir(parents=True)
        log = open(self.home / "test-server.log", "wb")
        self.server = await asyncio.create_subprocess_exec(
            PY, "-m", "dfget", "server", "--home", str(self.home), "--ip", "127.0.0.1", stdout=log, stderr=log)
        log.close()
        self.session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(socket_path(self.home))))
        for _ in range(200):
            try:
                async with self.session.get("http://local/info") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
        pytest.fail("the peer server did not start")

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self.server is not None and self.server.returncode is None:
            self.server.terminate()
            await asyncio.wait_for(self.server.wait(), 15)

    async def job(self, tid: str) -> dict[str, object]:
        assert self.session is not None
        async with self.session.get(f"http://local/local/jobs/{tid}") as r:
            assert r.status == 200
            return await r.json()  # type: ignore[no-any-return]

    async def wait_state(self, tid: str, state: str, timeout: float = 30) -> dict[str, object]:
        for _ in range(int(timeout / 0.05)):
            job = await self.job(tid)
            if job["state"] == state:
                return job
            await asyncio.sleep(0.05)
        pytest.fail(f"job never {state}: {await self.job(tid)}")

    async def dfget(self, url: str, out: Path, *extra: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            PY, "-m", "dfget", "-u", url, "-o", str(out), "-n", f"127.0.0.1:{self.world.api}",
            "--home", str(self.home), "--ip", "127.0.0.1", *extra,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


@pytest.fixture
async def host(world: World) -> AsyncIterator[Host]:
    h = Host(world)
    await h.start()
    yield h
    await h.close()


async def _read(host: Host, tid: str, rng: str | None, got: bytearray, wait: float = 60) -> int:
    assert host.session is not None
    headers = {"Range": rng} if rng else {}
    async with host.session.get(f"http://local/local/read/{tid}?wait={wait}", headers=headers) as r:
        if r.status >= 400:
            await r.read()
            return r.status
        async for chunk in r.content.iter_any():
            got += chunk
        return r.status


async def test_read_waits_for_verified_bytes_and_job_states(world: World, host: Host) -> None:
    data = blob(3 * P + 777)
    url = world.add("slow", data)
    tid = task_id(url)
    assert (await host.job(tid))["state"] == "NotStarted"
    # readers before the download even started: they wait for it
    whole, part = bytearray(), bytearray()
    a, b = P - 10, 2 * P + 10  # unaligned, across pieces
    r1 = asyncio.create_task(_read(host, tid, None, whole))
    r2 = asyncio.create_task(_read(host, tid, f"bytes={a}-{b}", part))
    await asyncio.sleep(0.5)
    assert not r1.done() and not r2.done()
    proc = await host.dfget(url, world.tmp / "out", "-s", "4MB")
    job = await host.wait_state(tid, "Downloading")
    assert job["length"] == len(data)
    assert await asyncio.wait_for(r2, 60) == 206
    assert bytes(part) == data[a:b + 1]
    assert await asyncio.wait_for(r1, 60) == 200
    assert bytes(whole) == data
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    await host.wait_state(tid, "Completed")
    # and a bad range on the finished job
    assert host.session is not None
    async with host.session.get(f"http://local/local/read/{tid}", headers={"Range": f"bytes={len(data)}-"}) as r:
        assert r.status == 416
    async with host.session.get(f"http://local/local/read/{tid}", headers={"Range": "bytes=5-1"}) as r:
        assert r.status == 400
    async with host.session.get(f"http://local/local/read/{tid}?wait=-1") as r:
        assert r.status == 400
    async with host.session.get(f"http://local/local/read/{'0' * 64}?wait=0.2") as r:
        assert r.status == 404
    # none of it is on the peer port that remote peers dial
    async with host.session.get("http://local/info") as r:
        port = (await r.json())["port"]
    async with aiohttp.ClientSession() as tcp:
        for path in (f"/local/read/{tid}", f"/local/jobs/{tid}", "/local/jobs", "/files"):
            async with tcp.get(f"http://127.0.0.1:{port}{path}") as r:
                assert r.status == 404, path
        async with tcp.post(f"http://127.0.0.1:{port}/local/jobs/{tid}/invalidate") as r:
            assert r.status in (404, 405)
    assert (await host.job(tid))["state"] == "Completed"


async def test_invalidate_cancels_the_download_and_its_readers(world: World, host: Host) -> None:
    data = blob(6 * P)
    url = world.add("inv", data)
    tid = task_id(url)
    proc = await host.dfget(url, world.tmp / "out", "-s", "2MB", "--notbs")
    await host.wait_state(tid, "Downloading")
    got = bytearray()
    reader = asyncio.create_task(_read(host, tid, None, got))
    for _ in range(400):  # until some bytes were verified (and sent)
        if (await host.job(tid)).get("verified_prefix", 0) >= P:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    assert host.session is not None
    async with host.session.post(f"http://local/local/jobs/{tid}/invalidate") as r:
        assert r.status == 200
        assert (await r.json())["was"] == "Downloading"
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(reader, 30)
    assert 0 < len(got) < len(data)
    assert bytes(got) == data[:len(got)]  # verified bytes only, then the cut
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode != 0
    assert "invalidated" in err.decode()
    assert not (world.tmp / "out").exists()
    job = await host.job(tid)
    assert job["state"] == "Invalid"
    async with host.session.get(f"http://local/local/read/{tid}") as r:
        assert r.status == 410
    async with host.session.post(f"http://local/local/jobs/{'1' * 64}/invalidate") as r:
        assert r.status == 404
    async with host.session.get("http://local/local/jobs/not-a-task") as r:
        assert r.status == 404
    # a new download of the task is a new job
    proc = await host.dfget(url, world.tmp / "again")
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    assert (world.tmp / "again").read_bytes() == data
    await host.wait_state(tid, "Completed")


async def test_dead_download_is_failed(world: World, host: Host) -> None:
    data = blob(6 * P)
    url = world.add("dead", data)
    tid = task_id(url)
    proc = await host.dfget(url, world.tmp / "out", "-s", "2MB")
    await host.wait_state(tid, "Downloading")
    got = bytearray()
    reader = asyncio.create_task(_read(host, tid, None, got))
    await asyncio.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    await proc.wait()
    with pytest.raises(aiohttp.ClientPayloadError):
        await asyncio.wait_for(reader, 30)
    assert bytes(got) == data[:len(got)] and len(got) < len(data)
    await host.wait_state(tid, "Failed")
    assert host.session is not None
    async with host.session.get(f"http://local/local/read/{tid}") as r:
        assert r.status == 409


def test_verified_until_walks_whole_pieces() -> None:
    e = FileEntry(task_id="0" * 64, path=Path("/nonexistent"), length=10, piece_size=4, supernodes=[])
    assert verified_until(e, 0) == 0
    e.verified = {1}
    assert verified_until(e, 0) == 0
    assert verified_until(e, 5) == 8
    e.verified = {0, 1, 2}
    assert verified_until(e, 0) == 10
    assert verified_until(e, 9) == 10
