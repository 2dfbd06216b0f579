"""`dfget -o -` and `dfget --range` end to end: a real supernode, real dfget processes and
their peer servers on loopback, bytes compared with the origin's."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dfget_support import PY, run_dfget, run_dfget_bytes
from test_dfget_e2e import World, blob

from common.pieces import DEFAULT_PIECE_SIZE

MIB = 1 << 20


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.start()
    yield w
    await w.close()


def stream_args(world: World, url: str, *extra: str) -> list[str]:
    home = world.tmp / f"home{len(world.homes)}"
    world.homes.append(home)
    return ["-u", url, "-o", "-", "-n", f"127.0.0.1:{world.api}", "--home", str(home),
            "--ip", "127.0.0.1", *extra]


async def run_raw(*args: str, timeout: float = 90) -> tuple[int, bytes, str]:
    return await run_dfget_bytes(*args, timeout=timeout)


async def test_stdout_is_the_file_and_nothing_else(world: World) -> None:
    data = blob(18 * MIB + 5)  # 5 pieces, several in flight at once: they arrive out of order
    url = world.add("big", data)
    code, out, err = await run_raw(*stream_args(world, url, "--json", "--pull-limit", "8"))
    assert code == 0, err
    assert hashlib.sha256(out).hexdigest() == hashlib.sha256(data).hexdigest()
    # --json with -o -: the report goes to stderr, stdout has the file only
    report = json.loads(err.strip().splitlines()[-1])
    assert report["output"] == "-" and report["length"] == len(data)
    assert report["back_to_source"] is None
    # the file stays in this home's store, where its peer server serves it until it expires
    store = world.homes[-1] / "store"
    assert [p.read_bytes() == data for p in store.iterdir() if not p.name.startswith(".")] == [True]
    # ... and another host gets pieces from it
    r = await run_dfget(*world.args(url, world.tmp / "second"))
    assert r.code == 0, r.stderr
    assert (world.tmp / "second").read_bytes() == data
    assert r.report["bytes_from_peers"] > 0


async def test_stdout_from_a_swarm_of_peers(world: World) -> None:
    data = blob(22 * MIB)
    url = world.add("swarm", data)
    r = await run_dfget(*world.args(url, world.tmp / "first"))
    assert r.code == 0, r.stderr
    code, out, err = await run_raw(*stream_args(world, url, "--pull-limit", "8"))
    assert code == 0, err
    assert out == data


async def test_stdout_piped_into_tar(world: World) -> None:
    members = {f"dir/f{i}": blob(700_000 * i + 13) for i in range(1, 12)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, body in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    url = world.add("t.tar", buf.getvalue())
    assert len(buf.getvalue()) > 8 * MIB
    dest = world.tmp / "untar"
    dest.mkdir()
    args = " ".join(stream_args(world, url))
    proc = await asyncio.create_subprocess_shell(
        f"set -o pipefail; {PY} -m dfget {args} | tar x -C {dest}", executable="/bin/bash",
        stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 90)
    assert proc.returncode == 0, err.decode()
    for name, body in members.items():
        assert (dest / name).read_bytes() == body


async def test_reader_closing_stdout_ends_quietly(world: World) -> None:
    data = blob(40 * MIB)
    url = world.add("long", data)
    args = stream_args(world, url, "-s", "4MB")  # slow enough to be mid-download
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "dfget", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    head = await asyncio.wait_for(proc.stdout.readexactly(100), 60)
    assert head == data[:100]
    proc.stdout.feed_eof()
    transport = proc._transport  # type: ignore[attr-defined]
    transport.get_pipe_transport(1).close()  # like `| head -c 100` exiting
    err = await asyncio.wait_for(proc.stderr.read(), 60)
    code = await asyncio.wait_for(proc.wait(), 60)
    assert code == 141, err.decode()
    assert b"Traceback" not in err and b"error" not in err, err.decode()
    # nothing half-written is left in the store
    store = world.homes[-1] / "store"
    assert not [p for p in store.iterdir() if p.name.endswith(".dfget-part")]


async def test_range_byte_exact(world: World) -> None:
    size = 3 * DEFAULT_PIECE_SIZE + 12345
    data = blob(size)
    url = world.add("r", data)
    P = DEFAULT_PIECE_SIZE
    cases = {
        "bytes=0-0": data[0:1],
        "bytes=10-99": data[10:100],
        f"bytes={P - 5}-{P + 5}": data[P - 5:P + 6],  # across a piece boundary
        f"bytes={P}-{2 * P - 1}": data[P:2 * P],  # exactly one piece
        f"bytes={2 * P + 7}-": data[2 * P + 7:],  # open end
        "bytes=-1000": data[-1000:],  # suffix
        f"bytes=100-{size + 999}": data[100:],  # end past the file: cut at its end
    }
    for i, (rng, want) in enumerate(cases.items()):
        out = world.tmp / f"range{i}"
        r = await run_dfget(*world.args(url, out, "--range", rng), timeout=120)
        assert r.code == 0, (rng, r.stderr)
        assert out.read_bytes() == want, rng
        assert r.report["range"] == rng
        assert r.report["back_to_source"] is None
    # one piece of the file through the swarm: the others were never fetched by that host
    r = await run_dfget(*world.args(url, world.tmp / "one", "--range", f"bytes={P + 1}-{P + 2}"))
    assert r.code == 0, r.stderr
    assert r.report["pieces_from_peers"] + r.report["pieces_from_supernode"] == 1
    # and to stdout
    code, out, err = await run_raw(*stream_args(world, url, "--range", f"bytes={P - 3}-{P + 3}"))
    assert code == 0, err
    assert out == data[P - 3:P + 4]


async def test_bad_ranges_are_refused(world: World) -> None:
    data = blob(5000)
    url = world.add("small", data)
    for rng in ("bytes=9-3", "bytes=a-b", "items=0-1", "bytes=0-1,5-6", "bytes=-0", "0-10"):
        out = world.tmp / "bad"
        r = await run_dfget(*world.args(url, out, "--range", rng), timeout=120)
        assert r.code == 2, (rng, r.stderr)
        assert "--range" in r.stderr
        assert not out.exists()
    # well formed, but the file has no such bytes: known once the length is
    out = world.tmp / "past"
    r = await run_dfget(*world.args(url, out, "--range", "bytes=5000-6000"))
    assert r.code == 2, r.stderr
    assert "range" in r.stderr
    assert not out.exists()
    assert not [p for p in world.tmp.iterdir() if p.name.endswith(".dfget-range")]


def test_verified_run_follows_the_contiguous_prefix() -> None:
    from dfget.stream import VerifiedRun

    run = VerifiedRun(0)
    assert run.add(20, 29) == -1  # out of order: waits
    assert run.add(10, 19) == -1
    assert run.add(0, 9) == 30  # the hole filled: the run reaches past all three
    assert run.add(40, 49) == 30
    assert run.add(30, 39) == 50
    mid = VerifiedRun(15)  # a range starting inside a piece
    assert mid.add(20, 29) == -1
    assert mid.add(10, 19) == 30 and mid.available() == 15


def test_want_resolves_the_range_and_its_pieces() -> None:
    from dfget.stream import RangeOutsideFile, Want

    w = Want("bytes=5-25")
    w.resolve(-1, 10)  # length unknown yet: nothing
    assert not w.resolved and w.window is None
    w.resolve(100, 10)
    assert (w.lo, w.hi, w.window) == (5, 25, (0, 2))
    assert not w.covers({0, 1}) and w.covers({0, 1, 2, 7})
    s = Want("bytes=-7")
    s.resolve(100, 10)
    assert (s.lo, s.hi, s.window) == (93, 99, (9, 9))
    with pytest.raises(RangeOutsideFile):
        Want("bytes=100-").resolve(100, 10)


def test_expired_store_files_are_deleted_user_outputs_are_not(tmp_path: Path) -> None:
    from dfget.server.lifecycle import drop_store_files
    from dfget.server.table import FileEntry

    store = tmp_path / "store"
    store.mkdir()
    mine, users = store / ("a" * 64), tmp_path / "output.bin"
    mine.write_bytes(b"x")
    users.write_bytes(b"y")
    entries = [FileEntry(task_id="a" * 64, path=mine, length=1, piece_size=4, supernodes=[]),
               FileEntry(task_id="b" * 64, path=users, length=1, piece_size=4, supernodes=[])]
    drop_store_files(tmp_path, entries)
    assert not mine.exists() and users.exists()
