"""Per-task piece digests (common/digest.py): blake3 for new tasks of clients that can
check it, sha256 for everyone else; a task keeps its algorithm for life, and a client
that cannot check a task's algorithm is refused before it joins."""

from __future__ import annotations

import hashlib
from typing import Any

import blake3
import pytest
from click.testing import CliRunner
from conftest import file_bytes
from supernode_support import Api, app_for, fetch_piece, peer, settings_for

from common import digest
from supernode.config import Settings

MIB = 1 << 20
BOTH = ["blake3", "sha256"]


def test_algorithms_hash_as_their_references() -> None:
    data = b"dragonfly" * 1000
    assert digest.of(data, "sha256") == hashlib.sha256(data).hexdigest()
    assert digest.of(data, "blake3") == blake3.blake3(data).hexdigest()
    # the BLAKE3 paper's empty-input vector: not a round trip through the same library
    assert digest.of(b"", "blake3") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
    h = digest.new("blake3")
    for i in range(0, len(data), 777):
        h.update(memoryview(data)[i:i + 777])
    assert h.hexdigest() == digest.of(data, "blake3")
    assert digest.of(data) == digest.of(data, "sha256")  # no algorithm named: the legacy one
    with pytest.raises(digest.UnknownAlgorithm):
        digest.new("md5")
    with pytest.raises(digest.UnknownAlgorithm):
        digest.check("sha1")


def test_choice_of_a_new_task() -> None:
    assert digest.choose(BOTH, "blake3") == "blake3"
    assert digest.choose(["sha256"], "blake3") == "sha256"
    assert digest.choose(["sha3-256", "blake3"], "blake3") == "blake3"  # unknown names are ignored
    assert digest.choose([], "blake3") == "sha256"
    assert digest.choose(BOTH, "sha256") == "sha256"


def test_bad_setting_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(ValueError, match="--piece-digest"):
        Settings(home=tmp_path, piece_digest="md5").validate()
    from supernode.cli import main

    res = CliRunner().invoke(main, ["--piece-digest", "md5", "--home", str(tmp_path)])
    assert res.exit_code == 2 and "md5" in res.output


async def _download(api: Api, reg: dict[str, Any], length: int) -> bytes:
    """The protocol as dfget drives it, every piece checked by the task's algorithm."""
    task, cid = reg["task"], reg["cid"]
    out, reports = bytearray(length), []
    for _ in range(1000):
        res = await api.pull(task["task_id"], cid, limit=4, reports=reports)
        reports = []
        if res["state"] == "finished":
            return bytes(out)
        for a in res["assignments"]:
            data = await fetch_piece(a, task["task_id"], cid)
            assert digest.of(data, task["digest_algo"]) == a["digest"]
            out[a["start"]: a["end"] + 1] = data
            reports.append({"piece": a["piece"], "result": "ok", "source": a["source"]["cid"]})
    raise AssertionError("download did not finish")


async def test_a_client_that_checks_blake3_gets_a_blake3_task(api: Api, origin) -> None:
    size = 9 * MIB + 5
    origin.put_random("b.bin", size, seed=31)
    reg = await api.register(origin.url("b.bin"), digest_algos=BOTH)
    assert reg["task"]["digest_algo"] == "blake3"
    assert await _download(api, reg, size) == file_bytes(size, seed=31)
    dig = await (await api.client.get(f"/api/v1/tasks/{reg['task']['task_id']}/digests")).json()
    want = file_bytes(size, seed=31)
    assert dig["task"]["digest_algo"] == "blake3"
    assert dig["digests"] == [blake3.blake3(want[i:i + 4 * MIB]).hexdigest() for i in range(0, size, 4 * MIB)]
    # a second client that can check both joins it as it is
    again = await api.register(origin.url("b.bin"), digest_algos=["sha256", "blake3"])
    assert again["task"]["digest_algo"] == "blake3"
    assert origin.stats()["by_file"]["b.bin"]["requests"] == 1


async def test_a_client_that_names_no_algorithm_gets_sha256_and_keeps_it(api: Api, origin) -> None:
    origin.put_random("s.bin", 5 * MIB, seed=32)
    old = await api.register(origin.url("s.bin"))  # a dfget from before the choice
    assert old["task"]["digest_algo"] == "sha256"
    new = await api.register(origin.url("s.bin"), digest_algos=BOTH)
    assert new["task"]["digest_algo"] == "sha256"  # fixed at registration, for life
    assert await _download(api, new, 5 * MIB) == file_bytes(5 * MIB, seed=32)


async def test_a_client_that_cannot_check_the_tasks_digest_is_refused(api: Api, origin) -> None:
    origin.put_random("r.bin", 5 * MIB, seed=33)
    reg = await api.register(origin.url("r.bin"), digest_algos=BOTH)
    tid = reg["task"]["task_id"]
    before = await (await api.client.get(f"/api/v1/tasks/{tid}/peers")).json()
    p = peer(port=15077)
    refused = await api.register(origin.url("r.bin"), status=409, peer=p)
    assert refused["error"] == "digest_unsupported" and "blake3" in refused["message"]
    refused = await api.register(origin.url("r.bin"), status=409, digest_algos=["sha3-256"])
    assert refused["error"] == "digest_unsupported"
    after = await (await api.client.get(f"/api/v1/tasks/{tid}/peers")).json()
    assert after == before  # the refused client did not join
    assert (await api.register(origin.url("r.bin"), digest_algos=BOTH))["task"]["digest_algo"] == "blake3"


async def test_content_named_tasks_stay_sha256(api: Api, origin) -> None:
    data = file_bytes(3 * MIB, seed=34)
    origin.put("c.bin", data)
    ident = "sha256:" + hashlib.sha256(data).hexdigest()
    reg = await api.register(origin.url("c.bin"), identifier=ident, digest_algos=BOTH)
    assert reg["task"]["digest_algo"] == "sha256"
    assert await _download(api, reg, len(data)) == data


async def test_the_supernode_setting_chooses_sha256(aiohttp_client, tmp_path, origin) -> None:
    api = Api(await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, piece_digest="sha256"))))
    origin.put_random("o.bin", 5 * MIB, seed=35)
    reg = await api.register(origin.url("o.bin"), digest_algos=BOTH)
    assert reg["task"]["digest_algo"] == "sha256"
    assert await _download(api, reg, 5 * MIB) == file_bytes(5 * MIB, seed=35)


# --- end to end: real supernode and dfget processes -----------------------------------
def _dfget_args(sn: Any, url: str, out: Any, home: Any) -> list[str]:
    return ["-u", url, "-o", str(out), "-n", f"127.0.0.1:{sn.port}", "--home", str(home),
            "--ip", "127.0.0.1", "--json", "--notbs"]


async def _task(sn: Any, tid: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{sn.url}/api/v1/tasks/{tid}") as r:
        assert r.status == 200, await r.text()
        return (await r.json())["task"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("setting", ["blake3", "sha256"])
async def test_dfget_downloads_and_shares_either_digest(supernode, origin, tmp_path, setting: str) -> None:
    from dfget_support import run_dfget, stop_server

    sn = supernode(redis_url=None, extra_args=("--piece-digest", setting))
    data = file_bytes(9 * MIB + 3, seed=36)
    origin.put("e.bin", data)
    homes = [tmp_path / "h1", tmp_path / "h2"]
    try:
        first = await run_dfget(*_dfget_args(sn, origin.url("e.bin"), tmp_path / "a", homes[0]))
        assert first.code == 0, first.stderr
        second = await run_dfget(*_dfget_args(sn, origin.url("e.bin"), tmp_path / "b", homes[1]))
        assert second.code == 0, second.stderr
    finally:
        for h in homes:
            await stop_server(h)
    assert (tmp_path / "a").read_bytes() == data and (tmp_path / "b").read_bytes() == data
    assert second.report["bytes_from_peers"] > 0  # the first client's copy, checked by the algorithm
    assert (await _task(sn, first.report["task_id"]))["digest_algo"] == setting
    assert origin.stats()["by_file"]["e.bin"]["requests"] == 1


async def test_dfget_joins_a_sha256_task_an_older_client_registered(supernode, origin, tmp_path) -> None:
    import aiohttp
    from dfget_support import run_dfget, stop_server

    sn = supernode(redis_url=None)
    data = file_bytes(5 * MIB, seed=37)
    origin.put("o.bin", data)
    async with aiohttp.ClientSession() as s:  # what a dfget from before the choice sends
        async with s.post(f"{sn.url}/api/v1/tasks", json={"url": origin.url("o.bin")}) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["task"]["digest_algo"] == "sha256"
    try:
        res = await run_dfget(*_dfget_args(sn, origin.url("o.bin"), tmp_path / "o", tmp_path / "h"))
    finally:
        await stop_server(tmp_path / "h")
    assert res.code == 0, res.stderr
    assert (tmp_path / "o").read_bytes() == data
