"""Proof of possession end to end, every party a real process on loopback: an origin,
the supernode challenging every 200 ms, an honest dfget host whose peer server keeps
the file, and two fake peer servers (tests/pop_fake_peer.py) registered as holders of
every piece: one answers garbage, one answers too late. Both must be dropped (and say
so in the supernode's log), the honest one never; a second dfget then gets the file
byte-exact without being sent to either fake."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import aiohttp
from conftest import REPO_ROOT, ProcessRunner, _child_env, file_bytes, free_port
from dfget_support import run_dfget, stop_server

from common.taskid import new_id

MIB = 1 << 20
SIZE = 10 * MIB + 4321  # 3 pieces


async def _register_fake(sn_url: str, url: str, port: int) -> tuple[str, str]:
    """Register a fake peer server as a client of the task and claim every piece."""
    async with aiohttp.ClientSession() as s:
        body = {"url": url, "peer": {"peer_id": new_id(), "ip": "127.0.0.1", "port": port},
                "digest_algos": ["blake3", "sha256"]}
        async with s.post(f"{sn_url}/api/v1/tasks", json=body) as r:
            assert r.status == 200, await r.text()
            reg = await r.json()
        tid, cid = reg["task"]["task_id"], reg["cid"]
        reports = [{"piece": n, "result": "have"} for n in range(reg["task"]["piece_count"])]
        async with s.post(f"{sn_url}/api/v1/tasks/{tid}/report", json={"cid": cid, "reports": reports}) as r:
            assert r.status == 200, await r.text()
    return tid, cid


def _fake(tmp: Path, mode: str) -> ProcessRunner:
    port = free_port()
    return ProcessRunner([sys.executable, str(REPO_ROOT / "tests" / "pop_fake_peer.py"), "--port", str(port),
                          "--mode", mode, "--delay", "8"], tmp / f"fake-{mode}.log",
                         ready_url=f"http://127.0.0.1:{port}/_ping", env=_child_env())


def _port(r: ProcessRunner) -> int:
    return int(r.cmd[r.cmd.index("--port") + 1])


async def _counts(r: ProcessRunner) -> dict[str, int]:
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{_port(r)}/count") as resp:
            return await resp.json()  # type: ignore[no-any-return]


async def test_lying_and_slow_holders_are_dropped_and_downloads_go_elsewhere(
        tmp_path: Path, origin, supernode, store_url: str | None) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("pop.bin", SIZE, seed=13)
    url = origin.url("pop.bin")
    sn = supernode(redis_url=store_url, extra_args=["--pop-interval", "200ms", "--pop-timeout", "3s",
                                               "--pop-max-failures", "2"])
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    common = ["-n", f"127.0.0.1:{sn.port}", "--ip", "127.0.0.1", "--json", "-s", "0"]
    try:
        res = await run_dfget("-u", url, "-o", str(tmp_path / "out-a"), "--home", str(home_a), *common)
        assert res.code == 0, res.stderr
        want = file_bytes(SIZE, seed=13)
        assert (tmp_path / "out-a").read_bytes() == want
        with _fake(tmp_path, "garbage") as liar, _fake(tmp_path, "slow") as slow:
            tid, liar_cid = await _register_fake(sn.url, url, _port(liar))
            _, slow_cid = await _register_fake(sn.url, url, _port(slow))
            log = sn.home / "supernode.log"
            pattern = "client {} .* failed a possession challenge .* dropped as a source of the task"
            deadline = time.monotonic() + 60
            text = ""
            while time.monotonic() < deadline:
                text = log.read_text(errors="replace")
                if all(re.search(pattern.format(c[:12]), text) for c in (liar_cid, slow_cid)):
                    break
                await asyncio.sleep(0.2)
            else:
                raise AssertionError("the fakes were not dropped:\n" + text[-3000:])
            assert re.search(f"client {slow_cid[:12]} .* timeout", text)
            assert re.search(f"client {liar_cid[:12]} .* failed \\(wrong answer\\)", text)
            async with aiohttp.ClientSession() as s:
                async with s.get(f"{sn.url}/metrics") as r:
                    metrics = await r.text()
            passed = re.search(r'supernode_pop_challenges_total\{result="passed"\} (\S+)', metrics)
            assert passed is not None and float(passed.group(1)) >= 1  # the honest host was asked too
            honest = [line for line in text.splitlines() if "failed a possession challenge" in line
                      and liar_cid[:12] not in line and slow_cid[:12] not in line]
            assert honest == []
            res = await run_dfget("-u", url, "-o", str(tmp_path / "out-b"), "--home", str(home_b), *common)
            assert res.code == 0, res.stderr
            got = (tmp_path / "out-b").read_bytes()
            assert hashlib.sha256(got).hexdigest() == hashlib.sha256(want).hexdigest()
            report = json.loads(res.stdout.strip().splitlines()[-1])
            assert report["bytes_from_peers"] + report["bytes_from_supernode"] == SIZE, report
            assert (await _counts(liar))["piece_requests"] == 0
            assert (await _counts(slow))["piece_requests"] == 0
            assert (await _counts(liar))["challenges"] >= 2
    finally:
        for h in (home_a, home_b):
            await stop_server(h)


async def test_a_real_peer_whose_file_rotted_unnoticed_is_dropped(tmp_path: Path, origin, supernode) -> None:  # type: ignore[no-untyped-def]
    """dfget A's output is overwritten in place after it reported its pieces, size and
    mtime kept: its peer server sees nothing wrong and still offers the file. The
    challenge catches it; dfget B still gets the file byte-exact (from the CDN)."""
    import os

    origin.put_random("rot.bin", SIZE, seed=17)
    url = origin.url("rot.bin")
    sn = supernode(redis_url=None, extra_args=["--pop-interval", "200ms", "--pop-timeout", "3s",
                                               "--pop-max-failures", "1"])
    home_a, home_b = tmp_path / "a", tmp_path / "b"
    common = ["-n", f"127.0.0.1:{sn.port}", "--ip", "127.0.0.1", "--json", "-s", "0"]
    out_a = tmp_path / "out-a"
    try:
        res = await run_dfget("-u", url, "-o", str(out_a), "--home", str(home_a), *common)
        assert res.code == 0, res.stderr
        want = file_bytes(SIZE, seed=17)
        st = out_a.stat()
        with out_a.open("r+b") as f:
            f.write(bytes(b ^ 0xFF for b in want))
        os.utime(out_a, ns=(st.st_atime_ns, st.st_mtime_ns))
        log = sn.home / "supernode.log"
        deadline = time.monotonic() + 60
        text = ""
        while time.monotonic() < deadline:
            text = log.read_text(errors="replace")
            if "failed a possession challenge" in text:
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("the rotten peer was not caught:\n" + text[-3000:])
        assert re.search(r"failed a possession challenge of piece \d: failed \(wrong answer\); dropped as a source",
                         text), text[-2000:]
        res = await run_dfget("-u", url, "-o", str(tmp_path / "out-b"), "--home", str(home_b), *common)
        assert res.code == 0, res.stderr
        assert (tmp_path / "out-b").read_bytes() == want
        report = json.loads(res.stdout.strip().splitlines()[-1])
        assert report["bytes_from_peers"] == 0 and report["bytes_from_supernode"] == SIZE, report
    finally:
        for h in (home_a, home_b):
            await stop_server(h)
