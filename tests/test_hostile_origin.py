"""Hostile and broken origins (docs/hostile-input.md, "Origin URLs"): the real supernode
app in-process against bench.origin's misbehaving modes, in-process too. A refused URL
leaves no state and never reaches the origin; a lying origin fails the task with its
own code (or restarts cleanly) and two versions are never spliced."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import file_bytes
from supernode_support import Api, app_for, download_all, settings_for
from test_hostile_api import assert_error, store_snapshot

from bench.origin import OriginServer
from supernode.state import STATE

MIB = 1 << 20
SIZE = 5 * MIB + 123  # two pieces
DATA = file_bytes(SIZE, seed=11)


class Env:
    def __init__(self, client: Any, origin: OriginServer) -> None:
        self.client = client
        self.api = Api(client)
        self.origin = origin
        self.st = client.app[STATE]
        # bounded retries stay bounded, only faster
        self.st.cdn.origin.settings = replace(self.st.cdn.origin.settings, backoff=0.01)

    async def settle(self, url: str, **extra: Any) -> dict[str, Any]:
        """Register `url` and wait for the CDN fetch to end; the task record."""
        reg = await self.api.register(url, **extra)
        tid = reg["task"]["task_id"]
        for _ in range(1000):
            task = (await (await self.client.get(f"/api/v1/tasks/{tid}")).json())["task"]
            if task["status"] in ("success", "failed") and tid not in self.st.cdn.running:
                return {**task, "cid": reg["cid"]}  # type: ignore[no-any-return]
            await asyncio.sleep(0.01)
        raise AssertionError("fetch did not end")

    def requests(self, name: str = "f") -> int:
        fs = self.origin.stats.by_file.get(name)
        return fs.requests if fs else 0


EnvFactory = Callable[..., Awaitable[Env]]


@pytest.fixture
async def make_env(aiohttp_client: Any, tmp_path: Path) -> AsyncIterator[EnvFactory]:
    root = tmp_path / "origin"
    root.mkdir()
    (root / "f").write_bytes(DATA)
    (root / "empty").write_bytes(b"")
    async with OriginServer(root) as origin:
        count = 0

        async def factory(**over: Any) -> Env:
            nonlocal count
            count += 1
            client = await aiohttp_client(app_for(settings_for(tmp_path / f"sn{count}", None, **over)))
            return Env(client, origin)

        yield factory


@pytest.fixture
async def env(make_env: EnvFactory) -> Env:
    return await make_env()


async def refused_before_anything(env: Env, url: str, status: int, code: str) -> None:
    before = await store_snapshot(env.st.store.client)
    requests = env.origin.stats.requests
    body = await assert_error(await env.client.post("/api/v1/tasks", json={"url": url}), status)
    assert body["error"] == code, (url, body)
    assert await store_snapshot(env.st.store.client) == before, url
    assert env.origin.stats.requests == requests, url


# --- schemes and addresses ------------------------------------------------------------
async def test_only_http_and_https_origins(env: Env) -> None:
    port = env.origin.port
    for url in ("file:///etc/passwd", f"gopher://127.0.0.1:{port}/_x", f"ftp://127.0.0.1:{port}/f",
                "data:text/plain,hello", "javascript:alert(1)", f"dict://127.0.0.1:{port}/",
                f"ws://127.0.0.1:{port}/files/f", f"//127.0.0.1:{port}/files/f", "files/f",
                f"jar:http://127.0.0.1:{port}/files/f!/"):
        await refused_before_anything(env, url, 403, "origin_denied_by_policy")
    for url in ("http:///files/f", "http://[::1/f", "http://127.0.0.1:99999/f", "http://:80/f"):
        await refused_before_anything(env, url, 400, "bad_request")


async def test_metadata_link_local_and_other_denied_addresses(env: Env) -> None:
    for host in ("169.254.169.254", "[::ffff:169.254.169.254]", "[fe80::1]", "0.0.0.0", "[::]",
                 "224.0.0.1", "100.100.100.200", "[fd00:ec2::254]", "255.255.255.255",
                 # the same metadata address spelled so only the resolver recognises it
                 "2852039166", "0xa9.0xfe.0xa9.0xfe", "0251.0376.0251.0376", "169.254.43518"):
        await refused_before_anything(env, f"http://{host}/latest/meta-data", 403, "origin_denied_by_policy")


async def test_a_host_name_is_checked_on_the_address_it_resolves_to(make_env: EnvFactory) -> None:
    env = await make_env(allow_origin=())  # the default policy: loopback denied
    await refused_before_anything(env, f"http://localhost:{env.origin.port}/files/f", 403,
                                  "origin_denied_by_policy")
    await refused_before_anything(env, env.origin.url("f"), 403, "origin_denied_by_policy")


async def test_every_redirect_hop_is_checked_and_hops_are_capped(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    for target, code in (("file:///etc/passwd", "origin_denied_by_policy"),
                         ("http://169.254.169.254/latest/meta-data", "origin_denied_by_policy"),
                         ("gopher://127.0.0.1:70/", "origin_denied_by_policy"),
                         ("http://[::1/broken", "origin_bad_status")):
        task = await env.settle(env.origin.url("f", redirect=target, v=code + target))
        assert task["status"] == "failed" and task["error"]["error"] == code, task
    before = env.requests()
    task = await env.settle(env.origin.url("f", redirects=20))
    assert task["status"] == "failed" and task["error"]["error"] == "origin_bad_status"
    assert "redirects" in task["error"]["message"]
    assert env.requests() - before == 6  # the first answer and 5 hops, then it gave up
    assert not [r for r in caplog.records if r.exc_info]  # expected failures, no traceback


async def test_credentials_in_the_url_are_never_shown(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secret = "s3cr3t-Pa55"
    good = env.origin.url("f").replace("http://", f"http://alice:{secret}@")
    bad = env.origin.url("missing").replace("http://", f"http://alice:{secret}@")
    ok = await env.settle(good)
    failed = await env.settle(bad)
    assert ok["status"] == "success" and failed["status"] == "failed"
    assert env.origin.stats.by_file["f"].last_headers["Authorization"].startswith("Basic ")
    seen = []
    for path in ("/api/v1/tasks", f"/api/v1/tasks/{ok['task_id']}", f"/api/v1/tasks/{failed['task_id']}",
                 f"/api/v1/tasks/{ok['task_id']}/digests", "/metrics"):
        seen.append(await (await env.client.get(path)).text())
    pull = await env.client.post(f"/api/v1/tasks/{ok['task_id']}/pull", json={"cid": ok["cid"], "wait": 0})
    seen.append(await pull.text())
    seen.append(caplog.text)
    assert all(secret not in text and "alice" not in text for text in seen)
    assert f"127.0.0.1:{env.origin.port}/files/f" in seen[0]  # listed, without its userinfo


# --- origin answers -------------------------------------------------------------------
@pytest.mark.parametrize("query, code", [
    ({"mode": "status=407"}, "origin_unauthorized"), ({"mode": "status=410"}, "origin_not_found"),
    ({"mode": "status=401"}, "origin_unauthorized"), ({"mode": "status=451"}, "origin_bad_status"),
])
async def test_refusals_fail_at_once_with_their_own_code(env: Env, query: dict[str, str], code: str) -> None:
    task = await env.settle(env.origin.url("f", **query))
    assert task["status"] == "failed" and task["error"]["error"] == code
    assert env.requests() == 1  # no retry storm


async def test_transient_failures_are_retried_a_bounded_number_of_times(env: Env) -> None:
    task = await env.settle(env.origin.url("f", mode="status=503"))
    assert task["error"]["error"] == "origin_bad_status" and env.requests() == 4  # 1 + 3 retries
    n = env.requests()
    task = await env.settle(env.origin.url("f", mode="status=429", times=2))
    assert task["status"] == "success" and env.requests() - n == 3
    n = env.requests()
    task = await env.settle(env.origin.url("f", mode="fail_after=100000"))  # reset every time
    assert task["status"] == "failed" and task["error"]["error"] == "origin_short_body"
    assert env.requests() - n == 4


async def test_an_origin_that_lies_about_the_body(env: Env) -> None:
    # bytes past Content-Length are never read, let alone stored
    long = await env.settle(env.origin.url("f", mode="long=4096"))
    assert long["status"] == "success" and long["length"] == SIZE
    assert await download_all(env.api, long["task_id"], long["cid"], SIZE) == DATA
    short = await env.settle(env.origin.url("f", mode="short,novalidators"))
    assert short["status"] == "failed" and short["error"]["error"] == "origin_short_body"
    ignored = await env.settle(env.origin.url("f", mode="norange"), range="bytes=0-99")
    assert ignored["status"] == "failed" and ignored["error"]["error"] == "origin_bad_status"
    assert "Range" in ignored["error"]["message"]
    # a resume answered with the wrong Content-Range: the task fails, nothing spliced
    lied = await env.settle(env.origin.url("f", mode=f"fail_after={4 * MIB + 10},badrange", times=1))
    assert lied["status"] == "failed" and lied["error"]["error"] == "origin_changed"


async def test_a_resume_answered_200_restarts_cleanly(env: Env) -> None:
    task = await env.settle(env.origin.url("f", mode=f"fail_after={4 * MIB + 10},norange", times=1))
    assert task["status"] == "success" and env.requests() == 2
    assert await download_all(env.api, task["task_id"], task["cid"], SIZE) == DATA


async def test_content_encoding_is_stored_as_sent_never_decompressed(env: Env) -> None:
    task = await env.settle(env.origin.url("f", encoding="gzip"))
    assert task["status"] == "success" and task["length"] == SIZE
    assert env.origin.stats.by_file["f"].last_headers["Accept-Encoding"] == "identity"
    assert await download_all(env.api, task["task_id"], task["cid"], SIZE) == DATA


async def test_maximum_file_size_with_and_without_content_length(make_env: EnvFactory) -> None:
    env = await make_env(max_file_size=MIB)
    declared = await env.settle(env.origin.url("f"))
    assert declared["error"]["error"] == "origin_too_large" and env.requests() == 1
    assert env.st.cdn.bytes_fetched == 0  # refused on its Content-Length: no body read
    chunked = await env.settle(env.origin.url("f", mode="chunked"))
    assert chunked["error"]["error"] == "origin_too_large"
    # it stopped reading past the cap (the CDN's own count: what the origin wrote is no
    # measure, loopback socket buffers take megabytes before anyone reads them)
    assert env.st.cdn.bytes_fetched < 2 * MIB < SIZE


async def test_zero_length_file_is_a_valid_task(env: Env) -> None:
    task = await env.settle(env.origin.url("empty"))
    assert task["status"] == "success" and task["length"] == 0 and task["piece_count"] == 0
    res = await env.api.pull(task["task_id"], task["cid"], wait=0)
    assert res["state"] == "finished"


async def test_trickling_origin_hits_the_minimum_rate(env: Env) -> None:
    env.st.cdn.settings = replace(env.st.cdn.settings, rate_window=0.3)
    task = await env.settle(env.origin.url("f", mode="slow=20000,novalidators"))
    assert task["status"] == "failed" and task["error"]["error"] == "origin_unavailable"
    assert "minimum rate" in task["error"]["message"]


async def test_silent_origin_hits_the_read_timeout(make_env: EnvFactory) -> None:
    env = await make_env(origin_read_timeout=0.3, register_wait=0.1)
    stalled = await env.settle(env.origin.url("f", mode="stall_after=1000,novalidators"))
    assert stalled["status"] == "failed" and stalled["error"]["error"] == "origin_unavailable"
    n = env.requests()
    mute = await env.settle(env.origin.url("f", mode="delay=30"))  # headers never come
    assert mute["status"] == "failed" and mute["error"]["error"] == "origin_unavailable"
    assert env.requests() - n == 4
