"""`dfget server` as a real detached process: started once per home and reused, driven
over its Unix socket, telling the supernode when files go away and when it stops."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp

from common import wire
from common.pieces import piece_count
from dfget.server.launcher import ControlClient, ensure_server
from dfget.server.protocol import RegisterFile, socket_path
from dfget_support import FakeSupernode, start_app, stop_server

TID = "ef" * 32


async def _wait_gone(pid: int, timeout: float) -> bool:
    for _ in range(int(timeout / 0.05)):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return True
        if stat.split(")")[-1].split()[0] == "Z":
            return True
        await asyncio.sleep(0.05)
    return False


async def test_started_once_and_reused_concurrently(tmp_path: Path) -> None:
    home = tmp_path / "home"
    try:
        results = await asyncio.gather(*(ensure_server(home, "127.0.0.1", 0, 0, 60, 60) for _ in range(3)))
        pids = {info.pid for _, info in results}
        peer_ids = {info.peer_id for _, info in results}
        assert len(pids) == 1 and len(peer_ids) == 1
        for client, _ in results:
            await client.close()
        assert oct(socket_path(home).stat().st_mode & 0o777) == "0o600"
    finally:
        assert await stop_server(home) is not None


async def test_serves_registered_piece_and_reports_down_on_sigterm_and_delete(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sn = FakeSupernode({})
    runner, sn.port = await start_app(sn.app())
    data = os.urandom(2500)
    f1, f2 = tmp_path / "f1", tmp_path / "f2"
    f1.write_bytes(data)
    f2.write_bytes(data)
    tid2 = "aa" * 32
    client, info = await ensure_server(home, "127.0.0.1", 0, 0, 60, 60)
    try:
        base = f"http://127.0.0.1:{sn.port}"
        for tid, path in ((TID, f1), (tid2, f2)):
            await client.register(RegisterFile(task_id=tid, path=str(path), length=2500, piece_size=1000,
                                               supernodes=[base], owner_pid=os.getpid(), piece_auth=False))
        url = f"http://127.0.0.1:{info.port}/peer/file/{TID}"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, headers={"Range": "bytes=1000-1999"}) as r:
                assert r.status == 404  # not verified yet
            await client.verified(TID, [1])
            async with s.get(url, headers={"Range": "bytes=1000-1999"}) as r:
                assert r.status == 206 and await r.read() == data[1000:2000]
        await client.remove(tid2)
        assert [d.tasks for d in sn.downs] == [[tid2]]
        assert sn.downs[0].peer_id == info.peer_id
        os.kill(info.pid, signal.SIGTERM)
        assert await _wait_gone(info.pid, 15)
        assert sn.downs[-1] == wire.PeerDownRequest(peer_id=info.peer_id, tasks=None)
        assert not socket_path(home).exists()
    finally:
        await client.close()
        await stop_server(home)
        await runner.cleanup()


async def test_exits_after_alivetime_and_drops_deleted_files(tmp_path: Path) -> None:
    home = tmp_path / "home"
    sn = FakeSupernode({})
    runner, sn.port = await start_app(sn.app())
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10)
    proc = await asyncio.create_subprocess_exec(
        "python" if False else os.sys.executable, "-m", "dfget", "server", "--home", str(home),
        "--alivetime", "3s", "--expiretime", "1h", "--scan-interval", "0.2s")
    try:
        client = ControlClient(home)
        for _ in range(200):
            try:
                await client.info()
                break
            except Exception:  # noqa: BLE001 - not up yet
                await asyncio.sleep(0.05)
        await client.register(RegisterFile(task_id=TID, path=str(f), length=10, piece_size=4,
                                           supernodes=[f"http://127.0.0.1:{sn.port}"], owner_pid=0))
        await client.verified(TID, list(range(piece_count(10, 4))))
        await client.moved(TID, f)
        f.unlink()
        await client.close()
        rc = await asyncio.wait_for(proc.wait(), 20)
        assert rc == 0
        assert [d.tasks for d in sn.downs][:1] == [[TID]]
        assert sn.downs[-1].tasks is None
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await runner.cleanup()


async def test_a_new_download_of_a_task_retires_the_old_downloads_clients(tmp_path: Path) -> None:
    """One host, one task, two downloads in a row: the second replaces the first's file
    in the table, so the supernodes are told that the first's clients (only they) no
    longer serve. Without it they kept listing them as holders and sent peers into 404s
    (the soak: 7,094 'source does not hold the piece', 33 downloads back to the origin)."""
    home = tmp_path / "home"
    sn = FakeSupernode({})
    runner, sn.port = await start_app(sn.app())
    f1, f2 = tmp_path / "f1", tmp_path / "f2"
    f1.write_bytes(b"x" * 2500)
    f2.write_bytes(b"")
    old, new = "1" * 32, "2" * 32
    client, info = await ensure_server(home, "127.0.0.1", 0, 0, 60, 60)
    try:
        base = f"http://127.0.0.1:{sn.port}"
        for path, clients in ((f1, [old]), (f2, [new]), (f2, [new])):  # the last: a re-registration
            await client.register(RegisterFile(task_id=TID, path=str(path), length=2500, piece_size=1000,
                                               supernodes=[base], owner_pid=os.getpid(), clients=clients))
        assert sn.downs == [wire.PeerDownRequest(peer_id=info.peer_id, tasks=[TID], clients=[old])]
    finally:
        await client.close()
        await stop_server(home)
        await runner.cleanup()


async def test_a_download_does_not_wait_for_the_server_it_starts(tmp_path: Path) -> None:
    """dfget knows the new server's address and id at once (it binds the socket and picks
    the id); what it tells the server before it is up is queued, and if the download ends
    first, spooled and replayed by the server: the file is served all the same, and
    peers that connect early wait in the backlog instead of being refused."""
    from dfget.peerlink import PeerLink

    home = tmp_path / "home"
    out = tmp_path / "out.bin"
    data = os.urandom(3000)
    out.write_bytes(data)
    link = await PeerLink.start(home, "127.0.0.1", 0, 0, 60, 60)
    try:
        assert link.starting is not None and not link.starting.done()  # not waited for
        addr = link.addr
        assert addr is not None and addr.port > 0
        await link.register(TID, tmp_path / ".part", len(data), 1 << 20, ["http://127.0.0.1:1"],
                            piece_auth=False)
        await link.verified(TID, [0], len(data))
        await link.moved(TID, out)
        assert len(link.queue) == 3  # nothing sent yet: the server is still importing
        # A peer connecting now is accepted by the kernel and answered once the server runs.
        async with aiohttp.ClientSession() as s:
            piece = asyncio.ensure_future(s.get(f"http://127.0.0.1:{addr.port}/peer/file/{TID}",
                                                headers={"Range": "bytes=0-99"}))
            await link.close()  # spools: the download is over
            async with await piece as resp:
                assert resp.status == 206 and await resp.read() == data[:100]
        client = ControlClient(home)
        try:
            info = await client.info()
            assert info.peer_id == addr.peer_id and info.port == addr.port
        finally:
            await client.close()
        assert not list((home / "spool").glob("*.json"))  # replayed and removed
    finally:
        await stop_server(home)


async def test_a_niced_dfget_leaves_a_niced_peer_server(tmp_path: Path) -> None:
    """The peer server leads a session of its own; where the kernel schedules sessions as
    groups (autogroup), that group must keep the nice level of the dfget that started it,
    or `nice -n 7 dfget ...` leaves a server that competes for CPU as if not niced."""
    if not Path("/proc/self/autogroup").exists():
        import pytest

        pytest.skip("this kernel has no autogroup: nice alone already holds")
    home = tmp_path / "home"
    code = ("import asyncio, os, sys; os.nice(7); from pathlib import Path; "
            "from dfget.server.launcher import ensure_server; "
            "_, info = asyncio.run(ensure_server(Path(sys.argv[1]), '127.0.0.1', 0, 0, 60, 60)); print(info.pid)")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, str(home),
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    try:
        assert proc.returncode == 0
        pid = int(out.decode().split()[-1])
        group = Path(f"/proc/{pid}/autogroup").read_text()
        assert group.split()[-1] == "7", group
        assert os.getpriority(os.PRIO_PROCESS, pid) == 7
        assert Path("/proc/self/autogroup").read_text() != group  # a group of its own, ours untouched
    finally:
        await stop_server(home)
