"""dfget as a real process against an in-process origin and fake supernode(s): bytes,
peer-to-peer transfer, corrupted peers, failover, back to source, resume, exit codes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web

from common.errors import EXIT_INTEGRITY, EXIT_NO_SUPERNODE, EXIT_ORIGIN, EXIT_P2P_FAILED
from dfget_support import HITS, PY, FakeSupernode, origin_app, run_dfget, start_app, stop_server

PIECE = 64 * 1024


class Env:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files: dict[str, bytes] = {}
        self.homes: list[Path] = []
        self.runners: list[web.AppRunner] = []
        self.origin_port = 0
        self.sn: list[FakeSupernode] = []

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.origin_port}/{name}"

    def add(self, name: str, data: bytes) -> str:
        url = self.url(name)
        self.files[url] = data
        self.origin_files["/" + name] = data
        return url

    async def start(self, supernodes: int = 1) -> None:
        self.origin_files: dict[str, bytes] = {}
        self.origin = origin_app(self.origin_files)
        runner, self.origin_port = await start_app(self.origin)
        self.runners.append(runner)
        for _ in range(supernodes):
            sn = FakeSupernode(self.files, piece_size=PIECE)
            runner, sn.port = await start_app(sn.app())
            self.runners.append(runner)
            self.sn.append(sn)

    def home(self) -> Path:
        h = self.tmp / f"h{len(self.homes)}"
        self.homes.append(h)
        return h

    def nodes(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sn)

    def args(self, url: str, out: Path, home: Path, *extra: str) -> list[str]:
        return ["-u", url, "-o", str(out), "-n", self.nodes(), "--home", str(home),
                "--ip", "127.0.0.1", "--json", "--pull-limit", "2", *extra]

    async def close(self) -> None:
        for h in self.homes:
            await stop_server(h)
        for r in self.runners:
            await r.cleanup()


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = Env(tmp_path)
    yield e
    await e.close()


def blob(n: int, seed: int = 1) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}-{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


@pytest.mark.parametrize("size", [0, 1, PIECE, PIECE * 3 + 17, PIECE * 10])
async def test_bytes_identical_through_supernode(env: Env, size: int) -> None:
    await env.start()
    url = env.add(f"f{size}", blob(size, size))
    out = env.tmp / "out.bin"
    r = await run_dfget(*env.args(url, out, env.home()))
    assert r.code == 0, r.stderr
    assert out.read_bytes() == env.files[url]
    rep = r.report
    assert rep["back_to_source"] is None
    assert rep["bytes_from_supernode"] == size and rep["bytes_from_origin"] == 0
    assert env.origin[HITS] == []  # nothing came from the origin directly
    assert not list(env.tmp.glob(".*.dfget-part"))
    assert [e for _, e in env.sn[0].events] == ["finished"]


async def test_second_dfget_gets_pieces_from_first_peer_server(env: Env) -> None:
    await env.start()
    url = env.add("shared", blob(PIECE * 6 + 5))
    r1 = await run_dfget(*env.args(url, env.tmp / "a", env.home()))
    assert r1.code == 0, r1.stderr
    r2 = await run_dfget(*env.args(url, env.tmp / "b", env.home()))
    assert r2.code == 0, r2.stderr
    assert (env.tmp / "b").read_bytes() == env.files[url]
    assert r2.report["bytes_from_peers"] == len(env.files[url])
    assert r2.report["bytes_from_supernode"] == 0


async def test_corrupted_peer_is_caught_reported_and_file_still_right(env: Env) -> None:
    await env.start()
    url = env.add("c", blob(PIECE * 4))
    h1 = env.home()
    r1 = await run_dfget(*env.args(url, env.tmp / "a", h1))
    assert r1.code == 0, r1.stderr
    # Corrupt the first peer's file in place keeping size and mtime: the peer server
    # still believes it holds verified pieces and serves bad bytes.
    a = env.tmp / "a"
    st = a.stat()
    with open(a, "r+b") as f:
        f.seek(PIECE + 10)
        f.write(b"\xff\x00\xff")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    r2 = await run_dfget(*env.args(url, env.tmp / "b", env.home()))
    assert r2.code == 0, r2.stderr
    assert (env.tmp / "b").read_bytes() == env.files[url]
    assert r2.report["peer_failures"] == {"digest_mismatch": 1}
    failed = [rep for _, rep in env.sn[0].reports if rep.result == "failed"]
    assert [(f.piece, f.reason) for f in failed] == [(1, "digest_mismatch")]
    # The bad piece came again from the CDN; the peer is then avoided by this client.
    assert r2.report["pieces_from_peers"] >= 1
    assert r2.report["pieces_from_peers"] + r2.report["pieces_from_supernode"] == 4


async def test_corrupted_cdn_with_notbs_fails_p2p_code(env: Env) -> None:
    await env.start()
    url = env.add("bad", blob(PIECE * 2))
    env.sn[0].corrupt_cdn = True
    out = env.tmp / "out"
    out.write_bytes(b"keep me")
    r = await run_dfget(*env.args(url, out, env.home(), "--notbs", "--no-serve"), timeout=90)
    assert r.code == EXIT_P2P_FAILED, r.stderr
    assert out.read_bytes() == b"keep me"
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


async def test_back_to_source_when_supernode_down(env: Env) -> None:
    await env.start(supernodes=0)
    url = env.add("bts", blob(PIECE * 3 + 1))
    env.sn = []
    out = env.tmp / "out"
    args = ["-u", url, "-o", str(out), "-n", "127.0.0.1:1", "--home", str(env.home()), "--json",
            "--header", "X-Test: 1"]
    r = await run_dfget(*args)
    assert r.code == 0, r.stderr
    assert out.read_bytes() == env.origin_files["/bts"]
    assert r.report["bytes_from_origin"] == len(env.origin_files["/bts"])
    assert "no supernode" in str(r.report["back_to_source"])
    r = await run_dfget(*args[:-2], "--notbs", "-o", str(env.tmp / "o2"))
    assert r.code == EXIT_NO_SUPERNODE
    assert not (env.tmp / "o2").exists()


async def test_origin_404_via_supernode_exits_origin_code_without_bts(env: Env) -> None:
    await env.start()
    r = await run_dfget(*env.args(env.url("missing"), env.tmp / "o", env.home()))
    assert r.code == EXIT_ORIGIN, r.stderr
    assert env.origin[HITS] == []  # not hammered by dfget after the supernode said 404


async def test_failover_to_next_supernode_keeps_pieces(env: Env) -> None:
    await env.start(supernodes=2)
    url = env.add("fo", blob(PIECE * 8))
    first, second = env.sn
    # The first supernode dies after handing out the first pieces.
    calls = {"n": 0}
    orig_pull = first.pull

    async def dying_pull(request: web.Request) -> web.StreamResponse:
        calls["n"] += 1
        if calls["n"] > 2:
            raise web.HTTPServiceUnavailable(text='{"error":"store_unavailable","message":"x"}',
                                             content_type="application/json")
        return await orig_pull(request)

    first.pull = dying_pull  # type: ignore[method-assign]
    runner, first.port = await start_app(first.app())
    env.runners.append(runner)
    r = await run_dfget(*env.args(url, env.tmp / "o", env.home(), "--no-serve"))
    assert r.code == 0, r.stderr
    assert (env.tmp / "o").read_bytes() == env.files[url]
    rep = r.report
    assert rep["failovers"] == 1 and rep["supernode"] == f"http://127.0.0.1:{second.port}"
    cid = first.registers[0]
    assert second.registers[0].cid is not None  # same identity on the new supernode
    haves = [x.piece for _, x in second.reports if x.result == "have"]
    assert haves, "pieces done before the failover were re-announced, not refetched"
    assert cid.cid is None


async def test_resume_after_kill(env: Env, tmp_path: Path) -> None:
    await env.start()
    data = blob(PIECE * 40)
    url = env.add("big", data)
    out = env.tmp / "o"
    args = env.args(url, out, env.home(), "--no-serve", "--locallimit", str(PIECE * 8))
    proc = await asyncio.create_subprocess_exec(PY, "-m", "dfget", *args,
                                                stdout=asyncio.subprocess.DEVNULL,
                                                stderr=asyncio.subprocess.DEVNULL)
    sn = env.sn[0]
    for _ in range(400):
        if sum(1 for _, rep in sn.reports if rep.result == "ok") >= 5:
            break
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert not out.exists()
    assert list(env.tmp.glob(".o.*.dfget-part"))
    r = await run_dfget(*env.args(url, out, env.home(), "--no-serve"))
    assert r.code == 0, r.stderr
    assert out.read_bytes() == data
    assert r.report["pieces_resumed"] >= 5
    assert r.report["bytes_from_supernode"] == len(data) - r.report["bytes_resumed"]


async def test_md5_mismatch_exit_integrity_and_output_kept(env: Env) -> None:
    await env.start()
    url = env.add("m", blob(PIECE + 3))
    out = env.tmp / "o"
    out.write_bytes(b"old")
    r = await run_dfget(*env.args(url, out, env.home(), "--no-serve", "-m", "0" * 32))
    assert r.code == EXIT_INTEGRITY, r.stderr
    assert out.read_bytes() == b"old"
    good = hashlib.md5(env.files[url]).hexdigest()
    r = await run_dfget(*env.args(url, out, env.home(), "--no-serve", "-m", good))
    assert r.code == 0, r.stderr
    assert out.read_bytes() == env.files[url]


_unused: Callable[..., object] | None = None
