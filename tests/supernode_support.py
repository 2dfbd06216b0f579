"""Helpers for in-process supernode tests: the real app factory on a test server,
talking to a real origin process and to fakeredis or the real Redis."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from common.taskid import new_id
from supernode.app import create_app
from supernode.config import Settings


def settings_for(home: Path, redis_url: str | None, **over: Any) -> Settings:
    base = dict(
        port=0, download_port=0, listen="127.0.0.1", advertise_ip="127.0.0.1", home=home,
        redis_url=redis_url, allow_origin=("127.0.0.0/8",), allow_peer=("127.0.0.0/8",), gc_initial_delay=3600.0,
        register_wait=10.0, max_bandwidth=0,
    )
    base.update(over)
    return Settings(**base).validate()


def peer(port: int = 15001, ip: str = "127.0.0.1") -> dict[str, Any]:
    return {"peer_id": new_id(), "ip": ip, "port": port}


def as_peer(secret: str | None) -> dict[str, str] | None:
    """Headers of a call made as a peer (supernode/api/peerauth.py)."""
    return {"X-Dragonfly-Peer-Secret": secret} if secret else None


@dataclass
class Api:
    client: Any  # aiohttp TestClient

    async def post(self, path: str, body: dict[str, Any], status: int = 200,
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
        resp = await self.client.post(path, json=body, headers=headers)
        data = await resp.json()
        assert resp.status == status, (resp.status, data)
        return data  # type: ignore[no-any-return]

    async def register(self, url: str, status: int = 200, secret: str | None = None,
                       **extra: Any) -> dict[str, Any]:
        """`secret`: the peer's (X-Dragonfly-Peer-Secret), needed from its second
        registration on."""
        body = {"url": url, "peer": extra.pop("peer", peer())}
        body.update(extra)
        return await self.post("/api/v1/tasks", body, status, headers=as_peer(secret))

    async def pull(self, tid: str, cid: str, **extra: Any) -> dict[str, Any]:
        return await self.post(f"/api/v1/tasks/{tid}/pull", {"cid": cid, "wait": 5, **extra})

    async def report(self, tid: str, cid: str, reports: list[dict[str, Any]], status: int = 200,
                     **extra: Any) -> dict[str, Any]:
        return await self.post(f"/api/v1/tasks/{tid}/report", {"cid": cid, "reports": reports, **extra}, status)


async def fetch_piece(a: dict[str, Any], tid: str, cid: str | None = None) -> bytes:
    src = a["source"]
    url = f"http://{src['ip']}:{src['port']}/peer/file/{tid}"
    headers = {"Range": f"bytes={a['start']}-{a['end']}"}
    if a.get("token"):
        headers.update({"X-Dragonfly-Token": a["token"], "X-Dragonfly-Client": cid or ""})
    async with aiohttp.ClientSession() as s:
        async with s.get(url, headers=headers) as r:
            assert r.status == 206, await r.text()
            return await r.read()


async def download_all(api: Api, tid: str, cid: str, length: int, limit: int = 4) -> bytes:
    """Drive the protocol like dfget does, checking every digest; returns the bytes."""
    out = bytearray(max(length, 0))
    reports: list[dict[str, Any]] = []
    for _ in range(10_000):
        res = await api.pull(tid, cid, limit=limit, reports=reports)
        reports = []
        if res["state"] == "finished":
            return bytes(out)
        assert res["state"] in ("continue", "wait"), res
        for a in res["assignments"]:
            data = await fetch_piece(a, tid, cid)
            assert hashlib.sha256(data).hexdigest() == a["digest"]
            if len(out) <= a["end"]:
                out.extend(b"\0" * (a["end"] + 1 - len(out)))
            out[a["start"]: a["end"] + 1] = data
            reports.append({"piece": a["piece"], "result": "ok", "source": a["source"]["cid"]})
    raise AssertionError("download did not finish")


def app_for(settings: Settings) -> Any:
    return create_app(settings)
