"""Heartbeat and down speak for a peer: only the peer server that registered it may send
them (supernode/api/peerauth.py). Before, anyone reaching the API could take any peer out of
every swarm with one POST naming its id."""

from __future__ import annotations

import re
from pathlib import Path

import aiohttp
import pytest
from conftest import file_bytes
from dfget_support import run_dfget, stop_server
from supernode_support import Api, app_for, as_peer, download_all, peer, settings_for

MIB = 1 << 20
SECRET = re.compile(r"^[0-9a-f]{64}$")


async def _refused(api: Api, path: str, body: dict, secret: str | None) -> dict:  # type: ignore[type-arg]
    resp = await api.client.post(path, json=body, headers=as_peer(secret))
    data = await resp.json()
    assert resp.status == 403 and data["error"] == "peer_secret_refused", (resp.status, data)
    return data  # type: ignore[no-any-return]


async def test_registration_hands_out_the_peer_secret_and_only_it_speaks_for_the_peer(
        api: Api, origin) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("a.bin", 5 * MIB, seed=81)
    p = peer()
    a = await api.register(origin.url("a.bin"), peer=p)
    secret = a["peer_secret"]
    assert SECRET.match(secret)
    assert (await api.register(origin.url("a.bin"), peer=None))["peer_secret"] is None
    tid = a["task"]["task_id"]
    await download_all(api, tid, a["cid"], 5 * MIB)

    beat = {"peer_id": p["peer_id"]}
    await _refused(api, "/api/v1/peers/heartbeat", beat, None)
    err = await _refused(api, "/api/v1/peers/heartbeat", beat, "0" * 64)
    assert "X-Dragonfly-Peer-Secret wrong" in err["message"]
    assert (await api.post("/api/v1/peers/heartbeat", beat, headers=as_peer(secret)))["ok"] is True

    # a down without the secret changes nothing: the peer is still a source
    await _refused(api, "/api/v1/peers/down", {"peer_id": p["peer_id"]}, None)
    await _refused(api, "/api/v1/peers/down", {"peer_id": p["peer_id"], "tasks": [tid]}, secret[::-1])
    other = await api.register(origin.url("a.bin"))
    res = await api.pull(tid, other["cid"], limit=2)
    assert res["assignments"] and all(x["source"]["kind"] == "peer" for x in res["assignments"])

    down = await api.post("/api/v1/peers/down", {"peer_id": p["peer_id"]}, headers=as_peer(secret))
    assert down["removed"] == 1


async def test_a_taken_peer_id_cannot_be_registered_without_its_secret(api: Api, origin) -> None:  # type: ignore[no-untyped-def]
    """Else anyone who learnt a peer id would register it once and read its secret in
    the reply."""
    origin.put_random("b.bin", 100, seed=82)
    p = peer()
    first = await api.register(origin.url("b.bin"), peer=p)
    err = await api.register(origin.url("b.bin"), status=403, peer=p)
    assert err["error"] == "peer_secret_refused" and "X-Dragonfly-Peer-Secret" in err["message"]
    await api.register(origin.url("b.bin"), status=403, peer=p, secret="f" * 64)
    again = await api.register(origin.url("b.bin"), peer=p, secret=first["peer_secret"])
    assert again["peer_secret"] == first["peer_secret"] and again["cid"] != first["cid"]
    # a secret from another cluster, on a peer id this one has not seen: ignored
    fresh = await api.register(origin.url("b.bin"), peer=peer(), secret=first["peer_secret"])
    assert SECRET.match(fresh["peer_secret"]) and fresh["peer_secret"] != first["peer_secret"]


@pytest.mark.redis
async def test_every_supernode_on_one_redis_knows_the_secret(aiohttp_client, tmp_path: Path, origin,
                                                           redis_url) -> None:  # type: ignore[no-untyped-def]
    """A dfget failing over registers its peer at another supernode with the secret the
    first gave, and the peer server's heartbeats to either are accepted."""
    a = Api(await aiohttp_client(app_for(settings_for(tmp_path / "a", redis_url))))
    b = Api(await aiohttp_client(app_for(settings_for(tmp_path / "b", redis_url))))
    origin.put_random("c.bin", 100, seed=83)
    p = peer()
    secret = (await a.register(origin.url("c.bin"), peer=p))["peer_secret"]
    await b.register(origin.url("c.bin"), status=403, peer=p)
    assert (await b.register(origin.url("c.bin"), peer=p, secret=secret))["peer_secret"] == secret
    assert (await b.post("/api/v1/peers/heartbeat", {"peer_id": p["peer_id"]}, headers=as_peer(secret)))["ok"]


async def _requests(sn_url: str, endpoint: str) -> dict[str, float]:
    async with aiohttp.ClientSession() as s, s.get(f"{sn_url}/metrics") as r:
        text = await r.text()
    pat = rf'^supernode_requests_total\{{endpoint="{re.escape(endpoint)}",method="POST",status="(\d+)"\}} (\S+)$'
    return {m.group(1): float(m.group(2)) for m in re.finditer(pat, text, re.M)}


async def test_real_dfgets_sharing_a_peer_server_keep_their_peer_and_its_down_is_accepted(
        supernode, origin, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Two dfgets of one host register the same peer (the second with the secret the
    first handed to the peer server); `dfget server stop` tells the supernode the peer is
    down, with the secret, and the supernode accepts it."""
    sn = supernode()
    origin.put_random("d.bin", 300 * 1024, seed=84)
    origin.put_random("e.bin", 200 * 1024, seed=85)
    home = tmp_path / "home"
    base = ["-n", f"127.0.0.1:{sn.port}", "--home", str(home), "--ip", "127.0.0.1", "--json", "--verbose"]
    try:
        for name, seed in (("d.bin", 84), ("e.bin", 85)):
            r = await run_dfget("-u", origin.url(name), "-o", str(tmp_path / name), *base)
            assert r.code == 0, r.stderr
            assert (tmp_path / name).read_bytes() == file_bytes(len((tmp_path / name).read_bytes()), seed)
            assert "without serving" not in r.stderr and r.report["back_to_source"] is None, r.stderr
        regs = await _requests(sn.url, "/api/v1/tasks")
        assert regs == {"200": 2.0}, regs
        r = await run_dfget("server", "stop", "--home", str(home))
        assert r.code == 0, r.stderr
        downs = await _requests(sn.url, "/api/v1/peers/down")
        assert downs.get("200", 0) >= 1 and "403" not in downs, downs
    finally:
        await stop_server(home)
