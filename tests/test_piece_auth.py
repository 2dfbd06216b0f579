"""Piece tokens where they are checked: the supernode's seed (download port) and the peer
server refuse every request without a token the supernode issued for exactly that piece,
task, client and source, and serve the one with it. In-process apps; a real origin."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from supernode_support import Api, app_for, download_all, fetch_piece, settings_for

from common import tokens, wire
from common.taskid import new_id
from dfget.server.app import build_peer_app
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry
from supernode import auth
from supernode.state import STATE

MIB = 1 << 20
PIECE = 4 * MIB


@dataclass
class Target:
    """A server checking tokens: where to send requests and what it trusts."""

    base: str  # http://host:port
    task_id: str
    signer: tokens.Signer  # a key the server trusts
    source: str  # the id tokens must name to be valid here
    data: bytes
    extra: dict[str, Any] = field(default_factory=dict)

    def token(self, **over: Any) -> str:
        kw: dict[str, Any] = {"task_id": self.task_id, "piece": 1, "start": PIECE, "end": 2 * PIECE - 1,
                              "client": CID, "source": self.source, "expires": int(time.time()) + 60}
        signer = over.pop("signer", self.signer)
        kw.update(over)
        return signer.issue(**kw)

    async def get(self, token: str | None, client: str | None = None) -> tuple[int, dict[str, Any] | bytes]:
        headers = {"Range": f"bytes={PIECE}-{2 * PIECE - 1}"}
        if token is not None:
            headers[tokens.TOKEN_HEADER] = token
        if client is not None:
            headers[tokens.CLIENT_HEADER] = client
        async with aiohttp.ClientSession() as s, s.get(f"{self.base}/peer/file/{self.task_id}",
                                                        headers=headers) as r:
            if r.status == 206:
                return r.status, await r.read()
            return r.status, await r.json()


CID = new_id()


@pytest.fixture
async def seed(aiohttp_client, tmp_path: Path, origin) -> Target:  # type: ignore[no-untyped-def]
    """The supernode's seed, holding a 9 MiB file (3 pieces) in its CDN cache."""
    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", None)))
    api = Api(client)
    origin.put_random("s.bin", 9 * MIB, seed=31)
    reg = await api.register(origin.url("s.bin"))
    tid = reg["task"]["task_id"]
    data = await download_all(api, tid, reg["cid"], 9 * MIB)  # with the tokens of the assignments
    st = client.app[STATE]
    signer = tokens.Signer(auth.load_or_create_key(tmp_path / "sn"))
    assert reg["piece_auth"] is True and reg["keys"] == [{"kid": signer.kid.hex(), "key": signer.public.hex()}]
    return Target(f"http://127.0.0.1:{st.download_port}", tid, signer, st.sn_id, data, {"client": client})


@pytest.fixture
async def peer(tmp_path: Path) -> AsyncIterator[Target]:
    """A peer server holding a 9 MiB file, registered with piece_auth (as dfget does when
    the supernode says so) and the supernode's key."""
    data = os.urandom(9 * MIB)
    path = tmp_path / "f"
    path.write_bytes(data)
    tid = "cd" * 32
    signer = tokens.Signer(Ed25519PrivateKey.generate())
    state = ServerState(ServerConfig(home=tmp_path))
    state.keys.add([wire.PieceKey(kid=signer.kid.hex(), key=signer.public.hex())])
    state.table.register(FileEntry(task_id=tid, path=path, length=len(data), piece_size=PIECE, supernodes=[],
                                   verified={0, 1, 2}, piece_auth=True))
    later = tokens.Signer(Ed25519PrivateKey.generate())  # a supernode that joins the cluster later

    async def refresh() -> bool:
        return state.keys.add([wire.PieceKey(kid=later.kid.hex(), key=later.public.hex())]) > 0

    async with TestClient(TestServer(build_peer_app(state, lambda e: None, refresh), host="127.0.0.1")) as c:
        yield Target(f"http://127.0.0.1:{c.port}", tid, signer, state.peer_id, data,
                     {"state": state, "later": later})


@pytest.fixture(params=["seed", "peer"])
def target(request: pytest.FixtureRequest) -> Target:
    return request.getfixturevalue(request.param)  # type: ignore[no-any-return]


async def test_the_right_token_is_served(target: Target) -> None:
    status, body = await target.get(target.token(), CID)
    assert status == 206 and body == target.data[PIECE:2 * PIECE]


@pytest.mark.parametrize("case, status, reason", [
    ("no token", 401, "missing"),
    ("expired", 401, "expired"),
    ("another piece", 403, "wrong_range"),
    ("another task", 403, "wrong_task"),
    ("another client", 403, "wrong_client"),
    ("no client header", 403, "wrong_client"),
    ("another source", 403, "wrong_source"),
    ("another key", 401, "unknown_key"),
    ("garbage", 401, "malformed"),
])
async def test_refused(target: Target, case: str, status: int, reason: str) -> None:
    token, client = {
        "no token": (None, CID),
        "expired": (target.token(expires=int(time.time()) - tokens.LEEWAY - 60), CID),
        "another piece": (target.token(piece=0, start=0, end=PIECE - 1), CID),
        "another task": (target.token(task_id="ef" * 32), CID),
        "another client": (target.token(), new_id()),
        "no client header": (target.token(), None),
        "another source": (target.token(source=new_id()), CID),
        "another key": (target.token(signer=tokens.Signer(Ed25519PrivateKey.generate())), CID),
        "garbage": ("x" * 215, CID),
    }[case]
    got, body = await target.get(token, client)
    assert got == status, body
    assert isinstance(body, dict)
    assert body["error"] == ("unauthorized" if status == 401 else "forbidden")
    assert body["detail"]["reason"] == reason
    if "state" in target.extra:  # counted
        assert target.extra["state"].auth_refused[reason] == 1
    else:
        text = await (await target.extra["client"].get("/metrics")).text()
        assert f'supernode_auth_refused_total{{kind="piece",reason="{reason}"}} 1.0' in text


async def test_a_piece_not_held_is_not_revealed_without_a_token(peer: Target) -> None:
    peer.extra["state"].table.get(peer.task_id).verified.discard(1)
    assert (await peer.get(None, CID))[0] == 401
    assert (await peer.get(peer.token(), CID))[0] == 404


async def test_peer_server_learns_a_new_supernode_key_once(peer: Target) -> None:
    later = peer.extra["later"]
    status, body = await peer.get(peer.token(signer=later), CID)
    assert status == 206 and body == peer.data[PIECE:2 * PIECE]
    # an unknown key again: no second refresh within the rate limit, refused
    other = tokens.Signer(Ed25519PrivateKey.generate())
    assert (await peer.get(peer.token(signer=other), CID))[0] == 401


async def test_files_registered_without_piece_auth_need_no_token(peer: Target) -> None:
    peer.extra["state"].table.get(peer.task_id).piece_auth = False
    status, body = await peer.get(None)
    assert status == 206 and body == peer.data[PIECE:2 * PIECE]


async def test_no_piece_auth_supernode_gives_no_tokens_and_the_seed_serves_without(
        aiohttp_client, tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    client = await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, piece_auth=False)))
    api = Api(client)
    origin.put_random("n.bin", 5 * MIB, seed=32)
    reg = await api.register(origin.url("n.bin"))
    assert reg["piece_auth"] is False and reg["keys"] == []
    data = await download_all(api, reg["task"]["task_id"], reg["cid"], 5 * MIB)  # no token sent
    assert data == origin.dir.joinpath("n.bin").read_bytes()
    other = await api.register(origin.url("n.bin"))
    res = await api.pull(reg["task"]["task_id"], other["cid"], limit=2)
    assert res["assignments"] and all(a["token"] is None for a in res["assignments"])
    keys = await (await client.get("/api/v1/keys")).json()
    assert keys == {"piece_auth": False, "keys": []}


@pytest.mark.redis
async def test_two_supernodes_verify_each_others_tokens(aiohttp_client, tmp_path: Path, origin,
                                                         redis_url) -> None:  # type: ignore[no-untyped-def]
    """A's CDN holds the file; B schedules a client onto A's seed with a token B signed.
    A started before B, so it learns B's key from Redis when the token arrives."""
    a = Api(await aiohttp_client(app_for(settings_for(tmp_path / "a", redis_url))))
    b = Api(await aiohttp_client(app_for(settings_for(tmp_path / "b", redis_url))))
    origin.put_random("h.bin", 9 * MIB, seed=33)
    first = await a.register(origin.url("h.bin"), peer=None)  # not a source: B must use A's seed
    tid = first["task"]["task_id"]
    await download_all(a, tid, first["cid"], 9 * MIB)  # A's CDN has it all now
    second = await b.register(origin.url("h.bin"), peer=None)
    assert {k["kid"] for k in second["keys"]} == {k["kid"] for k in first["keys"]} | {
        tokens.Signer(auth.load_or_create_key(tmp_path / "b")).kid.hex()}
    res = await b.pull(tid, second["cid"], limit=3)
    cdn = [x for x in res["assignments"] if x["source"]["kind"] == "cdn"]
    assert cdn and all(x["source"]["cid"] == a.client.app[STATE].sn_id for x in cdn)
    for x in res["assignments"]:  # B's tokens, checked by A's seed (206 asserted)
        assert len(await fetch_piece(x, tid, second["cid"])) == x["end"] - x["start"] + 1
    await b.report(tid, second["cid"], [{"piece": x["piece"], "result": "ok", "source": x["source"]["cid"]}
                                         for x in res["assignments"]])
    assert a.client.app[STATE].keyring._refreshed > 0  # A learnt B's key when its first token came
    text = await (await a.client.get("/metrics")).text()
    assert "supernode_auth_refused_total{" not in text  # nothing refused on the way
    keys = await (await a.client.get("/api/v1/keys")).json()
    assert len(keys["keys"]) == 2


def test_key_file_created_private_and_reused(tmp_path: Path) -> None:
    k1 = auth.load_or_create_key(tmp_path)
    path = tmp_path / auth.KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert tokens.Signer(auth.load_or_create_key(tmp_path)).kid == tokens.Signer(k1).kid
    assert [p.name for p in tmp_path.iterdir()] == [auth.KEY_FILE]  # no temp file left


@pytest.mark.parametrize("content, mode, message", [
    (None, 0o644, "chmod 600"),
    (b"not a key", 0o600, "not a PEM private key"),
])
def test_unusable_key_file_is_refused(tmp_path: Path, content: bytes | None, mode: int, message: str) -> None:
    auth.load_or_create_key(tmp_path)
    path = tmp_path / auth.KEY_FILE
    if content is not None:
        path.write_bytes(content)
    path.chmod(mode)
    with pytest.raises(auth.KeyFileError, match=message):
        auth.load_or_create_key(tmp_path)
