"""Metrics and structured logs after real downloads: the origin process, the real
supernode (real Redis), dfget processes and their peer servers, each on its own
loopback address. Host A gets the file from the CDN, host B from A, then A's and B's peer
servers are killed and host C's tries at them fail before the CDN serves it. Plus the
peer server's counters for every kind of answer, in-process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from bench.swarm import _server_info
from dfget.server.app import build_peer_app
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry
from conftest import ProcessRunner, http_get
from dfget_support import server_pid

MIB = 1 << 20
SIZE = 12 * MIB + 100  # 4 pieces, the last one short
PIECES = 4


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str) -> Samples:
    status, body = http_get(url + "/metrics")
    assert status == 200, body
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(m: Samples, name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


def json_lines(text: str) -> Iterator[dict]:  # type: ignore[type-arg]
    for line in text.splitlines():
        if line.startswith("{"):
            yield json.loads(line)  # every JSON-looking line must parse


def dfget(url: str, sn_url: str, out: Path, home: Path, ip: str
          ) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dfget", "-u", url, "-o", str(out), "-n", sn_url.split("//")[1],
           "--home", str(home), "--ip", ip, "--json", "--no-showbar", "-s", "0",
           "--log-level", "debug", "--log-json"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _wait_server_info(home: Path) -> dict[str, object]:
    for _ in range(200):  # 10 s at most
        try:
            return _server_info(home)
        except (OSError, ValueError):
            time.sleep(0.05)
    return _server_info(home)


def test_metrics_and_json_logs_after_real_downloads(tmp_path: Path, origin, supernode) -> None:  # type: ignore[no-untyped-def]
    origin.put_random("m.bin", SIZE, seed=9)
    want = (origin.dir / "m.bin").read_bytes()
    sn = supernode(extra_args=["--log-json", "--log-level", "debug"])
    before = scrape(sn.url)
    url = origin.url("m.bin")
    homes = {h: tmp_path / h for h in ("a", "b", "c")}
    ips = {"a": "127.0.0.2", "b": "127.0.0.3", "c": "127.0.0.4"}
    # host A's peer server started by hand, to run it with JSON debug logs
    server_a = ProcessRunner(
        [sys.executable, "-m", "dfget", "server", "--home", homes["a"], "--ip", ips["a"],
         "--log-json", "--log-level", "debug"], tmp_path / "server-a.log")
    try:
        server_a.start()
        for _ in range(200):
            try:
                _server_info(homes["a"])
                break
            except (OSError, ValueError):
                time.sleep(0.05)
        a = dfget(url, sn.url, tmp_path / "out-a", homes["a"], ips["a"])
        b = dfget(url, sn.url, tmp_path / "out-b", homes["b"], ips["b"])
        # dfget does not wait for the peer server it starts (B's): it may still be coming up
        info_a, info_b = _server_info(homes["a"]), _wait_server_info(homes["b"])
        peer_a = scrape(f"http://{ips['a']}:{info_a['port']}")
        server_a.kill()  # gone without a word: the supernode still lists A and B as holders
        os.kill(info_b["pid"], signal.SIGKILL)
        c = dfget(url, sn.url, tmp_path / "out-c", homes["c"], ips["c"])
        after = scrape(sn.url)
    finally:
        server_a.stop()
        for home in homes.values():  # the servers dfget started for B and C
            pid = server_pid(home)
            if pid is not None:
                os.kill(pid, signal.SIGTERM)
    for h in "abc":
        assert (tmp_path / f"out-{h}").read_bytes() == want
    reps = {h: json.loads(r.stdout.splitlines()[-1]) for h, r in zip("abc", (a, b, c))}
    assert reps["a"]["bytes_from_supernode"] == SIZE
    from_a = reps["b"]["bytes_from_peers"]
    assert from_a > 0 and reps["c"]["bytes_from_supernode"] == SIZE

    # supernode: requests by endpoint and status, scheduling latency, bytes by source class
    d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert d[("supernode_requests_total", (("endpoint", "/api/v1/tasks"), ("method", "POST"),
                                           ("status", "200")))] == 3
    assert value(d, "supernode_requests_total", endpoint="/api/v1/tasks/{task_id}/pull",
                 method="POST", status="200") >= 3
    assert value(d, "supernode_schedule_seconds_count") >= 3
    # every pull is decided in a round; the task's view was loaded once and never lost events
    rounds, pulls = value(after, "supernode_pull_rounds"), value(after, "supernode_pull_round_pulls")
    assert 1 <= rounds <= pulls and pulls >= value(d, "supernode_schedule_seconds_count")
    assert value(after, "supernode_view_loads") == 1
    assert value(d, "supernode_schedule_seconds_sum") > 0
    assert value(d, "supernode_bytes_total", source="origin") == SIZE
    assert value(d, "supernode_bytes_total", source="peer") == from_a
    assert value(d, "supernode_bytes_total", source="cdn") == 3 * SIZE - from_a
    refused = value(d, "supernode_piece_failures_total", reason="refused")
    assert refused >= 1 and refused == value(d, "supernode_piece_reports_total", result="failed",
                                             reason="refused")
    assert value(after, "supernode_tasks") == 1 and value(after, "supernode_tasks_active") == 1
    assert value(after, "supernode_peers_active") == 3
    assert value(after, "supernode_cdn_origin_bytes") == SIZE
    assert value(after, "supernode_cdn_fetch_bytes_per_second") > 0

    # peer server A: what it uploaded to B
    assert value(peer_a, "dfget_peer_uploaded_bytes_total") == from_a
    served = reps["b"]["pieces_from_peers"]
    assert value(peer_a, "dfget_peer_pieces_served_total") == served
    assert value(peer_a, "dfget_peer_requests_total", endpoint="/peer/file/{task_id}",
                 status="206") == served
    assert value(peer_a, "dfget_peer_busy_total") == 0
    assert value(peer_a, "dfget_peer_uploads_active") == 0
    assert value(peer_a, "dfget_peer_files") == 1

    # structured logs: one JSON line per piece transfer on the dfget side...
    pieces_b = [r for r in json_lines(b.stderr) if r["logger"] == "dfget.piece"]
    assert len(pieces_b) == PIECES and sum(r["bytes"] for r in pieces_b) == SIZE
    assert {r["result"] for r in pieces_b} == {"ok"} and all(r["ms"] >= 0 for r in pieces_b)
    assert sorted(r["piece"] for r in pieces_b) == list(range(PIECES))
    failed_c = [r for r in json_lines(c.stderr)
                if r["logger"] == "dfget.piece" and r["result"] != "ok"]
    assert len(failed_c) == refused and {r["result"] for r in failed_c} == {"refused"}
    # ...per upload on the peer server, and the supernode's own lines
    uploads = [r for r in json_lines(server_a.log_path.read_text()) if "range" in r]
    assert len(uploads) == served and {r["status"] for r in uploads} == {206}
    sn_lines = list(json_lines(sn.runner.log_path.read_text()))
    assert any(r["msg"].startswith("registered") for r in sn_lines)
    # ...and per piece the supernode's seed sent
    seed_ok = [r for r in sn_lines if r["logger"] == "supernode.seed" and r["status"] == "206"]
    assert len(seed_ok) == sum(rep["pieces_from_supernode"] for rep in reps.values())
    assert all(r["range"].startswith("bytes=") and r["ms"] >= 0 for r in seed_ok)
    assert all({"t", "level", "logger", "msg"} <= set(r) for r in sn_lines)


async def test_peer_server_counts_every_answer_by_status_and_reason(tmp_path: Path) -> None:
    tid = "ab" * 32
    (tmp_path / "f").write_bytes(os.urandom(3000))
    state = ServerState(ServerConfig(home=tmp_path, max_uploads=1))
    state.table.register(FileEntry(task_id=tid, path=tmp_path / "f", length=3000, piece_size=1000,
                                   supernodes=[], verified={0, 2}))
    async with TestClient(TestServer(build_peer_app(state, lambda e: None), host="127.0.0.1")) as c:
        async def get(rng: str | None, task: str = tid) -> int:
            async with c.get(f"/peer/file/{task}", headers={"Range": rng} if rng else {}) as r:
                await r.read()
                return r.status

        assert await get("bytes=0-999") == 206
        assert await get("bytes=2000-2999") == 206
        assert await get("bytes=1000-1999") == 404  # not verified
        assert await get("bytes=0-999", task="cd" * 32) == 404  # unknown task
        assert await get(None) == 400
        assert await get("bytes=5000-5100") == 416
        state.active_uploads = 1  # every slot taken
        assert await get("bytes=0-999") == 503
        state.active_uploads = 0
        async with c.get("/_ping") as r:
            assert r.status == 200
        async with c.get("/no/such/path") as r:
            assert r.status == 404
        async with c.get("/metrics") as r:
            assert r.status == 200
        async with c.get("/metrics") as r:
            m: Samples = {}
            for family in text_string_to_metric_families(await r.text()):
                for s in family.samples:
                    m[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert value(m, "dfget_peer_pieces_served_total") == 2
    assert value(m, "dfget_peer_uploaded_bytes_total") == 2000
    assert value(m, "dfget_peer_upload_seconds_count") == 2
    assert value(m, "dfget_peer_busy_total") == 1
    piece = "/peer/file/{task_id}"
    assert value(m, "dfget_peer_requests_total", endpoint=piece, status="206") == 2
    assert value(m, "dfget_peer_requests_total", endpoint=piece, status="404") == 2
    assert value(m, "dfget_peer_requests_total", endpoint=piece, status="400") == 1
    assert value(m, "dfget_peer_requests_total", endpoint=piece, status="416") == 1
    assert value(m, "dfget_peer_requests_total", endpoint=piece, status="503") == 1
    assert value(m, "dfget_peer_requests_total", endpoint="/_ping", status="200") == 1
    assert value(m, "dfget_peer_requests_total", endpoint="unmatched", status="404") == 1
    assert value(m, "dfget_peer_requests_total", endpoint="/metrics", status="200") == 1
    assert value(m, "dfget_peer_upload_errors_total", reason="not_found") == 2
    assert value(m, "dfget_peer_upload_errors_total", reason="bad_request") == 1
    assert value(m, "dfget_peer_upload_errors_total", reason="range_not_satisfiable") == 1
    assert value(m, "dfget_peer_upload_errors_total", reason="timeout") == 0
    assert value(m, "dfget_peer_files") == 1


def test_a_repeated_report_counts_its_bytes_once_and_the_window_stays_bounded() -> None:
    from common import wire
    from supernode.metrics import COUNTED_WINDOW, Metrics, _Shape

    m = Metrics()
    cdn, peer = "c" * 32, "p" * 32
    shape = _Shape(length=10 * 1024, piece_size=1024, cdn=cdn, until=float("inf"))

    def counted(kind: str) -> float:
        return m.bytes.labels(kind)._value.get()  # type: ignore[no-any-return]

    first = [wire.Report(piece=0, result="ok", source=cdn), wire.Report(piece=1, result="ok", source=peer)]
    m._count("t" * 64, "a" * 32, first, shape)
    m._count("t" * 64, "a" * 32, first, shape)  # sent again: its answer was lost
    assert (counted("cdn"), counted("peer")) == (1024, 1024)
    m._count("t" * 64, "b" * 32, first[:1], shape)  # another client's piece 0 counts
    assert counted("cdn") == 2048
    for i in range(COUNTED_WINDOW * 2):  # far more reports than the window: it stays bounded
        m._count("u" * 64, f"{i:032x}", first[:1], shape)
    assert len(m._counted) + len(m._counted_old) <= COUNTED_WINDOW
    assert counted("cdn") == 2048 + COUNTED_WINDOW * 2 * 1024
