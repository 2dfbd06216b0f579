"""The supernode as a real process: graceful shutdown, health against a Redis that
dies, the CDN lease taken over by a second supernode, and reuse of a cached file after
a restart (revalidated against the origin)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from common.taskid import new_id
from conftest import ProcessRunner, file_bytes, free_port, http_get

MIB = 1 << 20


def post(url: str, body: dict) -> tuple[int, dict]:  # type: ignore[type-arg]
    status, raw = http_get(url, timeout=30, data=json.dumps(body).encode())
    return status, json.loads(raw) if raw else {}


def register(sn, url: str) -> dict:  # type: ignore[no-untyped-def,type-arg]
    status, body = post(f"{sn.url}/api/v1/tasks", {
        "url": url, "peer": {"peer_id": new_id(), "ip": "127.0.0.1", "port": 15000}})
    assert status == 200, body
    return body


def pull_until_done(sn, tid: str, cid: str, deadline: float = 60.0) -> dict:  # type: ignore[no-untyped-def,type-arg]
    """Walk the protocol (fetching every piece from the seed) until finished."""
    end = time.monotonic() + deadline
    reports: list[dict] = []  # type: ignore[type-arg]
    while time.monotonic() < end:
        status, res = post(f"{sn.url}/api/v1/tasks/{tid}/pull", {"cid": cid, "wait": 5, "reports": reports})
        assert status == 200, res
        reports = []
        if res["state"] == "finished":
            return res
        assert res["state"] in ("continue", "wait"), res
        for a in res["assignments"]:
            src = a["source"]
            import urllib.request
            headers = {"Range": f"bytes={a['start']}-{a['end']}"}
            if a.get("token"):
                headers.update({"X-Dragonfly-Token": a["token"], "X-Dragonfly-Client": cid})
            req = urllib.request.Request(f"http://{src['ip']}:{src['port']}/peer/file/{tid}", headers=headers)
            with urllib.request.urlopen(req, timeout=10) as r:
                import hashlib
                assert hashlib.sha256(r.read()).hexdigest() == a["digest"]
            reports.append({"piece": a["piece"], "result": "ok", "source": src["cid"]})
    raise AssertionError("not finished in time")


def test_sigterm_exits_cleanly_even_with_a_long_poll_waiting(supernode, origin) -> None:  # type: ignore[no-untyped-def]
    sn = supernode(redis_url=None)
    origin.put_random("a.bin", 2 * MIB, seed=1)
    reg = register(sn, origin.url("a.bin", mode="slow=65536"))
    tid, cid = reg["task"]["task_id"], reg["cid"]
    # the long-poll is sent whole before the signal (a thread could still be connecting)
    body = json.dumps({"cid": cid, "wait": 30}).encode()
    with socket.create_connection(("127.0.0.1", sn.port), timeout=20) as conn:
        conn.sendall(f"POST /api/v1/tasks/{tid}/pull HTTP/1.1\r\nHost: x\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     f"Connection: close\r\n\r\n".encode() + body)
        time.sleep(0.5)  # let the supernode start waiting on it
        t0 = time.monotonic()
        sn.runner.signal(signal.SIGTERM)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    code = sn.runner.proc.wait(timeout=15)
    assert code == 0, sn.runner.log_tail()
    assert time.monotonic() - t0 < 12
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), answer
    assert json.loads(payload)["state"] in ("wait", "continue")
    assert "Traceback" not in sn.runner.log_tail(200)


def test_ping_turns_503_when_redis_dies_and_back(tmp_path: Path, supernode) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip() == b"PONG":
                break
            time.sleep(0.05)
        sn = supernode(redis_url=f"redis://127.0.0.1:{port}/0")
        assert http_get(f"{sn.url}/_ping")[0] == 200
        redis.terminate()
        redis.wait(timeout=10)
        status, body = http_get(f"{sn.url}/_ping", timeout=15)
        assert status == 503 and json.loads(body)["error"] == "store_unavailable"
        status, body = http_get(f"{sn.url}/api/v1/tasks", timeout=15)
        assert status == 503 and "Traceback" not in body.decode()
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if http_get(f"{sn.url}/_ping")[0] == 200:
                break
            time.sleep(0.1)
        assert http_get(f"{sn.url}/_ping")[0] == 200
    finally:
        redis.kill()
        redis.wait(timeout=10)


@pytest.mark.redis
def test_fetch_of_a_dead_supernode_is_taken_over_when_its_lease_expires(
    supernode, origin_factory, redis_url
) -> None:  # type: ignore[no-untyped-def]
    origin = origin_factory(rate=2 * MIB)
    size = 12 * MIB
    origin.put_random("t.bin", size, seed=2)
    a = supernode(extra_args=["--lease-ttl", "2s"])  # the default 15 s would only slow the test
    b = supernode(extra_args=["--lease-ttl", "2s"])
    reg = register(a, origin.url("t.bin"))
    tid = reg["task"]["task_id"]
    time.sleep(1.0)
    a.runner.kill()  # SIGKILL: the lease is never released, it must expire
    reg_b = register(b, origin.url("t.bin"))
    assert reg_b["task"]["task_id"] == tid
    res = pull_until_done(b, tid, reg_b["cid"], deadline=60)
    assert res["task"]["status"] == "success"
    for _ in range(100):  # b logs the end of its fetch just after clients may see it
        if "CDN has" in (b.home / "supernode.log").read_text():
            break
        time.sleep(0.05)
    assert "CDN has" in (b.home / "supernode.log").read_text()  # b finished the fetch itself


def test_cached_file_is_revalidated_and_reused_after_restart(supernode, origin) -> None:  # type: ignore[no-untyped-def]
    size = 9 * MIB
    origin.put_random("r.bin", size, seed=3)
    sn = supernode(redis_url=None)
    reg = register(sn, origin.url("r.bin"))
    pull_until_done(sn, reg["task"]["task_id"], reg["cid"])
    home = sn.home
    sn.runner.stop()
    origin.reset()
    cmd = list(sn.runner.cmd)
    again = ProcessRunner(cmd, home / "supernode2.log", ready_url=f"{sn.url}/_ping", cwd=sn.runner.cwd,
                          env=sn.runner.env)
    with again:
        reg2 = register(sn, origin.url("r.bin"))
        pull_until_done(sn, reg2["task"]["task_id"], reg2["cid"])
    st = origin.stats()
    assert st["by_file"]["r.bin"]["requests"] == 1
    assert st["by_file"]["r.bin"]["bytes"] == 0  # answered 304: nothing refetched
    assert file_bytes(size, seed=3)  # the origin file is unchanged


def test_config_file_and_env_vars(tmp_path: Path) -> None:
    from supernode.cli import main

    cfg = tmp_path / "sn.yaml"
    cfg.write_text("down-limit: 7\nmax_bandwidth: 10MB\ntask-expire-time: 5m\n")
    ctx = main.make_context("supernode", ["--config", str(cfg), "--up-limit", "9"])
    from supernode.cli import build_settings

    s = build_settings(ctx.params)
    assert (s.down_limit, s.up_limit, s.max_bandwidth, s.task_expire_time) == (7, 9, 10 << 20, 300.0)
    import os

    os.environ["SUPERNODE_DOWN_LIMIT"] = "3"
    try:
        ctx = main.make_context("supernode", ["--config", str(cfg)], auto_envvar_prefix="SUPERNODE")
        assert build_settings(ctx.params).down_limit == 3  # env beats file
    finally:
        del os.environ["SUPERNODE_DOWN_LIMIT"]
    with pytest.raises(ValueError):
        build_settings({"allow_origin": ("not-a-cidr",)})
