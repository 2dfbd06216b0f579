"""Content-addressed store, end to end with real processes (issue 13, items 1-3):
digest tasks (`dfget --digest`), `dfget import` and downloads by digest alone, a lying
importer, and the hostile inputs of each. Every host has its own --home and its own
127.0.0.x address; the origin is in-process and counts every request."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from conftest import free_ports
from dfget_support import HITS, PY, FakeSupernode, origin_app, run_dfget, start_app, stop_server

from common import content
from common.pieces import piece_count, piece_range, piece_size_for
from common.taskid import new_id

MIB = 1 << 20


def blob(n: int, salt: str = "") -> bytes:
    out = bytearray()
    i = 0
    while len(out) < n:
        out += hashlib.sha256(f"{salt}{i}".encode()).digest()
        i += 1
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class World:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files: dict[str, bytes] = {}
        self.homes: list[Path] = []
        self.runner: web.AppRunner | None = None
        self.origin: web.Application | None = None
        self.sn: asyncio.subprocess.Process | None = None

    async def start(self, *extra: str) -> None:
        self.origin = origin_app(self.files)
        self.runner, self.origin_port = await start_app(self.origin)
        self.api, dl = free_ports(2)
        self.sn_home = self.tmp / "sn"
        log = open(self.tmp / "supernode.log", "wb")
        self.sn = await asyncio.create_subprocess_exec(
            PY, "-m", "supernode", "--port", str(self.api), "--download-port", str(dl),
            "--home", str(self.sn_home), "--advertise-ip", "127.0.0.1",
            "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8", *extra, stdout=log, stderr=log)
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

    @property
    def hits(self) -> list[str]:
        assert self.origin is not None
        return self.origin[HITS]

    def add(self, name: str, data: bytes) -> str:
        self.files["/" + name] = data
        return f"http://127.0.0.1:{self.origin_port}/{name}"

    def host(self, ip: str = "127.0.0.1") -> list[str]:
        home = self.tmp / f"home{len(self.homes)}"
        self.homes.append(home)
        return ["-n", f"127.0.0.1:{self.api}", "--home", str(home), "--ip", ip]

    def get(self, out: Path, *extra: str, ip: str = "127.0.0.1") -> list[str]:
        return ["-o", str(out), *self.host(ip), "--json", "-s", "0", *extra]

    async def api_get(self, path: str) -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{self.api}{path}") as r:
                return r.status, await r.json()

    async def api_call(self, method: str, path: str, body: object = None) -> tuple[int, dict[str, object]]:
        async with aiohttp.ClientSession() as s:
            async with s.request(method, f"http://127.0.0.1:{self.api}{path}", json=body) as r:
                return r.status, await r.json()

    async def wait_status(self, tid: str, want: tuple[str, ...], timeout: float = 30) -> dict[str, object]:
        for _ in range(int(timeout / 0.1)):
            status, body = await self.api_get(f"/api/v1/tasks/{tid}/digests")
            if status == 200 and body["task"]["status"] in want:  # type: ignore[index]
                return body["task"]  # type: ignore[return-value]
            await asyncio.sleep(0.1)
        pytest.fail(f"task {tid[:12]} never reached {want}")

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


def leftovers(directory: Path, name: str) -> list[str]:
    """The output and any part/temporary file of it."""
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(name) or p.name.startswith(f".{name}"))


# --- 1. digest tasks ---------------------------------------------------------------------

async def test_digest_task_two_urls_are_one_task_and_one_origin_fetch(world: World) -> None:
    data = blob(9 * MIB + 5)
    d = sha(data)
    url1, url2 = world.add("mirror1/file.bin", data), world.add("mirror2/other-name", data)
    r1 = await run_dfget("--digest", d, "-u", url1, *world.get(world.tmp / "a"))
    assert r1.code == 0, r1.stderr
    r2 = await run_dfget("--digest", d, "-u", url2, *world.get(world.tmp / "b", ip="127.0.0.2"))
    assert r2.code == 0, r2.stderr
    assert (world.tmp / "a").read_bytes() == data and (world.tmp / "b").read_bytes() == data
    assert r1.report["task_id"] == r2.report["task_id"] == content.task_id_of(d)
    assert r1.report["digest"] == d
    assert world.hits == ["/mirror1/file.bin"]  # the second URL was never fetched
    assert r2.report["bytes_from_origin"] == 0
    status, listing = await world.api_get("/api/v1/tasks")
    assert status == 200 and len(listing["tasks"]) == 1  # type: ignore[arg-type]
    cached = list((world.sn_home / "cdn").glob("*/*.data"))
    assert len(cached) == 1


async def test_digest_without_url_joins_a_task_registered_with_one(world: World) -> None:
    data = blob(5 * MIB, "x")
    d = sha(data)
    r1 = await run_dfget("--digest", d, "-u", world.add("x", data), *world.get(world.tmp / "a"))
    assert r1.code == 0, r1.stderr
    r2 = await run_dfget("--digest", d, *world.get(world.tmp / "b", ip="127.0.0.2"))
    assert r2.code == 0, r2.stderr
    assert (world.tmp / "b").read_bytes() == data
    assert r2.report["bytes_from_origin"] == 0 and len(world.hits) == 1


async def test_digest_mismatch_at_the_cdn_fails_cleanly(world: World) -> None:
    data = blob(3 * MIB, "m")
    wrong = sha(data + b"!")
    out = world.tmp / "out"
    r = await run_dfget("--digest", wrong, "-u", world.add("m", data), *world.get(out))
    assert r.code == 5, r.stderr
    assert "sha256:" in r.stderr and "Traceback" not in r.stderr
    assert leftovers(world.tmp, "out") == []
    assert len(world.hits) == 1  # integrity failures are final: no retry at the origin
    # the task is failed for everyone: a second URL of the same digest is not fetched either
    r2 = await run_dfget("--digest", wrong, *world.get(world.tmp / "out2"))
    assert r2.code == 5 and leftovers(world.tmp, "out2") == []


async def test_digest_without_url_unknown_to_the_swarm(world: World) -> None:
    out = world.tmp / "nothing"
    r = await run_dfget("--digest", "sha256:" + "ab" * 32, *world.get(out))
    assert r.code == 10, r.stderr
    assert "no task of this swarm has sha256:" in r.stderr
    assert r.report["exit_code"] == 10
    assert leftovers(world.tmp, "nothing") == []
    assert world.hits == []


@pytest.mark.parametrize("bad, why", [
    ("md5:" + "a" * 32, "unsupported digest algorithm"),
    ("sha256:" + "a" * 63, "64 hex digits, got 63"),
    ("sha256:" + "a" * 65, "64 hex digits, got 65"),
    ("sha256:" + "A" * 64, "lower-case hex"),
    ("sha256:" + "g" * 64, "lower-case hex"),
    ("a" * 64, "sha256:<64 hex digits>"),
    ("sha256:", "64 hex digits, got 0"),
])
async def test_bad_digests_are_usage_errors(tmp_path: Path, bad: str, why: str) -> None:
    out = tmp_path / "out"
    r = await run_dfget("--digest", bad, "-u", "http://127.0.0.1:9/x", "-o", str(out), "-n", "127.0.0.1:9",
                        "--home", str(tmp_path / "h"))
    assert r.code == 2 and why in r.stderr, r.stderr
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    r2 = await run_dfget("import", str(f), "--digest", bad, "-n", "127.0.0.1:9", "--home", str(tmp_path / "h"))
    assert r2.code == 2 and why in r2.stderr, r2.stderr
    assert not out.exists() and not (tmp_path / "h").exists()


async def test_digest_flag_conflicts_are_usage_errors(tmp_path: Path) -> None:
    d = "sha256:" + "a" * 64
    base = ["-n", "127.0.0.1:9", "--home", str(tmp_path / "h")]
    for args, why in [((), "give -u/--url, or --digest"),
                      (("--digest", d), "needs -o"),
                      (("--digest", d, "-o", str(tmp_path / "o"), "--md5", "0" * 32), "cannot be combined"),
                      (("--digest", d, "-o", str(tmp_path / "o"), "-i", "other"), "name the task twice"),
                      (("--digest", d, "-o", str(tmp_path / "o"), "-p", "source"), "-p source needs")]:
        r = await run_dfget(*args, *base)
        assert r.code == 2 and why in r.stderr, (args, r.stderr)


async def test_dfget_checks_the_whole_file_against_the_digest(tmp_path: Path) -> None:
    """A supernode (here a fake one) whose piece digests are consistent with bytes that
    are not the digest's: dfget refuses to rename them into place."""
    url = "http://origin.invalid/f"
    data = blob(300_000, "fake")
    fake = FakeSupernode({url: data})
    runner, port = await start_app(fake.app())
    fake.port = port
    try:
        out = tmp_path / "out"
        r = await run_dfget("--digest", sha(data + b"x"), "-u", url, "-o", str(out), "-n", f"127.0.0.1:{port}",
                            "--no-serve", "--notbs", "--json")
        assert r.code == 5, r.stderr
        assert "hashes to sha256:" in r.stderr
        assert leftovers(tmp_path, "out") == []
        ok = await run_dfget("--digest", sha(data), "-u", url, "-o", str(out), "-n", f"127.0.0.1:{port}",
                             "--no-serve", "--notbs")
        assert ok.code == 0, ok.stderr
        assert out.read_bytes() == data
    finally:
        await runner.cleanup()


# --- 3. import -------------------------------------------------------------------------------

async def _import(world: World, path: Path, *extra: str, ip: str = "127.0.0.2") -> tuple[int, dict[str, object], str]:
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "dfget", "import", str(path), *world.host(ip), "--json", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode or 0, json.loads(out.decode().strip().splitlines()[-1]), err.decode()


async def test_import_on_one_host_download_by_digest_on_others(world: World) -> None:
    data = blob(10 * MIB + 123, "imp")
    src = world.tmp / "local.bin"
    src.write_bytes(data)
    code, rep, err = await _import(world, src, "--digest", sha(data))
    assert code == 0, err
    assert rep["digest"] == sha(data) and rep["length"] == len(data)
    assert rep["pieces"] == piece_count(len(data), piece_size_for(len(data)))
    assert rep["task_id"] == content.task_id_of(sha(data)) and rep["status"] == "success"
    assert rep["seeding"] is True, err
    outs = []
    for i, ip in enumerate(("127.0.0.3", "127.0.0.4")):
        out = world.tmp / f"got{i}"
        r = await run_dfget("--digest", sha(data), *world.get(out, ip=ip))
        assert r.code == 0, r.stderr
        assert out.read_bytes() == data
        assert r.report["bytes_from_origin"] == 0 and r.report["back_to_source"] is None
        assert r.report["bytes_from_peers"] + r.report["bytes_from_supernode"] == len(data)  # type: ignore[operator]
        outs.append(r.report)
    assert world.hits == []  # there is no origin at all
    # a real P2P download: the first host got pieces from the importer's peer server
    assert outs[0]["bytes_from_peers"] > 0 and outs[1]["bytes_from_peers"] > 0
    # importing it again (or the same bytes elsewhere) changes nothing
    code2, rep2, err2 = await _import(world, src)
    assert code2 == 0 and rep2["new"] is False, err2


async def test_import_digest_mismatch_registers_nothing(world: World) -> None:
    src = world.tmp / "f.bin"
    src.write_bytes(blob(MIB, "q"))
    other = sha(b"something else")
    code, rep, err = await _import(world, src, "--digest", other)
    assert code == 5 and "nothing imported" in err, err
    for d in (other, sha(src.read_bytes())):
        status, _ = await world.api_get(f"/api/v1/tasks/{content.task_id_of(d)}/digests")
        assert status == 404


async def test_import_of_missing_unreadable_or_odd_files(world: World) -> None:
    code, rep, err = await _import(world, world.tmp / "missing.bin")
    assert code == 2 and "no such file" in err and rep["exit_code"] == 2, err
    code, rep, err = await _import(world, world.tmp)
    assert code == 2 and "not a regular file" in err, err
    fifo = world.tmp / "pipe"
    os.mkfifo(fifo)  # opening it must not hang the importer
    code, rep, err = await _import(world, fifo)
    assert code == 2 and "not a regular file" in err, err
    code, rep, err = await _import(world, world.tmp / "pipe" / "below")
    assert code == 7 and "cannot open" in err, err
    if os.geteuid() != 0:  # root reads a mode-0 file
        locked = world.tmp / "locked.bin"
        locked.write_bytes(b"secret")
        locked.chmod(0)
        code, rep, err = await _import(world, locked)
        assert code == 7 and "not readable" in err, err
    status, listing = await world.api_get("/api/v1/tasks")
    assert listing["tasks"] == []


class LyingPeer:
    """A peer server that claims one file's piece digests and serves other bytes."""

    def __init__(self, served: bytes) -> None:
        self.served = served
        self.requests = 0

    def app(self) -> web.Application:
        async def piece(request: web.Request) -> web.Response:
            self.requests += 1
            spec = request.headers["Range"].removeprefix("bytes=")
            a, b = (int(x) for x in spec.split("-"))
            return web.Response(status=206, body=self.served[a:b + 1],
                                headers={"Content-Range": f"bytes {a}-{b}/{len(self.served)}"})

        app = web.Application()
        app.router.add_get("/peer/file/{tid}", piece)
        return app


@pytest.mark.parametrize("lie", ["piece", "whole"])
async def test_a_lying_importer_is_never_trusted(world: World, lie: str) -> None:
    """`piece`: one piece served differs from the claimed digest; `whole`: the pieces
    match the claim but the file is not the claimed digest's."""
    true = blob(9 * MIB, "true")
    ps = piece_size_for(len(true))
    if lie == "piece":
        served = bytearray(true)
        served[ps + 10] ^= 0xFF
        served_b, digest_claim, pieces_of = bytes(served), sha(true), true
    else:
        served_b, digest_claim, pieces_of = true, sha(true + b"-"), true
    claims = [hashlib.sha256(pieces_of[slice(a, b + 1)]).hexdigest()
              for a, b in (piece_range(n, len(true), ps) for n in range(piece_count(len(true), ps)))]
    liar = LyingPeer(served_b)
    runner, port = await start_app(liar.app())
    try:
        status, body = await world.api_call("POST", "/api/v1/import", {
            "digest": digest_claim, "length": len(true), "piece_size": ps, "digests": claims,
            "peer": {"peer_id": new_id(), "ip": "127.0.0.1", "port": port}})
        assert status == 202, body
        tid = content.task_id_of(digest_claim)
        task = await world.wait_status(tid, ("failed", "success"))
        assert task["status"] == "failed"
        assert task["error"]["error"] in ("import_rejected", "content_digest_mismatch")  # type: ignore[index]
        _, digests = await world.api_get(f"/api/v1/tasks/{tid}/digests")
        assert not any(digests["digests"])  # type: ignore[arg-type]  # nothing was ever published
        out = world.tmp / "victim"
        r = await run_dfget("--digest", digest_claim, *world.get(out, ip="127.0.0.3"))
        assert r.code == 5, r.stderr
        assert leftovers(world.tmp, "victim") == []
        assert not list((world.sn_home / "cdn").glob("*/*.data"))  # the CDN dropped the bytes
        assert liar.requests <= piece_count(len(true), ps)  # fetched at most once
    finally:
        await runner.cleanup()


async def test_import_api_hostile_claims(world: World) -> None:
    peer = {"peer_id": new_id(), "ip": "127.0.0.1", "port": 9}
    d = sha(b"abc")
    good = {"digest": d, "length": 3, "piece_size": piece_size_for(3), "digests": [d[7:]], "peer": peer}
    for change, want in [({"digest": "sha256:" + "A" * 64}, 400), ({"digest": "md5:" + "a" * 32}, 400),
                         ({"piece_size": 1024}, 400), ({"digests": []}, 400),
                         ({"digests": [d[7:]] * 2}, 400), ({"length": -1}, 400),
                         ({"length": 1 << 51}, 400), ({"peer": {**peer, "ip": "169.254.169.254"}}, 403),
                         ({"peer": {**peer, "ip": "not-an-ip"}}, 400)]:
        status, body = await world.api_call("POST", "/api/v1/import", {**good, **change})
        assert status == want, (change, status, body)
    status, listing = await world.api_get("/api/v1/tasks")
    assert listing["tasks"] == []


async def test_import_claim_of_a_30_gib_file_fits_the_import_routes_body_cap(world: World) -> None:
    """2,048 piece digests (30 GiB in 15 MiB pieces) make a 140 KB body: over the API's
    64 KiB cap, within the import route's own (guard.BODY_CAPS). The claim is taken; the
    check then fails, as nobody serves the file."""
    length = 30 << 30
    ps = piece_size_for(length)
    n = piece_count(length, ps)
    assert n > 2000
    d = sha(b"thirty gibibytes")
    claim = {"digest": d, "length": length, "piece_size": ps, "digests": [d[7:]] * n,
             "peer": {"peer_id": new_id(), "ip": "127.0.0.1", "port": 9}}
    status, body = await world.api_call("POST", "/api/v1/import", claim)
    assert status == 202, body
    task = await world.wait_status(content.task_id_of(d), ("failed", "success"))
    assert task["status"] == "failed"


# --- 2. references ---------------------------------------------------------------------------

@pytest.fixture
async def gc_world(tmp_path: Path) -> AsyncIterator[World]:
    w = World(tmp_path)
    await w.start("--blob-ttl", "1s", "--gc-initial-delay", "0.2s", "--gc-meta-interval", "0.3s")
    yield w
    await w.close()


def _refs(sn_home: Path, hexd: str) -> list[str] | None:
    p = sn_home / "cdn" / "blobs" / hexd[:2] / f"{hexd}.refs"
    return json.loads(p.read_text()) if p.exists() else None


async def test_two_tasks_share_one_cache_entry_until_both_are_deleted(gc_world: World) -> None:
    w = gc_world
    data = blob(6 * MIB + 1, "shared")
    d = sha(data)
    hexd = d[7:]
    r1 = await run_dfget("-u", w.add("plain/url", data), *w.get(w.tmp / "a"))  # a URL task
    r2 = await run_dfget("--digest", d, "-u", w.add("other/url", data), *w.get(w.tmp / "b", ip="127.0.0.2"))
    assert r1.code == 0 and r2.code == 0, (r1.stderr, r2.stderr)
    ta, tb = str(r1.report["task_id"]), str(r2.report["task_id"])
    assert ta != tb and tb == content.task_id_of(d)
    cdn = w.sn_home / "cdn"
    fa, fb = cdn / ta[:2] / f"{ta}.data", cdn / tb[:2] / f"{tb}.data"
    blob_file = cdn / "blobs" / hexd[:2] / f"{hexd}.data"
    assert os.path.samefile(fa, fb) and os.path.samefile(fa, blob_file)  # one copy on disk
    assert os.stat(blob_file).st_nlink == 3
    assert _refs(w.sn_home, hexd) == sorted([ta, tb])
    await asyncio.sleep(2.0)  # past the blob TTL and several GC rounds: referenced, so kept
    assert blob_file.exists()

    status, _ = await w.api_call("DELETE", f"/api/v1/tasks/{ta}")
    assert status == 200
    assert not fa.exists() and _refs(w.sn_home, hexd) == [tb]
    await asyncio.sleep(1.5)
    assert blob_file.exists()  # task B still refers to it
    # B is still served, by digest alone, to a new host (none of the old peers' bytes needed)
    await stop_server(w.homes[0])
    await stop_server(w.homes[1])
    r3 = await run_dfget("--digest", d, *w.get(w.tmp / "c", ip="127.0.0.3"))
    assert r3.code == 0, r3.stderr
    assert (w.tmp / "c").read_bytes() == data and r3.report["bytes_from_supernode"] == len(data)
    assert len(w.hits) == 2  # one origin fetch per task, none since

    status, _ = await w.api_call("DELETE", f"/api/v1/tasks/{tb}")
    assert status == 200
    assert not fb.exists() and _refs(w.sn_home, hexd) == []
    for _ in range(100):  # unreferenced now: the GC removes it after its TTL
        if not blob_file.exists():
            break
        await asyncio.sleep(0.1)
    assert not blob_file.exists()
    assert not list(cdn.rglob("*.data"))  # the space is freed: no copy of the bytes is left


async def test_import_of_an_empty_file(world: World) -> None:
    src = world.tmp / "empty"
    src.write_bytes(b"")
    code, rep, err = await _import(world, src)
    assert code == 0 and rep["length"] == 0 and rep["pieces"] == 0, err
    out = world.tmp / "got-empty"
    r = await run_dfget("--digest", sha(b""), *world.get(out, ip="127.0.0.3"))
    assert r.code == 0, r.stderr
    assert out.read_bytes() == b""


async def test_import_with_no_supernode_says_so(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"data")
    dead = free_ports(1)[0]
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "dfget", "import", str(src), "-n", f"127.0.0.1:{dead}", "--home", str(tmp_path / "h"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 3, err
    assert b"no supernode answered" in err and b"Traceback" not in err


async def test_digest_checked_on_the_way_back_to_source(tmp_path: Path) -> None:
    """No supernode: dfget goes to the origin itself, and checks the digest there too."""
    data = blob(2 * MIB, "bts")
    files = {"/f": data}
    runner, port = await start_app(origin_app(files))
    try:
        dead = free_ports(1)[0]
        base = ["-u", f"http://127.0.0.1:{port}/f", "-n", f"127.0.0.1:{dead}", "--no-serve", "--json"]
        bad = await run_dfget("--digest", sha(data + b"?"), "-o", str(tmp_path / "bad"), *base)
        assert bad.code == 5 and "hashes to sha256:" in bad.stderr, bad.stderr
        assert leftovers(tmp_path, "bad") == []
        good = await run_dfget("--digest", sha(data), "-o", str(tmp_path / "good"), *base)
        assert good.code == 0, good.stderr
        assert (tmp_path / "good").read_bytes() == data and good.report["bytes_from_origin"] == len(data)
    finally:
        await runner.cleanup()
