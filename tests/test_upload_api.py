"""The upload session API of the supernode (supernode/api/uploads.py), in-process with
the real app factory: full uploads into the CDN cache, and every hostile input of
docs/hostile-input.md "Resumable uploads"."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from conftest import file_bytes, free_port
from supernode_support import Api, app_for, download_all, peer, settings_for

from common.taskid import task_id
from supernode.api.uploads import UPLOADS
from supernode.app import STATE

KIB = 1 << 10
MIB = 1 << 20
TOKEN = "upload-admin-token-0123456789"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@pytest.fixture
async def make_client(aiohttp_client, tmp_path):  # type: ignore[no-untyped-def]
    async def make(**over: Any) -> Any:
        return await aiohttp_client(app_for(settings_for(tmp_path / "sn", None, **over)))

    return make


@pytest.fixture
async def client(make_client):  # type: ignore[no-untyped-def]
    return await make_client()


@pytest.fixture
async def store_client(aiohttp_client, tmp_path, store_url):  # type: ignore[no-untyped-def]
    """On the embedded store and on the real Redis: the commit writes the task record."""
    return await aiohttp_client(app_for(settings_for(tmp_path / "sn", store_url)))


async def open_session(client: Any, data: bytes, status: int = 201, **body: Any) -> dict[str, Any]:
    resp = await client.post("/api/v1/uploads", json={"digest": digest_of(data), "length": len(data), **body})
    out = await resp.json()
    assert resp.status == status, out
    if status == 201:
        assert resp.headers["Location"] == f"/api/v1/uploads/{out['id']}"
        assert resp.headers["Upload-Offset"] == "0"
    return out  # type: ignore[no-any-return]


async def patch(client: Any, sid: str, offset: int, chunk: bytes, **headers: str) -> tuple[int, dict[str, Any]]:
    resp = await client.patch(f"/api/v1/uploads/{sid}", data=io.BytesIO(chunk),
                              headers={"Upload-Offset": str(offset), **headers})
    return resp.status, await resp.json()


async def head_offset(client: Any, sid: str) -> int:
    resp = await client.head(f"/api/v1/uploads/{sid}")
    assert resp.status == 200
    return int(resp.headers["Upload-Offset"])


def spool_files(client: Any) -> list[Path]:
    return sorted(client.app[UPLOADS].spool.glob("*.part"))


def cache_path(client: Any, data: bytes) -> Path:
    return client.app[STATE].cache.data_path(task_id("", identifier=digest_of(data)))  # type: ignore[no-any-return]


async def upload(client: Any, data: bytes, chunk: int) -> dict[str, Any]:
    s = await open_session(client, data)
    out: dict[str, Any] = s
    for off in range(0, len(data), chunk):
        status, out = await patch(client, s["id"], off, data[off:off + chunk])
        assert status == 200, out
        assert out["offset"] == min(off + chunk, len(data))
    return out


async def test_full_upload_enters_the_cache_and_is_served_without_an_origin(store_client: Any) -> None:
    client = store_client
    data = file_bytes(9 * MIB + 12345, seed=7)  # three pieces, the last one short
    out = await upload(client, data, 3 * MIB)
    assert out["state"] == "committed" and out["task_id"] == task_id("", identifier=digest_of(data))
    assert cache_path(client, data).read_bytes() == data
    assert spool_files(client) == []
    entry = client.app[STATE].cache.load(out["task_id"])
    assert entry.complete and len(entry.digests) == 3
    meta = await client.app[STATE].repo.get_meta(out["task_id"])
    assert meta.status == "success" and meta.url == f"upload:{digest_of(data)}" and meta.length == len(data)
    assert entry.digests[2] == hashlib.sha256(data[8 * MIB:]).hexdigest()
    metrics = await (await client.get("/metrics")).text()
    sent = [ln for ln in metrics.splitlines() if ln.startswith("supernode_upload_bytes_total ")]
    assert len(sent) == 1 and float(sent[0].split()[1]) == len(data)
    assert 'supernode_uploads_total{result="committed"} 1.0' in metrics
    assert "supernode_upload_sessions 0.0" in metrics
    # the same digest again: nothing to send
    again = await open_session(client, data, status=200)
    assert again["state"] == "committed" and again["offset"] == len(data)
    # a registration by digest with a URL nobody listens on is served from the cache
    dead = f"http://127.0.0.1:{free_port()}/nothing-here"
    api = Api(client)
    reg = await api.register(dead, identifier=digest_of(data), peer=peer())
    assert reg["task"]["task_id"] == out["task_id"]
    got = await download_all(api, out["task_id"], reg["cid"], len(data))
    assert got == data


async def test_commit_after_the_redis_task_expired_reuses_the_cache(store_client: Any) -> None:
    """The task's record is gone from the store (idle GC): the next registration still
    finds the uploaded bytes in the cache, checked against the digest, no origin."""
    client = store_client
    data = file_bytes(5 * MIB, seed=8)
    out = await upload(client, data, 2 * MIB)
    await client.app[STATE].repo.delete_task(out["task_id"])
    api = Api(client)
    reg = await api.register(f"http://127.0.0.1:{free_port()}/x", identifier=digest_of(data), peer=peer())
    assert await download_all(api, out["task_id"], reg["cid"], len(data)) == data


async def test_head_and_get_report_the_durable_offset(client: Any) -> None:
    data = file_bytes(300 * KIB, seed=1)
    s = await open_session(client, data)
    assert await head_offset(client, s["id"]) == 0
    assert (await patch(client, s["id"], 0, data[:100 * KIB]))[0] == 200
    assert await head_offset(client, s["id"]) == 100 * KIB
    resp = await client.get(f"/api/v1/uploads/{s['id']}")
    body = await resp.json()
    assert body["offset"] == 100 * KIB and body["state"] == "upload-pending" and body["length"] == len(data)


async def test_unknown_and_malformed_session_ids_are_404(client: Any) -> None:
    for sid in ("0" * 32, "not-a-session", "..%2f..%2fetc"):
        for method in ("HEAD", "GET", "PUT", "DELETE"):
            resp = await client.request(method, f"/api/v1/uploads/{sid}")
            assert resp.status == 404, (method, sid)
        status, body = await patch(client, sid, 0, b"x")
        assert status == 404 and body["error"] == "unknown_upload"


async def test_overlapping_and_gapped_chunks_are_refused_not_merged(client: Any) -> None:
    data = file_bytes(256 * KIB, seed=2)
    s = await open_session(client, data)
    assert (await patch(client, s["id"], 0, data[:100 * KIB]))[0] == 200
    for offset in (50 * KIB, 0, 100 * KIB + 1, 200 * KIB):  # overlap, replay, gap, gap
        status, body = await patch(client, s["id"], offset, data[offset:offset + 10 * KIB])
        assert status == 409 and body["error"] == "upload_offset_mismatch"
        assert body["detail"]["offset"] == 100 * KIB
    assert await head_offset(client, s["id"]) == 100 * KIB
    assert spool_files(client)[0].stat().st_size == 100 * KIB
    # garbage in a refused chunk changed nothing: the right rest commits
    status, body = await patch(client, s["id"], 100 * KIB, data[100 * KIB:])
    assert status == 200 and body["state"] == "committed"
    assert cache_path(client, data).read_bytes() == data


async def test_chunk_past_the_declared_length_is_416(client: Any) -> None:
    data = file_bytes(64 * KIB, seed=3)
    s = await open_session(client, data)
    status, body = await patch(client, s["id"], 0, data + b"extra")
    assert status == 416 and body["error"] == "chunk_past_end"
    assert await head_offset(client, s["id"]) == 0
    assert spool_files(client)[0].stat().st_size == 0


async def test_bad_offsets_and_missing_length_are_refused(client: Any) -> None:
    data = file_bytes(64 * KIB, seed=4)
    s = await open_session(client, data)
    for bad in ("-1", "1e3", "", "0x10", "99999999999999999999"):
        status, body = await patch(client, s["id"], 0, data, **{"Upload-Offset": bad})
        assert status == 400 and body["error"] == "bad_offset", bad

    async def chunked() -> Any:
        yield data[:10]

    resp = await client.patch(f"/api/v1/uploads/{s['id']}", data=chunked(), headers={"Upload-Offset": "0"})
    assert resp.status == 411
    assert await head_offset(client, s["id"]) == 0


async def test_oversized_chunk_is_413(client: Any) -> None:
    ups = client.app[UPLOADS]
    ups.limits = dataclasses.replace(ups.limits, max_chunk=32 * KIB)
    data = file_bytes(64 * KIB, seed=5)
    s = await open_session(client, data)
    status, body = await patch(client, s["id"], 0, data)
    assert status == 413 and body["error"] == "chunk_too_large"
    assert (await patch(client, s["id"], 0, data[:32 * KIB]))[0] == 200


@pytest.mark.parametrize("body", [
    {"digest": "sha256:" + "A" * 64, "length": 1},
    {"digest": "sha256:" + "a" * 63, "length": 1},
    {"digest": "md5:" + "a" * 32, "length": 1},
    {"digest": "a" * 64, "length": 1},
    {"digest": "sha256:" + "a" * 64 + "\n", "length": 1},
    {"digest": "sha256:" + "a" * 64, "length": -1},
    {"digest": "sha256:" + "a" * 64, "length": "10"},
    {"digest": "sha256:" + "a" * 64},
    {"length": 10},
    {"digest": "sha256:" + "a" * 64, "length": 1, "extra": 1},
])
async def test_bad_session_requests_are_400_and_open_nothing(client: Any, body: dict[str, Any]) -> None:
    resp = await client.post("/api/v1/uploads", json=body)
    assert resp.status == 400, await resp.text()
    assert spool_files(client) == [] and client.app[UPLOADS].sessions == {}


async def test_digest_mismatch_fails_the_session_and_frees_its_space(client: Any) -> None:
    data = file_bytes(200 * KIB, seed=6)
    wrong = bytearray(data)
    wrong[-1] ^= 1
    s = await open_session(client, data)
    assert (await patch(client, s["id"], 0, bytes(wrong[:100 * KIB])))[0] == 200
    status, body = await patch(client, s["id"], 100 * KIB, bytes(wrong[100 * KIB:]))
    assert status == 422 and body["error"] == "content_digest_mismatch"
    assert body["detail"]["actual"] == digest_of(bytes(wrong))
    assert 'supernode_uploads_total{result="failed"} 1.0' in await (await client.get("/metrics")).text()
    assert spool_files(client) == []
    assert not cache_path(client, data).exists()
    assert client.app[STATE].cache.load(task_id("", identifier=digest_of(data))) is None
    assert (await client.head(f"/api/v1/uploads/{s['id']}")).status == 404


async def test_abandoned_session_expires_and_its_space_is_freed(make_client: Any) -> None:
    client = await make_client(upload_ttl=1.0)
    data = file_bytes(128 * KIB, seed=9)
    s = await open_session(client, data)
    assert (await patch(client, s["id"], 0, data[:64 * KIB]))[0] == 200
    assert len(spool_files(client)) == 1
    for _ in range(60):
        if not spool_files(client):
            break
        await asyncio.sleep(0.1)
    assert spool_files(client) == []
    assert (await client.head(f"/api/v1/uploads/{s['id']}")).status == 404
    status, body = await patch(client, s["id"], 64 * KIB, data[64 * KIB:])
    assert status == 404 and body["error"] == "unknown_upload"


async def test_cancel_frees_the_space(client: Any) -> None:
    data = file_bytes(64 * KIB, seed=10)
    s = await open_session(client, data)
    assert (await patch(client, s["id"], 0, data[:1000]))[0] == 200
    resp = await client.delete(f"/api/v1/uploads/{s['id']}")
    assert resp.status == 200 and (await resp.json())["state"] == "cancelled"
    assert spool_files(client) == []
    assert (await client.delete(f"/api/v1/uploads/{s['id']}")).status == 404


async def test_too_large_declared_length_and_too_many_sessions(make_client: Any) -> None:
    client = await make_client(max_upload_size=1 * MIB, max_upload_sessions=2)
    resp = await client.post("/api/v1/uploads", json={"digest": "sha256:" + "b" * 64, "length": MIB + 1})
    assert resp.status == 413 and (await resp.json())["error"] == "upload_too_large"
    for n in range(2):
        await open_session(client, file_bytes(10, seed=n))
    resp = await client.post("/api/v1/uploads", json={"digest": "sha256:" + "c" * 64, "length": 10})
    assert resp.status == 503 and (await resp.json())["error"] == "too_many_uploads"
    assert "Retry-After" in resp.headers
    assert len(spool_files(client)) == 2


async def test_commit_before_every_byte_is_in_is_409(client: Any) -> None:
    data = file_bytes(64 * KIB, seed=11)
    s = await open_session(client, data)
    assert (await patch(client, s["id"], 0, data[:10]))[0] == 200
    resp = await client.put(f"/api/v1/uploads/{s['id']}")
    body = await resp.json()
    assert resp.status == 409 and body["error"] == "upload_incomplete" and body["detail"]["offset"] == 10


async def test_empty_file_commits_with_put(client: Any) -> None:
    s = await open_session(client, b"")
    resp = await client.put(f"/api/v1/uploads/{s['id']}")
    assert resp.status == 200 and (await resp.json())["state"] == "committed"
    assert cache_path(client, b"").read_bytes() == b""


async def test_uploads_need_the_admin_token_when_one_is_set(make_client: Any) -> None:
    client = await make_client(admin_token=TOKEN)
    data = file_bytes(1000, seed=12)
    body = {"digest": digest_of(data), "length": len(data)}
    resp = await client.post("/api/v1/uploads", json=body)
    assert resp.status == 401
    resp = await client.post("/api/v1/uploads", json=body, headers={"Authorization": "Bearer wrong-token-000000"})
    assert resp.status == 401
    assert spool_files(client) == []
    auth = {"Authorization": f"Bearer {TOKEN}"}
    resp = await client.post("/api/v1/uploads", json=body, headers=auth)
    assert resp.status == 201
    sid = (await resp.json())["id"]
    status, _ = await patch(client, sid, 0, data)
    assert status == 401
    status, out = await patch(client, sid, 0, data, **auth)
    assert status == 200 and out["state"] == "committed"


async def _raw_patch(client: Any, sid: str, declared: int, sent: bytes) -> tuple[asyncio.StreamReader, Any]:
    """A PATCH whose body stops after `sent` of `declared` bytes (the socket stays open)."""
    r, w = await asyncio.open_connection(client.server.host, client.server.port)
    w.write((f"PATCH /api/v1/uploads/{sid} HTTP/1.1\r\nHost: x\r\nUpload-Offset: 0\r\n"
             f"Content-Length: {declared}\r\n\r\n").encode() + sent)
    await w.drain()
    return r, w


async def test_a_chunk_whose_body_stalls_is_408_and_kept_nowhere(make_client: Any) -> None:
    client = await make_client(body_timeout=1.0)
    data = file_bytes(3 * MIB, seed=13)
    s = await open_session(client, data)
    r, w = await _raw_patch(client, s["id"], len(data), data[:2 * MIB])
    try:
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 10)
        assert head.startswith(b"HTTP/1.1 408"), head
    finally:
        w.close()
    assert await head_offset(client, s["id"]) == 0
    assert spool_files(client)[0].stat().st_size == 0
    status, body = await patch(client, s["id"], 0, data)
    assert status == 200 and body["state"] == "committed"


async def test_a_client_gone_mid_chunk_leaves_the_offset_where_it_was(client: Any) -> None:
    data = file_bytes(3 * MIB, seed=14)
    s = await open_session(client, data)
    assert (await patch(client, s["id"], 0, data[:MIB]))[0] == 200
    r, w = await asyncio.open_connection(client.server.host, client.server.port)
    w.write((f"PATCH /api/v1/uploads/{s['id']} HTTP/1.1\r\nHost: x\r\nUpload-Offset: {MIB}\r\n"
             f"Content-Length: {2 * MIB}\r\n\r\n").encode() + data[MIB:MIB + MIB // 2])
    await w.drain()
    await asyncio.sleep(0.2)
    w.close()
    ups = client.app[UPLOADS]
    for _ in range(100):  # the server notices the closed connection and drops the chunk
        if not ups.sessions[s["id"]].lock.locked():
            break
        await asyncio.sleep(0.05)
    assert await head_offset(client, s["id"]) == MIB
    assert spool_files(client)[0].stat().st_size == MIB
    status, body = await patch(client, s["id"], MIB, data[MIB:])
    assert status == 200 and body["state"] == "committed"
    assert cache_path(client, data).read_bytes() == data


@pytest.mark.parametrize("seed", range(4))
async def test_random_chunking_with_hostile_chunks_in_between_is_byte_exact(client: Any, seed: int) -> None:
    """Chunks of random sizes (across piece boundaries), with refused ones in between
    (replays, overlaps, gaps, past the end, garbage at a wrong offset): the cached file
    and its piece digests are exactly the file's."""
    import random

    rnd = random.Random(seed)
    data = file_bytes(4 * MIB + rnd.randrange(1, 3 * MIB), seed=100 + seed)
    s = await open_session(client, data)
    off, out = 0, s
    while off < len(data):
        if off and rnd.random() < 0.3:
            bad = rnd.choice([rnd.randrange(0, off), off + rnd.randrange(1, 4096)])
            status, body = await patch(client, s["id"], bad, rnd.randbytes(rnd.randrange(1, 8192)))
            assert status in (409, 416), (status, body)
        if rnd.random() < 0.1:
            status, _ = await patch(client, s["id"], off, data[off:] + b"!")
            assert status == 416
        size = rnd.randrange(1, 1536 * KIB)
        status, out = await patch(client, s["id"], off, data[off:off + size])
        assert status == 200, out
        off = min(off + size, len(data))
        assert out["offset"] == off
    assert out["state"] == "committed"
    assert cache_path(client, data).read_bytes() == data
    entry = client.app[STATE].cache.load(out["task_id"])
    ps = entry.piece_size
    assert entry.digests == {n: hashlib.sha256(data[n * ps:(n + 1) * ps]).hexdigest()
                             for n in range((len(data) + ps - 1) // ps)}


async def test_a_second_chunk_while_one_is_received_is_409_busy(client: Any) -> None:
    data = file_bytes(2 * MIB, seed=15)
    s = await open_session(client, data)
    r, w = await _raw_patch(client, s["id"], MIB, data[:MIB // 4])  # stays open, unfinished
    try:
        ups = client.app[UPLOADS]
        for _ in range(100):
            if ups.sessions[s["id"]].lock.locked():
                break
            await asyncio.sleep(0.02)
        status, body = await patch(client, s["id"], 0, data[:MIB])
        assert status == 409 and body["error"] == "upload_busy"
        ups.expire(now=1e12)  # a chunk in flight keeps its session, whatever the clock says
        assert s["id"] in ups.sessions
    finally:
        w.close()
    for _ in range(100):
        if not client.app[UPLOADS].sessions[s["id"]].lock.locked():
            break
        await asyncio.sleep(0.05)
    assert await head_offset(client, s["id"]) == 0
    status, body = await patch(client, s["id"], 0, data)
    assert status == 200 and body["state"] == "committed"


async def test_no_room_on_disk_is_507_and_opens_nothing(client: Any) -> None:
    client.app[STATE].cache.free_bytes = lambda: 10 * MIB
    resp = await client.post("/api/v1/uploads", json={"digest": "sha256:" + "d" * 64, "length": 11 * MIB})
    assert resp.status == 507 and (await resp.json())["error"] == "insufficient_storage"
    await open_session(client, file_bytes(6 * MIB, seed=16))
    # the pending session's 6 MiB still to come count against the free space
    resp = await client.post("/api/v1/uploads", json={"digest": "sha256:" + "e" * 64, "length": 5 * MIB})
    assert resp.status == 507
    assert len(spool_files(client)) == 1
