"""`dfget upload` against a real supernode process: the uploaded file is then downloaded
by digest with no origin byte; an uploader SIGKILLed half-way resumes where the
supernode's durable offset is."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import free_port, make_file
from dfget_support import Result, run_dfget, stop_server

KIB = 1 << 10
MIB = 1 << 20
TOKEN = "upload-e2e-admin-token-0123"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def upload_args(sn: Any, path: Path, digest: str, home: Path, *extra: str) -> list[str]:
    return ["upload", str(path), "--digest", digest, "-n", f"127.0.0.1:{sn.port}", "--home", str(home),
            "--json", *extra]


def report(res: Result) -> dict[str, Any]:
    assert res.stdout.strip(), res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


async def download(sn: Any, url: str, digest: str, out: Path, home: Path) -> Result:
    try:
        return await run_dfget("-u", url, "-o", str(out), "-n", f"127.0.0.1:{sn.port}", "--home", str(home),
                               "--ip", "127.0.0.1", "--json", "-i", digest, "--notbs", timeout=90)
    finally:
        await stop_server(home)


def spool(sn: Any) -> list[Path]:
    return sorted((sn.home / "uploads").glob("*.part"))


async def test_upload_then_download_by_digest_with_no_origin_bytes(supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()
    src = make_file(tmp_path / "big.bin", 10 * MIB + 4321, seed=31)
    digest = sha256_of(src)
    res = await run_dfget(*upload_args(sn, src, digest, tmp_path / "up", "--chunk-size", "3MiB"))
    rep = report(res)
    assert res.code == 0, res.stderr
    assert rep["state"] == "committed" and rep["bytes_sent"] == rep["length"] == src.stat().st_size
    assert rep["resumed_from"] == 0 and rep["digest"] == digest
    assert spool(sn) == [] and not (tmp_path / "up" / "uploads" / f"{digest[7:]}.json").exists()
    # the origin serves the same bytes and counts every request: the download must not touch it
    origin.put("big.bin", src.read_bytes())
    out = tmp_path / "got.bin"
    res = await download(sn, origin.url("big.bin"), digest, out, tmp_path / "dl")
    assert res.code == 0, res.stderr
    assert out.read_bytes() == src.read_bytes()
    assert "big.bin" not in origin.stats().get("by_file", {})
    # uploading it again sends nothing
    res = await run_dfget(*upload_args(sn, src, digest, tmp_path / "up2"))
    rep = report(res)
    assert res.code == 0 and rep["state"] == "committed" and rep["bytes_sent"] == 0


async def _offset(session: aiohttp.ClientSession, sn: Any, sid: str) -> int | None:
    async with session.head(f"{sn.url}/api/v1/uploads/{sid}") as r:
        return int(r.headers["Upload-Offset"]) if r.status == 200 else None


async def test_uploader_killed_half_way_resumes_at_the_durable_offset(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()
    length = 16 * MIB
    src = make_file(tmp_path / "f.bin", length, seed=32)
    digest = sha256_of(src)
    home = tmp_path / "up"
    state = home / "uploads" / f"{digest[7:]}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dfget", *upload_args(sn, src, digest, home, "--chunk-size", "256KiB", "-s", "2MB"),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    killed_at = None
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                await asyncio.sleep(0.05)
                if not state.exists():
                    continue
                sid = json.loads(state.read_text())["session"]
                off = await _offset(s, sn, sid)
                if off is not None and 0 < off < length // 2:
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    killed_at = await _offset(s, sn, sid)
                    break
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert killed_at is not None and 0 < killed_at < length, killed_at
    assert state.exists()  # the session and its supernode are remembered
    res = await run_dfget(*upload_args(sn, src, digest, home, "--chunk-size", "1MiB"), timeout=90)
    rep = report(res)
    assert res.code == 0, res.stderr
    assert rep["resumed_from"] == killed_at and rep["bytes_sent"] == length - killed_at < length
    assert rep["state"] == "committed" and not state.exists() and spool(sn) == []
    out = tmp_path / "got.bin"
    dead = f"http://127.0.0.1:{free_port()}/gone.bin"  # nobody listens: no origin at all
    res = await download(sn, dead, digest, out, tmp_path / "dl")
    assert res.code == 0, res.stderr
    assert out.read_bytes() == src.read_bytes()


async def test_stale_resume_state_starts_a_new_session(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()
    src = make_file(tmp_path / "s.bin", 300 * KIB, seed=33)
    digest = sha256_of(src)
    home = tmp_path / "up"
    state = home / "uploads" / f"{digest[7:]}.json"
    state.parent.mkdir(parents=True)
    state.write_text(json.dumps({"digest": digest, "length": 300 * KIB, "session": "0" * 32,
                                 "node": {"host": "127.0.0.1", "port": sn.port, "scheme": ""}}))
    res = await run_dfget(*upload_args(sn, src, digest, home, "--chunk-size", "64KiB"))
    rep = report(res)
    assert res.code == 0, res.stderr
    assert rep["resumed_from"] == 0 and rep["bytes_sent"] == 300 * KIB and rep["session"] != "0" * 32


async def test_file_not_matching_its_digest_sends_nothing(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode()
    src = make_file(tmp_path / "m.bin", 100 * KIB, seed=34)
    wrong = "sha256:" + "0" * 64
    res = await run_dfget(*upload_args(sn, src, wrong, tmp_path / "up"))
    assert res.code == 5, res.stderr
    assert "not sha256:0000" in res.stderr and "nothing sent" in res.stderr
    assert report(res)["state"] == "failed"
    assert spool(sn) == [] and not (tmp_path / "up" / "uploads").exists()
    for bad in ("sha256:XYZ", "md5:" + "0" * 32, "sha256:" + "A" * 64):
        res = await run_dfget(*upload_args(sn, src, bad, tmp_path / "up"))
        assert res.code == 2 and "--digest" in res.stderr, (bad, res.stderr)


async def test_upload_to_a_supernode_with_an_admin_token(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sn = supernode(extra_args=("--admin-token", TOKEN))
    src = make_file(tmp_path / "t.bin", 200 * KIB, seed=35)
    digest = sha256_of(src)
    res = await run_dfget(*upload_args(sn, src, digest, tmp_path / "up"))
    assert res.code != 0 and "admin token" in res.stderr, res.stderr
    assert spool(sn) == []
    env_before = os.environ.get("DFGET_ADMIN_TOKEN")
    os.environ["DFGET_ADMIN_TOKEN"] = TOKEN
    try:
        res = await run_dfget(*upload_args(sn, src, digest, tmp_path / "up"))
    finally:
        if env_before is None:
            del os.environ["DFGET_ADMIN_TOKEN"]
        else:
            os.environ["DFGET_ADMIN_TOKEN"] = env_before
    assert res.code == 0, res.stderr
    assert report(res)["state"] == "committed"


@pytest.mark.redis
async def test_uploaded_on_one_supernode_downloaded_through_another(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two supernodes on one Redis: the commit records the task with the uploader as its
    CDN, so a registration on the other is served from the uploader's seed, no origin."""
    sn1, sn2 = supernode(), supernode()
    src = make_file(tmp_path / "shared.bin", 6 * MIB + 99, seed=36)
    digest = sha256_of(src)
    res = await run_dfget(*upload_args(sn1, src, digest, tmp_path / "up", "--chunk-size", "2MiB"))
    assert res.code == 0, res.stderr
    out = tmp_path / "got.bin"
    res = await download(sn2, f"http://127.0.0.1:{free_port()}/shared.bin", digest, out, tmp_path / "dl")
    assert res.code == 0, res.stderr
    assert out.read_bytes() == src.read_bytes()
    assert not (sn2.home / "cdn").exists() or not list((sn2.home / "cdn").glob("*/*.data"))


async def test_supernode_restarted_mid_upload_the_client_retries_and_starts_anew(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The supernode dies mid-upload and comes back on the same port: the uploader rides
    out the outage (bounded backoff), finds its session gone (sessions do not survive a
    restart; the spool file is removed at start) and uploads into a new one."""
    from conftest import REPO_ROOT, ProcessRunner, _child_env

    sn = supernode()
    length = 12 * MIB
    src = make_file(tmp_path / "r.bin", length, seed=37)
    digest = sha256_of(src)
    home = tmp_path / "up"
    state = home / "uploads" / f"{digest[7:]}.json"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dfget", *upload_args(sn, src, digest, home, "--chunk-size", "256KiB", "-s", "3MB"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    again = None
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                await asyncio.sleep(0.05)
                if state.exists():
                    off = await _offset(s, sn, json.loads(state.read_text())["session"])
                    if off is not None and 0 < off < length // 2:
                        break
            else:
                raise AssertionError("the upload never started")
        first = json.loads(state.read_text())["session"]
        sn.runner.kill()
        assert spool(sn) != []  # the killed supernode left its spool file
        await asyncio.sleep(0.5)
        again = ProcessRunner(sn.runner.cmd, sn.home / "supernode-again.log", ready_url=f"{sn.url}/_ping",
                              env=_child_env(), cwd=REPO_ROOT)
        await asyncio.to_thread(again.start)
        out, err = await asyncio.wait_for(proc.communicate(), 90)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        if again is not None:
            again.stop()
    assert proc.returncode == 0, err.decode()
    rep = json.loads(out.decode().strip().splitlines()[-1])
    assert rep["state"] == "committed" and rep["session"] != first and rep["bytes_sent"] > length
    assert spool(sn) == [] and not state.exists()
    cached = list((sn.home / "cdn").glob("*/*.data"))
    assert len(cached) == 1 and cached[0].read_bytes() == src.read_bytes()


async def test_upload_to_a_tls_supernode(tmp_path: Path) -> None:
    """`-n https://...` with --cacert: the upload goes over TLS; without trusting the CA,
    a clear TLS error (exit 9) at once, no retries and no session."""
    import ssl
    import time
    import urllib.request

    from conftest import LOOPBACK, REPO_ROOT, ProcessRunner, _child_env, free_ports
    from tls_support import TestCA

    ca = TestCA(tmp_path / "pki")
    cert = ca.issue("supernode")
    port, dport = free_ports(2)
    home = tmp_path / "sn"
    runner = ProcessRunner([sys.executable, "-m", "supernode", "--listen", LOOPBACK, "--port", str(port),
                            "--download-port", str(dport), "--home", str(home), "--advertise-ip", LOOPBACK,
                            "--cert", cert.cert, "--key", cert.key], tmp_path / "sn.log", env=_child_env(),
                           cwd=REPO_ROOT)
    runner.start()
    try:
        ctx = ssl.create_default_context(cafile=ca.cert)
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"https://{LOOPBACK}:{port}/_ping", timeout=1.0, context=ctx):
                    break
            except OSError:
                assert time.monotonic() < deadline and runner.returncode is None, runner.log_tail()
                await asyncio.sleep(0.05)
        src = make_file(tmp_path / "tls.bin", 700 * KIB, seed=38)
        digest = sha256_of(src)
        args = ["upload", str(src), "--digest", digest, "-n", f"https://{LOOPBACK}:{port}", "--home",
                str(tmp_path / "up"), "--json", "--chunk-size", "256KiB"]
        t0 = time.monotonic()
        res = await run_dfget(*args)
        assert res.code == 9, res.stderr
        assert time.monotonic() - t0 < 10 and "certificate" in res.stderr.lower()
        assert not list((home / "uploads").glob("*.part"))
        res = await run_dfget(*args, "--cacert", ca.cert)
        assert res.code == 0, res.stderr
        rep = report(res)
        assert rep["state"] == "committed" and rep["bytes_sent"] == 700 * KIB
        cached = list((home / "cdn").glob("*/*.data"))
        assert len(cached) == 1 and cached[0].read_bytes() == src.read_bytes()
    finally:
        runner.stop()


async def test_import_with_upload_killed_half_way_resumes_then_serves_without_the_importer(supernode, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`dfget import FILE --upload`: the file goes into the CDN as a resumable upload
    first. Killed half-way and run again, it resumes at the supernode's offset; then the
    importer's peer server is stopped and another host still gets the file by digest."""
    sn = supernode()
    length = 16 * MIB
    src = make_file(tmp_path / "f.bin", length, seed=33)
    digest = sha256_of(src)
    home = tmp_path / "imp"
    state = home / "uploads" / f"{digest[7:]}.json"
    args = ["import", str(src), "--upload", "-n", f"127.0.0.1:{sn.port}", "--home", str(home), "--ip", "127.0.0.1",
            "--json"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dfget", *args, "--chunk-size", "256KiB", "-s", "2MB",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    killed_at = None
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(600):
                await asyncio.sleep(0.05)
                if not state.exists():
                    continue
                off = await _offset(s, sn, json.loads(state.read_text())["session"])
                if off is not None and 0 < off < length // 2:
                    proc.send_signal(signal.SIGKILL)
                    await proc.wait()
                    killed_at = await _offset(s, sn, json.loads(state.read_text())["session"])
                    break
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert killed_at is not None and 0 < killed_at < length, killed_at
    try:
        res = await run_dfget(*args, "--chunk-size", "1MiB", timeout=90)
        rep = report(res)
        assert res.code == 0, res.stderr
        assert rep["digest"] == digest and rep["status"] == "success"
        up = rep["upload"]
        assert up["state"] == "committed" and up["resumed_from"] == killed_at
        assert up["bytes_sent"] == length - killed_at
    finally:
        await stop_server(home)  # the importer is gone: the CDN's copy must do
    out = tmp_path / "got.bin"
    res = await run_dfget("--digest", digest, "-o", str(out), "-n", f"127.0.0.1:{sn.port}",
                          "--home", str(tmp_path / "dl"), "--ip", "127.0.0.1", "--json", timeout=90)
    try:
        assert res.code == 0, res.stderr
        assert out.read_bytes() == src.read_bytes()
        assert report(res)["bytes_from_supernode"] == length
    finally:
        await stop_server(tmp_path / "dl")
