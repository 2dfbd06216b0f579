"""The admin token on the supernode API, the peer address policy at registration, and
their settings. In-process app on the embedded store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from supernode_support import Api, app_for, peer, settings_for

from supernode.api.admin import admin_only
from supernode.cli import build_settings

TOKEN = "s3cret-admin-token-0123456789"
ORIGIN = "http://127.0.0.1:9/x"  # never dialled by the requests that must be refused


@pytest.fixture
async def admin_api(aiohttp_client, tmp_path: Path) -> Api:  # type: ignore[no-untyped-def]
    return Api(await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, admin_token=TOKEN))))


async def call(api: Api, method: str, path: str, auth: str | None, body: dict[str, Any] | None = None
               ) -> tuple[int, dict[str, Any]]:
    headers = {"Authorization": auth} if auth is not None else {}
    resp = await api.client.request(method, path, json=body, headers=headers)
    return resp.status, await resp.json()


async def test_admin_operations_need_the_token(admin_api: Api, origin) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("a.bin", 1000, seed=41)
    reg = await admin_api.register(origin.url("a.bin"), peer=peer(15001, "10.0.0.7"))
    tid = reg["task"]["task_id"]
    ops = [("DELETE", f"/api/v1/tasks/{tid}", None), ("GET", f"/api/v1/tasks/{tid}", None),
           ("GET", f"/api/v1/tasks/{tid}/peers", None), ("POST", "/api/v1/preheat", {"url": origin.url("a.bin")}),
           ("GET", f"/api/v1/preheat/{tid}", None), ("GET", "/api/v1/ui/peers", None),
           ("GET", f"/api/v1/tasks/{tid}/map", None)]
    for method, path, body in ops:
        for auth in (None, "", "Bearer", f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", f"Basic {TOKEN}", TOKEN):
            status, err = await call(admin_api, method, path, auth, body)
            assert (status, err["error"]) == (401, "unauthorized"), (method, path, auth)
    assert origin.stats()["requests"] == 1  # the refused preheat fetched nothing
    status, peers = await call(admin_api, "GET", f"/api/v1/tasks/{tid}/peers", f"Bearer {TOKEN}")
    assert status == 200 and peers["peers"] == [
        {"cid": reg["cid"], "peer_id": peers["peers"][0]["peer_id"], "ip": "10.0.0.7", "port": 15001, "kind": "peer",
         "tls": False}]
    status, _ = await call(admin_api, "GET", f"/api/v1/tasks/{tid}", f"bearer  {TOKEN} ")
    assert status == 200
    status, ui = await call(admin_api, "GET", "/api/v1/ui/peers", f"Bearer {TOKEN}")
    assert status == 200 and [p["ip"] for p in ui["peers"]] == ["10.0.0.7"]
    status, _ = await call(admin_api, "GET", f"/api/v1/tasks/{tid}/map", f"Bearer {TOKEN}")
    assert status == 200
    status, body = await call(admin_api, "DELETE", f"/api/v1/tasks/{tid}", f"Bearer {TOKEN}")
    assert status == 200 and body == {"deleted": tid}
    # the protocol itself needs no admin token
    listing = await (await admin_api.client.get("/api/v1/tasks")).json()
    assert listing["tasks"] == []
    text = await (await admin_api.client.get("/metrics")).text()
    assert 'supernode_auth_refused_total{kind="admin",reason="missing"} 35.0' in text
    assert 'supernode_auth_refused_total{kind="admin",reason="wrong"} 14.0' in text


async def test_without_a_configured_token_admin_operations_are_open(aiohttp_client, tmp_path: Path,
                                                                    origin) -> None:  # type: ignore[no-untyped-def]
    api = Api(await aiohttp_client(app_for(settings_for(tmp_path / "sn", None))))
    origin.put_random("o.bin", 1000, seed=42)
    tid = (await api.register(origin.url("o.bin")))["task"]["task_id"]
    assert (await call(api, "GET", f"/api/v1/tasks/{tid}/peers", None))[0] == 200
    assert (await call(api, "DELETE", f"/api/v1/tasks/{tid}", "Bearer whatever"))[0] == 200


async def test_the_decorator_guards_any_handler_of_the_app(aiohttp_client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What the dashboard reuses: `admin_only` on a handler added to the supernode app."""

    @admin_only
    async def data(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = app_for(settings_for(tmp_path / "sn", None, admin_token=TOKEN))
    app.router.add_get("/ui/data", data)
    api = Api(await aiohttp_client(app))
    assert await call(api, "GET", "/ui/data", None) == (401, {
        "error": "unauthorized", "message": "this operation needs the admin token (Authorization: Bearer <token>)"})
    assert await call(api, "GET", "/ui/data", f"Bearer {TOKEN}") == (200, {"ok": True})


@pytest.mark.parametrize("ip", ["127.0.0.1", "127.5.5.5", "::1", "169.254.169.254", "fe80::1", "0.0.0.0",
                                "::", "224.0.0.1", "ff02::1", "::ffff:127.0.0.1", "255.255.255.255"])
async def test_peer_address_denied_by_default(aiohttp_client, tmp_path: Path, ip: str) -> None:  # type: ignore[no-untyped-def]
    api = Api(await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, allow_peer=()))))
    body = await api.register(ORIGIN, status=403, peer=peer(15001, ip))
    assert body["error"] == "peer_denied_by_policy" and body["detail"] == {"ip": ip}
    assert (await (await api.client.get("/api/v1/tasks")).json())["tasks"] == []  # nothing registered


async def test_peer_policy_allow_and_deny(aiohttp_client, tmp_path: Path, origin) -> None:  # type: ignore[no-untyped-def]
    api = Api(await aiohttp_client(app_for(settings_for(
        tmp_path / "sn", None, allow_peer=("127.0.0.0/8",), deny_peer=("10.9.0.0/16", "127.0.0.9/32")))))
    origin.put_random("p.bin", 1000, seed=43)
    for ip in ("127.0.0.2", "10.0.0.7", "192.168.1.5", "2001:db8::5"):
        await api.register(origin.url("p.bin"), peer=peer(15001, ip))
    for ip in ("10.9.1.1", "127.0.0.9"):
        body = await api.register(origin.url("p.bin"), status=403, peer=peer(15001, ip))
        assert body["error"] == "peer_denied_by_policy"
    # without a peer (download only) there is no address to check
    await api.register(origin.url("p.bin"), peer=None)


def test_settings(tmp_path: Path) -> None:
    tok = tmp_path / "token"
    tok.write_text(TOKEN + "\n")
    s = build_settings({"admin_token_file": str(tok), "allow_peer": ("127.0.0.0/8",), "piece_auth": False,
                        "piece_token_ttl": "2m"})
    assert s.admin_token == TOKEN and s.allow_peer == ("127.0.0.0/8",) and not s.piece_auth
    assert s.piece_token_ttl == 120 and TOKEN not in repr(s)
    assert s.peer_policy().permits("127.0.0.1") and not build_settings({}).peer_policy().permits("127.0.0.1")
    for values, message in [
        ({"admin_token": "short"}, "at least 16"),
        ({"admin_token": TOKEN, "admin_token_file": str(tok)}, "not both"),
        ({"admin_token_file": str(tmp_path / "missing")}, "cannot read"),
        ({"allow_peer": ("nope",)}, "not a network"),
        ({"piece_token_ttl": "1s"}, "piece-token-ttl"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_settings(values)
