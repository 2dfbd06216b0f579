"""Test doubles for dfget tests: an origin and a small fake supernode (tracker + CDN on
one port) speaking docs/api.md, both in-process aiohttp apps on 127.0.0.1:0; plus
helpers to run dfget as a real process and to clean up detached peer servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from common import digest, wire
from common.pieces import piece_count, piece_range
from common.ranges import parse_range
from common.taskid import new_id, task_id

PY = sys.executable
HITS: web.AppKey[list[str]] = web.AppKey("hits", list)


def origin_app(files: dict[str, bytes], required_header: tuple[str, str] | None = None) -> web.Application:
    async def get(request: web.Request) -> web.Response:
        if required_header and request.headers.get(required_header[0]) != required_header[1]:
            return web.Response(status=401)
        data = files.get(request.path)
        if data is None:
            return web.Response(status=404)
        request.app[HITS].append(request.path)
        return web.Response(body=data, content_type="application/octet-stream")

    app = web.Application()
    app[HITS] = []
    app.router.add_get("/{tail:.*}", get)
    return app


@dataclass
class FakeTask:
    task_id: str
    data: bytes
    piece_size: int
    holders: dict[int, set[str]] = field(default_factory=dict)
    done: dict[str, set[int]] = field(default_factory=dict)
    assigned: dict[str, set[int]] = field(default_factory=dict)
    banned: dict[str, set[str]] = field(default_factory=dict)  # cid -> sources it reported bad

    @property
    def count(self) -> int:
        return piece_count(len(self.data), self.piece_size)

    def info(self) -> wire.TaskInfo:
        return wire.TaskInfo(task_id=self.task_id, length=len(self.data), piece_size=self.piece_size,
                             piece_count=self.count, status="success",
                             file_digest=digest.of(self.data))

    def digest(self, n: int) -> str:
        s, e = piece_range(n, len(self.data), self.piece_size)
        return digest.of(self.data[s:e + 1])


class FakeSupernode:
    """Scheduler: prefer a peer that holds the piece (not banned by the asker), else the
    CDN (this same server). Good enough to drive dfget through every protocol path."""

    def __init__(self, files: dict[str, bytes], piece_size: int = 64 * 1024,
                 origin_error: str | None = None) -> None:
        self.files = files  # url -> bytes
        self.piece_size = piece_size
        self.origin_error = origin_error
        self.tasks: dict[str, FakeTask] = {}
        self.peers: dict[str, wire.PeerAddr | None] = {}
        self.sn_id = new_id()
        self.port = 0
        self.reports: list[tuple[str, wire.Report]] = []
        self.events: list[tuple[str, str]] = []
        self.downs: list[wire.PeerDownRequest] = []
        self.heartbeats: list[str] = []
        self.registers: list[wire.RegisterRequest] = []
        self.corrupt_cdn = False

    def app(self) -> web.Application:
        app = web.Application()
        r = app.router
        r.add_get("/_ping", self.ping)
        r.add_post("/api/v1/tasks", self.register)
        r.add_post("/api/v1/tasks/{tid}/pull", self.pull)
        r.add_post("/api/v1/tasks/{tid}/report", self.report)
        r.add_get("/api/v1/tasks/{tid}/digests", self.digests)
        r.add_post("/api/v1/peers/down", self.down)
        r.add_post("/api/v1/peers/heartbeat", self.heartbeat)
        r.add_get("/peer/file/{tid}", self.cdn_piece)
        return app

    @staticmethod
    def _err(status: int, code: str) -> web.Response:
        return web.json_response({"error": code, "message": code}, status=status)

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def register(self, request: web.Request) -> web.Response:
        req = wire.decode(await request.read(), wire.RegisterRequest)
        self.registers.append(req)
        if self.origin_error:
            return self._err(502, self.origin_error)
        data = self.files.get(req.url)
        if data is None:
            return self._err(502, "origin_not_found")
        tid = task_id(req.url, filter_keys=req.filter, md5=req.md5, identifier=req.identifier)
        task = self.tasks.setdefault(tid, FakeTask(tid, data, self.piece_size))
        cid = req.cid or new_id()
        self.peers[cid] = req.peer
        task.done.setdefault(cid, set())
        task.assigned[cid] = set()  # registering again (same cid) releases its assignments
        body = wire.RegisterReply(cid=cid, supernode_id=self.sn_id, task=task.info())
        return web.Response(body=wire.encode(body), content_type="application/json")

    def _task(self, request: web.Request) -> FakeTask | None:
        return self.tasks.get(request.match_info["tid"])

    def _apply(self, task: FakeTask, cid: str, reports: list[wire.Report]) -> None:
        for rep in reports:
            self.reports.append((cid, rep))
            task.assigned[cid].discard(rep.piece)
            if rep.result in ("ok", "have"):
                task.done[cid].add(rep.piece)
                task.holders.setdefault(rep.piece, set()).add(cid)
            elif rep.source:
                task.banned.setdefault(cid, set()).add(rep.source)

    async def pull(self, request: web.Request) -> web.Response:
        task = self._task(request)
        req = wire.decode(await request.read(), wire.PullRequest)
        if task is None or req.cid not in task.done:
            return self._err(404, "not_found")
        self._apply(task, req.cid, req.reports)
        out: list[wire.Assignment] = []
        for n in range(task.count):
            if len(out) >= req.limit:
                break
            if n in task.done[req.cid] or n in task.assigned[req.cid]:
                continue
            out.append(self._assign(task, req.cid, n))
            task.assigned[req.cid].add(n)
        if len(task.done[req.cid]) == task.count:
            state = "finished"
        else:
            state = "continue" if out else "wait"
        if state == "wait":
            await asyncio.sleep(min(req.wait, 0.05))
        body = wire.PullReply(state=state, task=task.info(), assignments=out,
                              done=len(task.done[req.cid]))
        return web.Response(body=wire.encode(body), content_type="application/json")

    def _assign(self, task: FakeTask, cid: str, n: int) -> wire.Assignment:
        s, e = piece_range(n, len(task.data), task.piece_size)
        banned = task.banned.get(cid, set())
        for holder in sorted(task.holders.get(n, ())):
            peer = self.peers.get(holder)
            if holder != cid and holder not in banned and peer is not None:
                src = wire.Source(cid=holder, ip=peer.ip, port=peer.port, kind="peer")
                break
        else:
            src = wire.Source(cid=self.sn_id, ip="127.0.0.1", port=self.port, kind="cdn")
        return wire.Assignment(piece=n, start=s, end=e, digest=task.digest(n), source=src)

    async def report(self, request: web.Request) -> web.Response:
        task = self._task(request)
        req = wire.decode(await request.read(), wire.ReportRequest)
        if task is None or req.cid not in task.done:
            return self._err(404, "not_found")
        self._apply(task, req.cid, req.reports)
        if req.event:
            self.events.append((req.cid, req.event))
        return web.json_response({"done": len(task.done[req.cid])})

    async def digests(self, request: web.Request) -> web.Response:
        task = self._task(request)
        if task is None:
            return self._err(404, "not_found")
        body = wire.DigestsReply(task=task.info(), digests=[task.digest(n) for n in range(task.count)])
        return web.Response(body=wire.encode(body), content_type="application/json")

    async def down(self, request: web.Request) -> web.Response:
        self.downs.append(wire.decode(await request.read(), wire.PeerDownRequest))
        return web.json_response({"ok": True})

    async def heartbeat(self, request: web.Request) -> web.Response:
        self.heartbeats.append(wire.decode(await request.read(), wire.HeartbeatRequest).peer_id)
        return web.json_response({"ok": True})

    async def cdn_piece(self, request: web.Request) -> web.Response:
        task = self._task(request)
        if task is None:
            return self._err(404, "not_found")
        rng = parse_range(request.headers["Range"], len(task.data))
        body = task.data[rng.start:rng.end + 1]
        if self.corrupt_cdn:
            body = bytes([body[0] ^ 0xFF]) + body[1:]
        return web.Response(status=206, body=body, headers={
            "Content-Range": rng.content_range(len(task.data))})


async def start_app(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    @property
    def report(self) -> dict[str, object]:
        return json.loads(self.stdout.strip().splitlines()[-1])


async def run_dfget_bytes(*args: str, timeout: float = 60) -> tuple[int, bytes, str]:
    """(exit code, stdout as bytes, stderr): for `-o -`, whose stdout is the file."""
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "dfget", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out, err.decode()


async def run_dfget(*args: str, timeout: float = 60) -> Result:
    code, out, err = await run_dfget_bytes(*args, timeout=timeout)
    return Result(code, out.decode(), err)


def server_pid(home: Path) -> int | None:
    """Pid of the peer server holding this home's lock, found through /proc (tests only)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"server" in cmd and b"--home" in cmd and cmd[cmd.index(b"--home") + 1] == os.fsencode(home):
            return int(entry.name)
    return None


async def stop_server(home: Path, timeout: float = 10) -> int | None:
    pid = server_pid(home)
    if pid is None:
        return None
    os.kill(pid, signal.SIGTERM)
    for _ in range(int(timeout / 0.05)):
        if not Path(f"/proc/{pid}").exists() or _zombie(pid):
            return pid
        await asyncio.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return pid


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
