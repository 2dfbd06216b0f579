"""Real Redis topologies for the HA tests, each on free loopback ports in a temp dir:
a 3-master Redis Cluster and a master watched by one Sentinel. Plus helpers to run
several dfget processes at once and read a supernode's Prometheus counters.

Everything here is started by us and torn down by us (SIGTERM, then SIGKILL); the
shared Redis on 6379 is never touched.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port, free_ports, http_get, in_ci

PY = sys.executable


def need_redis_server() -> str:
    """Path of redis-server; skips outside CI when missing, fails loudly in CI."""
    path = shutil.which("redis-server")
    if path is None or shutil.which("redis-cli") is None:
        msg = "redis-server/redis-cli not installed (apt install redis-server)"
        if in_ci():
            pytest.fail(f"CI=true: {msg}", pytrace=False)
        pytest.skip(msg)
    return path


def _cli(port: int, *args: str, timeout: float = 10) -> str:
    out = subprocess.run(["redis-cli", "-h", "127.0.0.1", "-p", str(port), *args],
                         capture_output=True, timeout=timeout, check=False)
    return out.stdout.decode(errors="replace").strip()


def _wait(pred: Any, what: str, timeout: float = 15.0, procs: Sequence[subprocess.Popen[bytes]] = ()) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        for p in procs:
            if p.poll() is not None:
                raise RuntimeError(f"{what}: process {p.args} exited with {p.returncode}")
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not within {timeout}s")


def _stop(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _server(cmd: list[str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


_BASE = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"]


@dataclass
class RedisCluster:
    """Three masters, no replicas: every hash slot lives on exactly one of them."""

    ports: list[int]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    def flushall(self) -> None:
        for p in self.ports:
            _cli(p, "FLUSHALL")

    def node_of(self, key: str) -> int:
        """Port of the master owning `key`'s slot."""
        slot = int(_cli(self.ports[0], "CLUSTER", "KEYSLOT", key))
        for p in self.ports:
            for line in _cli(p, "CLUSTER", "NODES").splitlines():
                parts = line.split()
                if "myself" in parts[2] and any(_in_range(slot, r) for r in parts[8:]):
                    return p
        raise AssertionError(f"no master owns slot {slot}")

    def keys_per_node(self, pattern: str = "df:*") -> dict[int, int]:
        return {p: len([k for k in _cli(p, "--scan", "--pattern", pattern).splitlines() if k]) for p in self.ports}


def _in_range(slot: int, spec: str) -> bool:
    if spec.startswith("["):
        return False  # a slot being migrated
    a, _, b = spec.partition("-")
    return int(a) <= slot <= int(b or a)


@contextmanager
def redis_cluster(tmp: Path) -> Iterator[RedisCluster]:
    server = need_redis_server()
    tmp.mkdir(parents=True, exist_ok=True)
    picked = free_ports(6)  # 3 client ports, 3 cluster bus ports, all distinct
    ports, bus = picked[:3], picked[3:]
    cluster = RedisCluster(ports)
    try:
        for p, bp in zip(ports, bus):
            d = tmp / str(p)
            d.mkdir()
            cluster.procs.append(_server(
                [server, "--port", str(p), "--dir", str(d), *_BASE, "--cluster-enabled", "yes",
                 "--cluster-config-file", str(d / "nodes.conf"), "--cluster-node-timeout", "2000",
                 # the bus port defaults to port+10000, which overflows for high free ports
                 "--cluster-port", str(bp)],
                d / "redis.log"))
        for p in ports:
            _wait(lambda p=p: _cli(p, "PING") == "PONG", f"cluster node {p}", procs=cluster.procs)
        out = subprocess.run(
            ["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports],
             "--cluster-replicas", "0", "--cluster-yes"], capture_output=True, timeout=30, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {out.stdout!r} {out.stderr!r}")
        for p in ports:
            _wait(lambda p=p: "cluster_state:ok" in _cli(p, "CLUSTER", "INFO"), f"cluster_state:ok on {p}",
                  procs=cluster.procs)
        yield cluster
    finally:
        _stop(cluster.procs)


@contextmanager
def redis_standalone(tmp: Path) -> Iterator[int]:
    """A plain redis-server of our own; yields its port."""
    server = need_redis_server()
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = _server([server, "--port", str(port), "--dir", str(tmp), *_BASE], tmp / "redis.log")
    try:
        _wait(lambda: _cli(port, "PING") == "PONG", "redis-server", procs=[proc])
        yield port
    finally:
        _stop([proc])


class Monitor:
    """MONITOR on a raw connection: every command the server runs, scripts' included,
    as (client kind, [args as bytes])."""

    _ARG = re.compile(rb'"((?:[^"\\]|\\.)*)"')

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(b"MONITOR\r\n")
        self.buf = b""
        while b"\r\n" not in self.buf:
            self.buf += self.sock.recv(4096)
        assert self.buf.startswith(b"+OK"), self.buf
        self.buf = self.buf.split(b"\r\n", 1)[1]

    def drain(self, settle: float = 0.3) -> list[tuple[str, list[bytes]]]:
        self.sock.settimeout(settle)
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    break
                self.buf += chunk
        except TimeoutError:
            pass
        out = []
        for line in self.buf.split(b"\r\n"):
            m = re.match(rb"^\+[\d.]+ \[\d+ ([^\]]+)\] (.*)$", line)
            if m:
                kind = "lua" if m.group(1) == b"lua" else "client"
                out.append((kind, [_unescape(a) for a in self._ARG.findall(m.group(2))]))
        self.buf = b""
        return out

    def close(self) -> None:
        self.sock.close()


def _unescape(raw: bytes) -> bytes:
    out, i = bytearray(), 0
    simple = {ord("n"): 10, ord("r"): 13, ord("t"): 9, ord("a"): 7, ord("b"): 8, ord('"'): 34, ord("\\"): 92}
    while i < len(raw):
        c = raw[i]
        if c == 92 and i + 1 < len(raw):
            nxt = raw[i + 1]
            if nxt == ord("x") and i + 3 < len(raw):
                out.append(int(raw[i + 2:i + 4], 16))
                i += 4
                continue
            out.append(simple.get(nxt, nxt))
            i += 2
            continue
        out.append(c)
        i += 1
    return bytes(out)


@dataclass
class RedisSentinel:
    master_port: int
    sentinel_port: int
    service: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def url(self, db: int = 0) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.service}/{db}"

    def flushall(self) -> None:
        _cli(self.master_port, "FLUSHALL")


@contextmanager
def redis_sentinel(tmp: Path, service: str = "dfmaster") -> Iterator[RedisSentinel]:
    server = need_redis_server()
    tmp.mkdir(parents=True, exist_ok=True)
    mport, sport = free_ports(2)
    s = RedisSentinel(mport, sport, service)
    try:
        s.procs.append(_server([server, "--port", str(mport), "--dir", str(tmp), *_BASE], tmp / "master.log"))
        _wait(lambda: _cli(mport, "PING") == "PONG", "sentinel's master", procs=s.procs)
        conf = tmp / "sentinel.conf"  # sentinel rewrites its config file: it must be writable
        conf.write_text(
            f"port {sport}\nbind 127.0.0.1\ndir {tmp}\nprotected-mode no\n"
            f"sentinel monitor {service} 127.0.0.1 {mport} 1\n"
            f"sentinel down-after-milliseconds {service} 2000\n")
        # `redis-server --sentinel` is the same binary Debian's redis-sentinel links to
        s.procs.append(_server([server, str(conf), "--sentinel"], tmp / "sentinel.log"))
        _wait(lambda: _cli(sport, "SENTINEL", "get-master-addr-by-name", service).split()
              == ["127.0.0.1", str(mport)], "sentinel knows the master", procs=s.procs)
        yield s
    finally:
        _stop(s.procs)


# --- dfget processes -------------------------------------------------------------------------
@dataclass
class Dl:
    """One dfget run: its command, its result once finished."""

    home: Path
    out: Path
    proc: asyncio.subprocess.Process | None = None
    code: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def report(self) -> dict[str, Any]:
        lines = self.stdout.strip().splitlines()
        assert lines, f"dfget printed no report; stderr: {self.stderr[-2000:]}"
        return json.loads(lines[-1])  # type: ignore[no-any-return]


async def start_dfget(url: str, home: Path, out: Path, nodes: Sequence[str], *extra: str,
                      env: dict[str, str] | None = None) -> Dl:
    """Start dfget (--json --notbs --verbose); its stdout and stderr go to files next to
    `home`, so nothing is lost when a test kills it."""
    dl = Dl(home, out)
    home.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    o, e = os.open(f"{home}.stdout", flags, 0o644), os.open(f"{home}.stderr", flags, 0o644)
    try:
        dl.proc = await asyncio.create_subprocess_exec(
            PY, "-m", "dfget", "-u", url, "-o", str(out), "-n", ",".join(nodes), "--home", str(home),
            "--ip", "127.0.0.1", "--json", "-s", "0", "--notbs", "--verbose", *extra,
            stdin=asyncio.subprocess.DEVNULL, stdout=o, stderr=e, env=env)
    finally:
        os.close(o)
        os.close(e)
    return dl


def _collect(dl: Dl) -> None:
    dl.stdout = Path(f"{dl.home}.stdout").read_text(errors="replace")
    dl.stderr = Path(f"{dl.home}.stderr").read_text(errors="replace")


async def finish(dl: Dl, timeout: float) -> Dl:
    assert dl.proc is not None
    try:
        await asyncio.wait_for(dl.proc.wait(), timeout)
    except TimeoutError:
        dl.proc.kill()
        await dl.proc.wait()
        _collect(dl)
        raise AssertionError(f"dfget ({dl.home.name}) did not finish in {timeout}s; "
                             f"stderr: {dl.stderr[-3000:]}") from None
    dl.code = dl.proc.returncode
    _collect(dl)
    return dl


async def reap(dls: Sequence[Dl]) -> None:
    """Kill the dfget processes still running (a test that failed half-way)."""
    for d in dls:
        if d.proc is not None and d.proc.returncode is None:
            d.proc.kill()
            await d.proc.wait()


def metric(base_url: str, name: str, **labels: str) -> float:
    """Sum of every sample of a Prometheus metric on a supernode whose labels include
    `labels` (0 if absent)."""
    status, body = http_get(f"{base_url}/metrics")
    assert status == 200
    want = [f'{k}="{v}"' for k, v in labels.items()]
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and all(w in line for w in want):
            total += float(line.rsplit(" ", 1)[1])
    return total


# --- every script and multi-key command, once ---------------------------------------------
async def exercise_store(url: str) -> dict[str, Any]:
    """Drive every Lua script and every multi-key command of the supernode through its
    real Repo on the store at `url`, checking each answer; returns what it saw. Used to
    prove a topology (Cluster, Sentinel) runs all of them."""
    from common import wire
    from common.taskid import new_id
    from supernode.store import scripts
    from supernode.store.repo import PeerInfo, Repo
    from supernode.store.connection import Store, connect

    store = Store(connect(url))
    repo = Repo(store)
    tid = "d" * 63 + "1"
    cid_a, cid_b, cdn = new_id(), new_id(), new_id()
    peer_a, peer_b = new_id(), new_id()
    dig = [f"{n:064x}" for n in range(4)]
    seen: dict[str, Any] = {}
    try:
        assert await repo.register_task(tid, url="http://o/f", url_key="http://o/f", md5="", identifier="",
                                        range_="", headers={"A": "b"}, fail_interval_ms=1000) == ("new", "pending")
        assert await repo.take_lease(tid, cdn, 5000)
        assert not await repo.take_lease(tid, new_id(), 5000)
        assert await repo.keep_lease(tid, cdn, 5000) and await repo.lease_holder(tid) == cdn
        assert 0 < await repo.lease_ttl_ms(tid) <= 5000
        assert await repo.set_meta(tid, status="fetching", length=4 * 1024, piece_size=1024, piece_count=4,
                                   cdn=cdn, etag='"e"', last_modified="")
        assert await repo.origin_validators(tid) == ('"e"', "")
        await repo.publish_pieces(tid, cdn, [(0, dig[0]), (1, dig[1])])
        assert await repo.adopt_cdn(tid, cdn, [(0, dig[0])])
        assert (await repo.cdn_bitmap(tid)).members(4) == [0]
        await repo.publish_pieces(tid, cdn, [(2, dig[2]), (3, dig[3])])
        assert await repo.digests(tid) == dict(enumerate(dig))
        await repo.unpublish_pieces(tid, [3])  # a rotten cached piece (repair.py)
        assert (await repo.cdn_bitmap(tid)).members(4) == [0, 2]
        assert await repo.finish_task(tid, cdn, {"length": 4 * 1024}, [(3, dig[3])])
        assert (await repo.cdn_bitmap(tid)).members(4) == [0, 2, 3]
        assert await repo.add_peer(tid, cid_a, PeerInfo(peer_a, "127.0.0.1", 15001, "peer"))
        assert await repo.add_peer(tid, cid_b, PeerInfo(peer_b, "127.0.0.1", 15002, "peer"))
        events: list[str] = []
        store.on_event = lambda task, ev: events.append(ev)
        assert await repo.pull(tid, cid_a, [wire.Report(1, "have")], [], max_inflight=4, peer_cap=5, cdn_cap=4,
                               source_fail_limit=5) == []
        assert events and events[-1].split("\n")[1:] == [f"H {cid_a} 1"]  # the change log it returned
        view = await repo.load_view(tid)
        assert view is not None and view["seq"] == int(events[-1].split("\n")[0])
        assert [c[0] for c in view["clients"]] == [cid_a, cid_b] and view["clients"][0][2] == b"\x40"
        detail = await repo.detail(tid, cdn, [0, 1], 8, peer_cap=5, cdn_cap=4)
        assert detail.holders == [(), (cid_a,)] and detail.digests == dig[:2]
        claimed = await repo.claim(tid, cid_b, [(1, cid_a, "peer", 2**40, 0), (0, cdn, "cdn", 2**40, 2)],
                                   max_inflight=4, peer_cap=5, cdn_cap=4)
        assert sorted(claimed) == [0, 1]
        assert await repo.report(tid, cid_b, [wire.Report(1, "ok", cid_a)], source_fail_limit=5) == ("ok", "1")
        assert await repo.report(tid, cid_b, [wire.Report(0, "failed", cdn, "refused")],
                                 source_fail_limit=5) == ("ok", "1")
        # the source that failed this client is on its blacklist: the claim refuses it
        assert await repo.claim(tid, cid_b, [(0, cdn, "cdn", 2**42, 0)], max_inflight=4, peer_cap=5,
                                cdn_cap=4) == []
        assert await repo.claim(tid, cid_a, [(2, cdn, "cdn", 2**42, 0)], max_inflight=4, peer_cap=5,
                                cdn_cap=4) == [2]
        assert await repo.release(tid, cid_a) == 1
        # a failed possession challenge: cid_b stops holding piece 1 (supernode/pop/)
        assert await repo.pop_failed(tid, cid_b, 1, 3) == ("ok", 1)
        assert await repo.heartbeat(peer_a) and await repo.is_alive(peer_a)
        assert await repo.host_tasks(peer_a) == [tid]
        assert await repo.clients_of_host(tid, peer_a) == [cid_a]
        await repo.remove_clients(tid, [cid_a])
        assert set(await repo.all_clients(tid)) == {cid_b}
        await repo.forget_host(peer_a)  # DEL of two keys in two slots
        assert not await repo.is_alive(peer_a)
        await repo.announce_supernode(cdn, "127.0.0.1", 1, 2)
        assert await repo.supernode_address(cdn) == ("127.0.0.1", 2, False)
        await repo.touch(tid)
        assert tid in await repo.list_tasks() and tid in await repo.idle_tasks(-10_000)
        assert await repo.keep_lease(tid, cdn, 0) and await repo.lease_holder(tid) is None
        seen["meta"] = await repo.get_meta(tid)
        await repo.delete_task(tid)
        assert await repo.get_meta(tid) is None
        seen["scripts"] = sorted(scripts.ALL)
        seen["task_id"] = tid
        return seen
    finally:
        await store.close()
