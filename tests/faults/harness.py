"""The fault suite's world: real processes on 127.0.0.1, every one of them stoppable,
killable and restartable on the same port, plus the means to break things (tmpfs
mounts, a private redis-server) and to look at what is left afterwards.

    origin     `python -m bench.origin` on a fixed port (so it can die and come back)
    supernode  `python -m supernode` with a fixed home and ports (restart = same identity)
    redis      the suite's Redis (REDIS_URL db, flushed) or a private `redis-server`
    dfget      real `python -m dfget` processes, each host with its own --home (and so
               its own detached peer server); always run with --json and --timeout

Nothing here decides whether a test passes; the tests assert on what it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis
from conftest import (
    LOOPBACK,
    REPO_ROOT,
    ProcessRunner,
    _child_env,
    file_bytes,
    file_url,
    free_port,
    free_ports,
    http_get,
    in_ci,
    processes_under,
)
from dfget_support import server_pid

MIB = 1 << 20
PIECE = 4 * MIB  # piece size of every file below 200 MiB
DFGET_TIMEOUT = 60  # dfget's own --timeout: a hang shows up as exit 6, never as a stuck test


def post_json(url: str, body: dict[str, Any], timeout: float = 30.0) -> tuple[int, dict[str, Any]]:
    status, raw = http_get(url, timeout=timeout, data=json.dumps(body).encode())
    try:
        return status, json.loads(raw) if raw else {}
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}


def get_json(url: str, timeout: float = 10.0) -> tuple[int, dict[str, Any]]:
    status, raw = http_get(url, timeout=timeout)
    return status, json.loads(raw) if raw else {}


def wait_for(pred: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `pred` (blocking) until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


async def await_for(pred: Any, timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- origin ------------------------------------------------------------------------------
class Origin:
    """`python -m bench.origin` on a fixed port: kill() and start() again keep the URL."""

    def __init__(self, tmp: Path, rate: int = 0) -> None:
        self.dir = tmp / "files"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0  # chosen by the first start
        self.rate = rate
        self.log = tmp / "origin.log"
        self.runner: ProcessRunner | None = None

    @property
    def base(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def url(self, name: str, **query: Any) -> str:
        return file_url(self.base, name, **query)

    def put_random(self, name: str, size: int, seed: int) -> bytes:
        data = file_bytes(size, seed)
        (self.dir / name).write_bytes(data)
        return data

    def start(self) -> None:
        """The first start binds port 0; a restart binds the same port again. Ready once
        *this* process wrote its port file (on a shared machine another test's origin
        may answer /_stats on a port we only believed free)."""
        port_file = self.dir.parent / "port"
        port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "bench.origin", "--dir", self.dir, "--host", LOOPBACK,
               "--port", str(self.port), "--port-file", port_file]
        if self.rate:
            cmd += ["--rate", str(self.rate)]

        def ready() -> str | None:
            try:
                return f"http://{LOOPBACK}:{int(port_file.read_text())}/_stats"
            except (OSError, ValueError):
                return None

        self.runner = ProcessRunner(cmd, self.log, ready_url=ready, env=_child_env(), cwd=REPO_ROOT)
        self.runner.start()
        self.port = int(port_file.read_text())

    def kill(self) -> None:
        assert self.runner is not None
        self.runner.kill()

    def stop(self) -> None:
        if self.runner is not None:
            self.runner.stop()

    def stats(self) -> dict[str, Any]:
        status, body = get_json(f"{self.base}/_stats")
        assert status == 200, body
        return body

    def served(self, name: str) -> tuple[int, int]:
        """(body bytes, requests) the origin served for `name` since start/reset."""
        f = self.stats()["by_file"].get(name, {"bytes": 0, "requests": 0})
        return int(f["bytes"]), int(f["requests"])


# --- redis -------------------------------------------------------------------------------
class PrivateRedis:
    """A redis-server of our own on a free loopback port, in a temp dir: ours to kill and
    restart (never the shared one). `persist` keeps state across restarts (AOF)."""

    def __init__(self, tmp: Path, persist: bool = False) -> None:
        self.dir = tmp / "redis"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.persist = persist
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def start(self) -> None:
        cmd = ["redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--dir", str(self.dir),
               "--save", "", "--appendonly", "yes" if self.persist else "no",
               "--appendfsync", "always", "--logfile", str(self.dir / "redis.log")]
        try:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except FileNotFoundError:
            pytest.fail("redis-server is not installed (the fault suite needs it)", pytrace=False)
        client = redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            def up() -> bool:
                try:
                    return bool(client.ping())
                except redis.RedisError:
                    assert self.proc is not None and self.proc.poll() is None, "redis-server exited"
                    return False
            wait_for(up, 10, "the private redis-server")
            theirs = {_text(k): _text(v) for k, v in client.config_get("dir").items()}.get("dir", "")
            assert Path(theirs).resolve() == self.dir.resolve(), (
                f"another redis-server answers on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def _text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# --- supernode ---------------------------------------------------------------------------
class Supernode:
    """The real supernode with a fixed home and fixed ports: restart() is the same
    supernode coming back (same id from its home, same cache)."""

    def __init__(self, home: Path, redis_url: str | None, extra: Sequence[str] = ()) -> None:
        self.home = home
        self.home.mkdir(parents=True, exist_ok=True)
        self.redis_url = redis_url
        self.port, self.download_port = free_ports(2)
        self.extra = list(extra)
        self.log = home.parent / f"{home.name}.log"  # outside the home: it may be a tiny tmpfs
        self.runner: ProcessRunner | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def node(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def cmd(self) -> list[str]:
        cmd = [sys.executable, "-m", "supernode", "--listen", LOOPBACK, "--port", str(self.port),
               "--download-port", str(self.download_port), "--home", str(self.home),
               "--advertise-ip", LOOPBACK, "--allow-origin", "127.0.0.0/8", "--allow-peer", "127.0.0.0/8",
               "--max-bandwidth", "0"]
        if self.redis_url:
            cmd += ["--redis-url", self.redis_url]
        return cmd + self.extra

    def start(self) -> None:
        """Ready when /_ping answers with this home's supernode id: on a shared machine a
        port we picked as free may be taken meanwhile (then: new ports, on first start)."""
        first = self.starts == 0
        for _ in range(3):
            self.starts += 1
            self.runner = ProcessRunner(self.cmd(), self.log, ready_url=f"{self.url}/_ping",
                                        env=_child_env(), cwd=REPO_ROOT)
            self.runner.start()
            if self._is_mine():
                return
            self.runner.stop()
            if not first:  # a restart must keep its ports
                break
            self.port, self.download_port = free_ports(2)
        raise AssertionError(f"another process answers on port {self.port} (not our supernode)")

    def _is_mine(self) -> bool:
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            assert self.runner is not None
            if self.runner.returncode is not None:
                return False  # ours died (port taken) while someone else answered
            try:
                mine = (self.home / "supernode.id").read_text().strip()
                status, body = get_json(f"{self.url}/_ping")
                return status == 200 and body.get("supernode_id") == mine
            except (OSError, ValueError):
                time.sleep(0.05)
        return False

    def kill(self) -> None:
        assert self.runner is not None
        self.runner.kill()

    def stop(self) -> int | None:
        return self.runner.stop() if self.runner is not None else None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def task(self, tid: str) -> dict[str, Any]:
        status, body = get_json(f"{self.url}/api/v1/tasks/{tid}")
        assert status == 200, body
        return body

    def cache_file(self, tid: str) -> Path:
        return self.home / "cdn" / tid[:2] / f"{tid}.data"


# --- dfget -------------------------------------------------------------------------------
@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    elapsed: float

    @property
    def report(self) -> dict[str, Any]:
        lines = self.stdout.strip().splitlines()
        assert lines, f"dfget printed no --json report (exit {self.code}); stderr: {self.stderr}"
        return json.loads(lines[-1])  # type: ignore[no-any-return]


@dataclass
class Dfget:
    proc: asyncio.subprocess.Process
    started: float = field(default_factory=time.monotonic)

    async def wait(self, timeout: float = DFGET_TIMEOUT + 15) -> Result:
        try:
            out, err = await asyncio.wait_for(self.proc.communicate(), timeout)
        except TimeoutError:
            self.kill()
            await self.proc.wait()
            raise AssertionError(f"dfget did not exit within {timeout} s") from None
        return Result(self.proc.returncode if self.proc.returncode is not None else -1,
                      out.decode(errors="replace"), err.decode(errors="replace"),
                      time.monotonic() - self.started)

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGKILL)


@dataclass
class FakePeer:
    runner: ProcessRunner
    port: int
    cid: str
    task_id: str

    def requests(self) -> int:
        status, body = get_json(f"http://{LOOPBACK}:{self.port}/_stats")
        assert status == 200, body
        return int(body["requests"])


class World:
    """One scenario's processes. Every host (a dfget --home) gets its own peer server."""

    def __init__(self, tmp: Path, redis_url: str | None) -> None:
        self.tmp = tmp
        self.redis_url = redis_url
        self.origins: list[Origin] = []
        self.supernodes: list[Supernode] = []
        self.homes: list[Path] = []
        self.dfgets: list[Dfget] = []
        self.private: list[PrivateRedis] = []
        self.mounts: list[Tmpfs] = []
        self.fakes: list[ProcessRunner] = []
        self.peer_servers: list[ProcessRunner] = []

    # --- building ----------------------------------------------------------------------
    def origin(self, rate: int = 0) -> Origin:
        o = Origin(self.tmp / f"origin{len(self.origins) + 1}", rate)
        self.origins.append(o)
        o.start()
        return o

    def supernode(self, *extra: str, home: Path | None = None, redis_url: str | None = None,
                  start: bool = True) -> Supernode:
        n = len(self.supernodes) + 1
        sn = Supernode(home or self.tmp / f"sn{n}", redis_url or self.redis_url, extra)
        self.supernodes.append(sn)
        if start:
            sn.start()
        return sn

    def private_redis(self, persist: bool = False) -> PrivateRedis:
        r = PrivateRedis(self.tmp / f"pr{len(self.private) + 1}", persist)
        self.private.append(r)
        r.start()
        return r

    def fake_peer(self, mode: str, sn: Supernode, url: str, data_path: Path) -> FakePeer:
        """A hostile peer process (fakepeer.py) that claims every piece of the task."""
        n = len(self.fakes) + 1
        ready = self.tmp / f"fake{n}.json"

        def ready_url() -> str | None:
            try:
                return f"http://{LOOPBACK}:{json.loads(ready.read_text())['port']}/_stats"
            except (OSError, ValueError, KeyError):
                return None

        runner = ProcessRunner([sys.executable, "-m", "tests.faults.fakepeer", "--supernode", sn.url,
                                "--url", url, "--mode", mode, "--data", data_path, "--ready", ready],
                               self.tmp / f"fake{n}.log", ready_url=ready_url, ready_timeout=30,
                               env=_child_env(), cwd=REPO_ROOT)
        self.fakes.append(runner)
        runner.start()
        info = json.loads(ready.read_text())
        return FakePeer(runner, int(info["port"]), str(info["cid"]), str(info["task_id"]))

    def tmpfs(self, name: str, size: str) -> Tmpfs:
        t = Tmpfs(self.tmp / name, size)
        self.mounts.append(t)
        return t.mount()

    def host(self) -> Path:
        home = self.tmp / f"host{len(self.homes) + 1}"
        self.homes.append(home)
        return home

    # --- dfget -------------------------------------------------------------------------
    def args(self, url: str, out: Path, home: Path, nodes: Sequence[Supernode] | None = None,
             *extra: str) -> list[str]:
        nodes = nodes if nodes is not None else self.supernodes[:1]
        return ["-u", url, "-o", str(out), "-n", ",".join(s.node for s in nodes) or "127.0.0.1:1",
                "--home", str(home), "--ip", LOOPBACK, "--json", "--timeout", f"{DFGET_TIMEOUT}s",
                "-s", "0", *extra]

    async def spawn(self, url: str, out: Path, home: Path | None = None, *extra: str,
                    nodes: Sequence[Supernode] | None = None) -> Dfget:
        home = home or self.host()
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dfget", *self.args(url, out, home, nodes, *extra),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_child_env(),
            cwd=str(REPO_ROOT))
        d = Dfget(proc)
        self.dfgets.append(d)
        return d

    async def dfget(self, url: str, out: Path, home: Path | None = None, *extra: str,
                    nodes: Sequence[Supernode] | None = None) -> Result:
        return await (await self.spawn(url, out, home, *extra, nodes=nodes)).wait()

    # --- looking inside ----------------------------------------------------------------
    def redis(self, url: str | None = None) -> redis.Redis:
        url = url or self.redis_url
        assert url, "this scenario needs a real Redis"
        return redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=2)

    def peer_server(self, home: Path) -> tuple[str, int]:
        """(peer_id, port) of a host's peer server, from its log."""
        text = (home / "logs" / "server.log").read_text(errors="replace")
        found = re.findall(r"peer server ([0-9a-f]{32}) on (?:https?://)?[0-9.]+:(\d+)", text)
        assert found, f"peer server of {home} has not started"
        peer_id, port = found[-1]
        return peer_id, int(port)

    def peer_server_process(self, home: Path, *extra: str) -> ProcessRunner:
        """This host's peer server started by the test (a dfget with this home reuses
        it), as our own child: it can be killed and is always reaped."""
        runner = ProcessRunner([sys.executable, "-m", "dfget", "server", "--home", home, "--ip", LOOPBACK,
                                *extra], home / "logs" / "server.log", env=_child_env(),
                               cwd=REPO_ROOT)
        self.peer_servers.append(runner)
        return runner.start()

    # --- teardown ----------------------------------------------------------------------
    async def close(self) -> None:
        """Everything gets SIGTERM at once, then each is waited for (SIGKILL after 5 s):
        teardown costs the slowest process, not the sum of them."""
        for d in self.dfgets:
            d.kill()
        for d in self.dfgets:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(d.proc.wait(), 10)
        servers = [pid for pid in (server_pid(h) for h in self.homes) if pid is not None]
        runners = [r for r in (*self.fakes, *self.peer_servers, *(sn.runner for sn in self.supernodes),
                               *(o.runner for o in self.origins)) if r is not None]
        for pid in servers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for r in runners:
            r.signal(signal.SIGTERM)
        await asyncio.gather(*(asyncio.to_thread(r.stop) for r in runners),
                             *(_wait_gone(pid, 5.0) for pid in servers))
        for r in self.private:
            r.kill()
        for t in self.mounts:
            t.umount()


async def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            return
        if state == "Z":
            return
        await asyncio.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# --- leaks and mounts --------------------------------------------------------------------


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Tmpfs:
    """A size-limited tmpfs at `path` (root only). Fails in CI when it cannot be mounted;
    skips elsewhere (a developer box without privileges)."""

    def __init__(self, path: Path, size: str) -> None:
        self.path = path
        self.size = size
        self.mounted = False

    def mount(self) -> Tmpfs:
        self.path.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0755", "tmpfs",
                              str(self.path)], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            why = f"cannot mount a tmpfs at {self.path}: {res.stderr.strip() or res.returncode}"
            if in_ci():
                pytest.fail(why + " (the disk-full scenarios need root)", pytrace=False)
            pytest.skip(why)
        self.mounted = True
        return self

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def used(self) -> int:
        st = os.statvfs(self.path)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def umount(self) -> None:
        if not self.mounted:
            return
        for _ in range(50):
            if subprocess.run(["umount", str(self.path)], capture_output=True, check=False).returncode == 0:
                self.mounted = False
                return
            kill_all([pid for pid, _ in processes_under(self.path)])
            time.sleep(0.1)
        subprocess.run(["umount", "-l", str(self.path)], check=False)
        self.mounted = False
        raise AssertionError(f"{self.path} stayed busy; unmounted lazily")


def most_pieces_held(w: World, tid: str) -> int:
    """Most pieces any client of the task holds, as Redis says."""
    r = w.redis()
    try:
        cids = [c.decode() for c in r.hkeys(f"df:t:{{{tid}}}:peers")]
        return max((r.bitcount(f"df:t:{{{tid}}}:have:{c}") for c in cids), default=0)
    finally:
        r.close()
