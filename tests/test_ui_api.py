"""The dashboard's JSON endpoints and static files, on the real supernode app (in-process)
against a real origin process, on the embedded store and on the real Redis."""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import tomllib
from pathlib import Path
from typing import Any

import pytest
from supernode_support import Api, download_all, fetch_piece, peer

from supernode.store.repo import PeerInfo
from supernode.scheduling.policy import Bitmap
from supernode.api.ui import ASSETS, STATIC, Coalescer, display_url, held_bytes, peer_rows

MIB = 1 << 20


async def get(api: Api, path: str, status: int = 200) -> Any:
    resp = await api.client.get(path)
    body = await resp.json()
    assert resp.status == status, (resp.status, body)
    return body


def pieces(b64: str, count: int) -> list[int]:
    return Bitmap(base64.b64decode(b64)).members(count)


async def test_static_files_served_and_nothing_else(api: Api) -> None:
    resp = await api.client.get("/ui")
    html = await resp.text()
    assert resp.status == 200 and resp.content_type == "text/html"
    assert '<script src="/ui/dashboard.js">' in html and "frame-ancestors 'none'" in resp.headers[
        "Content-Security-Policy"]
    js = await api.client.get("/ui/dashboard.js")
    assert js.status == 200 and js.content_type == "text/javascript"
    assert "/api/v1/tasks/" in await js.text()
    css = await api.client.get("/ui/dashboard.css")
    assert css.status == 200 and css.content_type == "text/css"
    for bad in ("/ui/ui.py", "/ui/..%2fui.py", "/ui/%2e%2e%2fapp.py", "/ui/index.html%00"):
        resp = await api.client.get(bad)
        assert resp.status == 404, bad
        assert (await resp.json())["error"] == "not_found"
    resp = await api.client.get("/ui/", allow_redirects=False)
    assert resp.status == 302 and resp.headers["Location"] == "/ui"


async def test_tasks_and_map_follow_a_download(api: Api, origin) -> None:
    size = 9 * MIB + 5  # 3 pieces, the last one short
    origin.put_random("u.bin", size, seed=7)
    url = origin.url("u.bin").replace("http://", "http://user:secret@") + "&sig=x"
    url = url.replace("u.bin&", "u.bin?")
    me = peer(15555, "127.0.0.9")
    reg = await api.register(url, peer=me)
    tid, cid = reg["task"]["task_id"], reg["cid"]
    # one assignment in flight, not reported yet: the map says where it comes from
    first = await api.pull(tid, cid, limit=1)
    assert len(first["assignments"]) == 1
    await asyncio.sleep(0.6)  # past the dashboard's cache
    m = await get(api, f"/api/v1/tasks/{tid}/map")
    (c,) = m["clients"]
    assert c["cid"] == cid and (c["ip"], c["port"]) == ("127.0.0.9", 15555)
    assert c["fetching"] == [{"piece": first["assignments"][0]["piece"], "source": m["cdn"]["id"],
                              "kind": "cdn", "addr": None}]
    assert m["cdn"]["here"] and m["cdn"]["uploads"] == 1
    # finish the download, the in-flight piece first
    a = first["assignments"][0]
    await fetch_piece(a, tid, cid)
    ok = {"piece": a["piece"], "result": "ok", "source": a["source"]["cid"]}
    await api.report(tid, cid, [ok])
    await download_all(api, tid, cid, size)
    await asyncio.sleep(0.6)
    m = await get(api, f"/api/v1/tasks/{tid}/map")
    assert m["piece_count"] == 3 and m["task"]["status"] == "success"
    assert pieces(m["cdn"]["bitmap"], 3) == [0, 1, 2] and m["cdn"]["pieces"] == 3
    (c,) = m["clients"]
    assert pieces(c["bitmap"], 3) == [0, 1, 2] and c["pieces"] == 3 and c["bytes"] == size
    assert c["fetching"] == [] and m["clients_total"] == 1 and not m["truncated"]
    assert "secret" not in m["url"] and "sig" not in m["url"] and m["url"].endswith("u.bin?…")
    t = await get(api, "/api/v1/ui/tasks")
    (row,) = t["tasks"]
    assert row["task"]["task_id"] == tid and row["cdn_pieces"] == 3 and row["cdn_bytes"] == size
    assert row["clients"] == 1 and row["held"] == 3 and row["held_bytes"] == size
    assert "secret" not in row["url"]
    p = await get(api, "/api/v1/ui/peers")
    (prow,) = p["peers"]
    assert prow == {"peer_id": me["peer_id"], "ip": "127.0.0.9", "port": 15555, "kind": "peer",
                    "tasks": 1, "alive": True}


async def test_map_is_bounded_and_params_checked(api: Api, origin) -> None:
    origin.put_random("b.bin", 100, seed=1)
    regs = [await api.register(origin.url("b.bin"), peer=peer(16000 + i)) for i in range(7)]
    tid = regs[0]["task"]["task_id"]
    m = await get(api, f"/api/v1/tasks/{tid}/map?clients=3")
    assert len(m["clients"]) == 3 and m["clients_total"] == 7 and m["truncated"]
    ports = [c["port"] for c in m["clients"]]
    assert ports == sorted(ports)
    for q in ("clients=0", "clients=257", "clients=x", "clients=-1"):
        body = await get(api, f"/api/v1/tasks/{tid}/map?{q}", status=400)
        assert body["error"] == "bad_request"
    assert (await get(api, "/api/v1/ui/tasks?limit=0", status=400))["error"] == "bad_request"
    assert (await get(api, "/api/v1/tasks/abc/map", status=400))["error"] == "bad_request"
    unknown = await get(api, "/api/v1/tasks/" + "0" * 64 + "/map", status=404)
    assert unknown["error"] == "not_found"


async def test_coalescer_one_read_for_concurrent_callers_and_failures_not_kept() -> None:
    calls = 0
    gate = asyncio.Event()

    async def make() -> int:
        nonlocal calls
        calls += 1
        await gate.wait()
        return calls

    c = Coalescer(ttl=60)
    waiters = [asyncio.ensure_future(c.get("k", make)) for _ in range(20)]
    await asyncio.sleep(0)
    waiters[0].cancel()  # a browser going away does not cancel the shared read
    gate.set()
    results = await asyncio.gather(*waiters[1:])
    assert results == [1] * 19 and calls == 1
    assert await c.get("k", make) == 1 and calls == 1  # cached within ttl

    async def boom() -> int:
        raise RuntimeError("store down")

    with pytest.raises(RuntimeError):
        await c.get("x", boom)
    assert await c.get("x", make) == 2  # the failure was not cached


def test_pure_helpers() -> None:
    assert display_url("https://u:p@h.example/a/b.tar?X-Sig=abc#f") == "https://h.example/a/b.tar?…"
    assert display_url("http://h/f") == "http://h/f"
    four = 4 * MIB
    # pieces 0 and 2 of a 2-piece-and-a-bit file: the last one is 10 bytes long
    assert held_bytes(Bitmap.of([0, 2])._data, 2 * four + 10, four, 3) == four + 10
    assert held_bytes(b"", 10, four, 1) == 0
    p1, p2 = PeerInfo("p1", "10.0.0.2", 1, "peer"), PeerInfo("p2", "10.0.0.1", 2, "peer")
    samples = {"t1": {"a": p1, "b": PeerInfo("", "", 0, "none")}, "t2": {"c": p1, "d": p2}}
    rows = peer_rows(samples, cap=10)
    assert [(r["peer_id"], r["tasks"]) for r in rows] == [("p2", 1), ("p1", 2)]
    assert len(peer_rows(samples, cap=1)) == 1


def test_every_dashboard_file_is_package_data() -> None:
    # a non-editable install ships only what pyproject's package-data names
    root = Path(__file__).resolve().parent.parent
    globs = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"]["supernode"]
    files = sorted(p.name for p in STATIC.iterdir())
    assert files == sorted(ASSETS)
    for name in files:
        assert any(fnmatch.fnmatch(f"static/{name}", g) for g in globs), name
