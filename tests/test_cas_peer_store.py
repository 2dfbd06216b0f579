"""References in the peer store (issue 13, item 2): a complete file of known content is
one entry that the tasks (and their outputs) of that content refer to. Table semantics
first (pure), then the real peer server serving a task whose own output is gone from
another output of the same bytes, until nothing refers to the content any more."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import aiohttp
from test_cas_e2e import World, blob, sha

from dfget.server.protocol import socket_path
from dfget.server.table import FileEntry, FileTable
from dfget_support import run_dfget, stop_server

MIB = 1 << 20


def _entry(tmp: Path, tid: str, name: str, data: bytes, content: str) -> FileEntry:
    path = tmp / name
    path.write_bytes(data)
    e = FileEntry(task_id=tid, path=path, length=len(data), piece_size=4 * MIB, supernodes=[])
    e.verified = {0}
    return e


def _table(tmp: Path) -> tuple[FileTable, FileEntry, FileEntry, str]:
    data = b"same bytes" * 100
    content = hashlib.sha256(data).hexdigest()
    t = FileTable()
    a, b = _entry(tmp, "a" * 64, "out1", data, content), _entry(tmp, "b" * 64, "out2", data, content)
    for e in (a, b):
        t.register(e)
        assert t.moved(e.task_id, e.path, content)
    return t, a, b, content


def test_one_content_two_tasks_stand_in_for_each_other(tmp_path: Path) -> None:
    t, a, b, content = _table(tmp_path)
    assert {e.task_id for e in t.refs(content)} == {a.task_id, b.task_id}
    a.path.unlink()  # the user removed one output
    assert t.stand_in(a) is b
    assert t.sweep(time.monotonic(), 60) == []  # task a still refers to the content through b
    b.path.unlink()
    assert t.stand_in(a) is None
    assert {e.task_id for e in t.sweep(time.monotonic(), 60)} == {a.task_id, b.task_id}
    assert t.refs(content) == []


def test_a_read_of_one_task_keeps_the_content_for_all(tmp_path: Path) -> None:
    t, a, b, _ = _table(tmp_path)
    now = time.monotonic()
    a.last_access, b.last_access = now - 100, now - 1  # b was read a second ago
    assert t.sweep(now, 60) == []
    b.last_access = now - 100
    assert {e.task_id for e in t.sweep(now, 60)} == {a.task_id, b.task_id}  # nobody read either


def test_other_content_or_changed_file_never_stands_in(tmp_path: Path) -> None:
    t, a, b, content = _table(tmp_path)
    b.content = "0" * 64
    a.path.unlink()
    assert t.stand_in(a) is None
    b.content = content
    b.path.write_bytes(b"edited by the user!" * 50)  # size changed: no longer what was verified
    assert t.stand_in(a) is None
    assert len(t.sweep(time.monotonic(), 60)) == 2


async def _peer_port(home: Path) -> int:
    conn = aiohttp.UnixConnector(path=str(socket_path(home)))
    async with aiohttp.ClientSession(connector=conn) as s:
        async with s.get("http://peer-server/info") as r:
            return int(json.loads(await r.text())["port"])


async def _piece(port: int, tid: str, end: int) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{port}/peer/file/{tid}", headers={"Range": f"bytes=0-{end}"}) as r:
            return r.status, await r.read()


async def test_peer_server_serves_a_task_from_another_output_of_its_content(tmp_path: Path) -> None:
    w = World(tmp_path)
    await w.start("--no-piece-auth")
    try:
        data = blob(5 * MIB, "peer-refs")
        d = sha(data)
        home = w.tmp / "host"
        args = ["-n", f"127.0.0.1:{w.api}", "--home", str(home), "--ip", "127.0.0.1", "--json"]
        url1 = w.add("u1", data)
        # another host fetched the URL task first: the CDN has it all and says its content
        r0 = await run_dfget("-u", url1, "-o", str(w.tmp / "out0"), *w.host("127.0.0.2"))
        assert r0.code == 0, r0.stderr
        r1 = await run_dfget("-u", url1, "-o", str(w.tmp / "out1"), *args)  # a URL task
        r2 = await run_dfget("--digest", d, "-u", w.add("u2", data), "-o", str(w.tmp / "out2"), *args)
        assert r1.code == 0 and r2.code == 0, (r1.stderr, r2.stderr)
        t1, t2 = str(r1.report["task_id"]), str(r2.report["task_id"])
        assert t1 != t2
        port = await _peer_port(home)
        assert await _piece(port, t1, 99) == (206, data[:100])
        (w.tmp / "out1").unlink()
        # task 1's output is gone; the content is still referred to by task 2's output
        assert await _piece(port, t1, 99) == (206, data[:100])
        assert await _piece(port, t2, 99) == (206, data[:100])
        (w.tmp / "out2").unlink()
        assert (await _piece(port, t1, 99))[0] == 404
        assert (await _piece(port, t2, 99))[0] == 404
        await stop_server(home)
    finally:
        await w.close()
