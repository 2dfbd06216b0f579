"""Access control end to end, real processes (origin, supernode, dfget, peer servers):
preheat, then a download with no origin traffic; piece tokens on (the default) and off;
a dfget whose peer address the supernode refuses still downloads, without serving."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import aiohttp
from conftest import file_bytes
from dfget_support import run_dfget, stop_server

from dfget.server.launcher import ControlClient
from dfget.server.protocol import ServerInfo

MIB = 1 << 20
TOKEN = "preheat-admin-token-0123456789"


async def api(method: str, url: str, body: dict[str, Any] | None = None,
              token: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(method, url, json=body, headers=headers) as r:
        return r.status, await r.json()


def dfget_args(sn, url: str, out: Path, home: Path) -> list[str]:  # type: ignore[no-untyped-def]
    return ["-u", url, "-o", str(out), "-n", f"127.0.0.1:{sn.port}", "--home", str(home), "--ip", "127.0.0.1",
            "--json", "-s", "0", "--notbs"]


async def test_preheat_then_dfget_gets_it_with_no_origin_traffic(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    token_file = tmp_path / "admin-token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    sn = supernode(extra_args=["--admin-token-file", str(token_file)])
    size = 9 * MIB + 17
    origin.put_random("pre.bin", size, seed=51)
    url = origin.url("pre.bin")
    status, err = await api("POST", f"{sn.url}/api/v1/preheat", {"url": url})
    assert (status, err["error"]) == (401, "unauthorized")
    assert origin.stats()["requests"] == 0
    status, job = await api("POST", f"{sn.url}/api/v1/preheat", {"url": url, "headers": {"X-Trace": "1"}},
                            token=TOKEN)
    assert status == 202 and job["status"] in ("pending", "fetching", "success"), job
    deadline = time.monotonic() + 30
    while job["status"] in ("pending", "fetching") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        status, job = await api("GET", f"{sn.url}/api/v1/preheat/{job['id']}", token=TOKEN)
        assert status == 200, job
        assert 0 <= job["bytes_fetched"] <= size
    assert job["status"] == "success", job
    assert (job["length"], job["piece_count"], job["pieces_fetched"], job["bytes_fetched"]) == (size, 3, 3, size)
    assert job["error"] is None
    before = origin.stats()["by_file"]["pre.bin"]
    assert before["requests"] == 1 and before["bytes"] == size
    assert before["last_headers"].get("X-Trace") == "1"

    out, home = tmp_path / "out.bin", tmp_path / "home"
    try:
        r = await run_dfget(*dfget_args(sn, url, out, home))
    finally:
        await stop_server(home)
    assert r.code == 0, r.stderr
    assert out.read_bytes() == file_bytes(size, seed=51)
    assert r.report["bytes_from_origin"] == 0 and r.report["bytes_from_supernode"] == size
    assert origin.stats()["by_file"]["pre.bin"] == before  # not one more origin byte or request
    # a preheat of the same URL is the same job, already done
    status, again = await api("POST", f"{sn.url}/api/v1/preheat", {"url": url}, token=TOKEN)
    assert status == 202 and again["id"] == job["id"] and again["status"] == "success"
    assert (await api("GET", f"{sn.url}/api/v1/preheat/{'0' * 64}", token=TOKEN))[0] == 404
    assert (await api("GET", f"{sn.url}/api/v1/preheat/nope", token=TOKEN))[0] == 400


async def _two_downloads(sn, origin, tmp_path: Path, name: str, seed: int) -> tuple[Path, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Two dfgets of one file, one after the other: the second gets pieces from the first's
    peer server. Returns the first's home and the second's report."""
    size = 13 * MIB
    origin.put_random(name, size, seed=seed)
    homes = [tmp_path / "h1", tmp_path / "h2"]
    try:
        for i, home in enumerate(homes):
            r = await run_dfget(*dfget_args(sn, origin.url(name), tmp_path / f"out{i}", home))
            assert r.code == 0, r.stderr
            assert (tmp_path / f"out{i}").read_bytes() == file_bytes(size, seed=seed)
        return homes[0], r.report
    except BaseException:
        for home in homes:
            await stop_server(home)
        raise


async def _peer_get(home: Path, task_id: str) -> tuple[int, Any, ServerInfo]:
    """GET the first 100 bytes from that home's peer server, with no token."""
    client = ControlClient(home)
    try:
        info = await client.info()
    finally:
        await client.close()
    url = f"http://127.0.0.1:{info.port}/peer/file/{task_id}"
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Range": "bytes=0-99"}) as r:
        return r.status, (await r.json() if r.status != 206 else await r.read()), info


async def test_tokens_on_peers_serve_only_with_a_token(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()
    first, report = await _two_downloads(sn, origin, tmp_path, "on.bin", 52)
    try:
        assert report["bytes_from_peers"] > 0  # the token each assignment carried was accepted
        status, body, info = await _peer_get(first, report["task_id"])
        assert status == 401 and body["detail"]["reason"] == "missing"
        assert info.auth_refused == {}  # the second download was never refused
    finally:
        await stop_server(first)
        await stop_server(tmp_path / "h2")


async def test_tokens_off_peers_serve_without(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode(extra_args=["--no-piece-auth"])
    first, report = await _two_downloads(sn, origin, tmp_path, "off.bin", 53)
    try:
        assert report["bytes_from_peers"] > 0
        status, body, _ = await _peer_get(first, report["task_id"])
        assert status == 206 and body == file_bytes(100, seed=53)
    finally:
        await stop_server(first)
        await stop_server(tmp_path / "h2")


async def test_refused_peer_address_downloads_without_serving(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode(extra_args=["--deny-peer", "127.0.0.0/8"])  # what a production supernode says to loopback
    origin.put_random("lo.bin", 5 * MIB, seed=54)
    home = tmp_path / "home"
    try:
        r = await run_dfget(*dfget_args(sn, origin.url("lo.bin"), tmp_path / "out", home))
    finally:
        await stop_server(home)
    assert r.code == 0, r.stderr
    assert (tmp_path / "out").read_bytes() == file_bytes(5 * MIB, seed=54)
    assert r.report["back_to_source"] is None and r.report["bytes_from_supernode"] == 5 * MIB
    status, peers = await api("GET", f"{sn.url}/api/v1/tasks/{r.report['task_id']}/peers")
    assert status == 200 and peers["peers"] == []  # registered as a client that does not serve


async def test_preheat_with_filter_and_identifier_is_the_task_dfget_asks_for(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()  # no admin token configured: preheat is open
    size = 5 * MIB + 3
    origin.put_random("signed.bin", size, seed=53)
    body = {"url": origin.url("signed.bin", sig="one", exp="1"), "filter": ["sig", "exp"],
            "identifier": "release-7"}
    status, job = await api("POST", f"{sn.url}/api/v1/preheat", body)
    assert status == 202, job
    deadline = time.monotonic() + 30
    while job["status"] in ("pending", "fetching") and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        job = (await api("GET", f"{sn.url}/api/v1/preheat/{job['id']}"))[1]
    assert job["status"] == "success", job
    before = origin.stats()["by_file"]["signed.bin"]
    assert before["bytes"] == size

    # another signature, the same filter and identifier: the preheated task, no origin traffic
    url2 = origin.url("signed.bin", sig="two", exp="2")
    home = tmp_path / "home"
    try:
        r = await run_dfget(*dfget_args(sn, url2, tmp_path / "a.bin", home), "-f", "sig&exp",
                            "-i", "release-7")
        assert r.code == 0, r.stderr
        assert r.report["task_id"] == job["id"]
        assert r.report["bytes_from_origin"] == 0 and r.report["bytes_from_supernode"] == size
        assert origin.stats()["by_file"]["signed.bin"] == before
        # a different identifier names a different file: a new task, fetched from the origin
        r = await run_dfget(*dfget_args(sn, url2, tmp_path / "b.bin", home), "-f", "sig&exp",
                            "-i", "release-8")
        assert r.code == 0, r.stderr
        assert r.report["task_id"] != job["id"]
        assert origin.stats()["by_file"]["signed.bin"]["bytes"] == 2 * size
    finally:
        await stop_server(home)
    for name in ("a.bin", "b.bin"):
        assert (tmp_path / name).read_bytes() == file_bytes(size, seed=53)
