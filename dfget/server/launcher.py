"""dfget's side of the peer server: reuse the one running for this home, or start it as
a detached process; then talk to it over its Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import msgspec

from common import wire
from common.errors import Signal
from common.listen import BACKLOG, listen_socket
from common.taskid import new_id
from common.tls import ServerTls

from ..httpclient import HttpClient
from ..neterr import describe
from .protocol import (
    BackToSource,
    Limits,
    MarkVerified,
    MovedFile,
    PeerSecret,
    RegisterFile,
    ServerInfo,
    TrustKeys,
    socket_path,
)

log = logging.getLogger("dfget.launcher")
T = TypeVar("T")
START_TIMEOUT = 10.0
# Detached children are kept referenced so Popen.__del__ never warns about a server that
# is meant to outlive us.
_CHILDREN: list[subprocess.Popen[bytes]] = []


class PeerServerError(Signal):
    """The local peer server could not be reached or started (downloads go on without it)."""


class JobInvalidated(PeerServerError):
    """410 from the control socket: this download's job was invalidated there."""


class ControlClient:
    def __init__(self, home: Path) -> None:
        self.path = socket_path(home)
        self.http = HttpClient(unix=str(self.path))

    async def close(self) -> None:
        await self.http.close()

    async def request(self, method: str, path: str, body: object = None, timeout: float = 5.0) -> None:
        await self._call(method, path, body, timeout=timeout)

    async def _call(self, method: str, path: str, body: object = None, typ: type[T] | None = None,
                    timeout: float = 5.0) -> T:
        data = wire.encode(body) if body is not None else None
        try:
            resp = await self.http.request(method, "peer-server", 0, path, data,
                                           {"Content-Type": wire.JSON_TYPE}, timeout=timeout)
            raw = resp.body
            if resp.status == 410:
                raise JobInvalidated(f"{method} {path}: the job was invalidated on the peer server")
            if resp.status != 200:
                raise PeerServerError(f"{method} {path}: HTTP {resp.status} {raw[:200]!r}")
        except (OSError, TimeoutError) as exc:
            raise PeerServerError(f"{method} {path}: {describe(exc)}") from None
        return msgspec.json.decode(raw, type=typ) if typ is not None else None  # type: ignore[return-value]

    async def info(self) -> ServerInfo:
        return await self._call("GET", "/info", typ=ServerInfo)

    async def register(self, req: RegisterFile) -> None:
        await self._call("POST", "/files", req)

    async def verified(self, task_id: str, pieces: list[int], length: int | None = None) -> None:
        await self._call("POST", f"/files/{task_id}/verified", MarkVerified(pieces, length))

    async def moved(self, task_id: str, path: Path) -> None:
        await self._call("POST", f"/files/{task_id}/moved", MovedFile(str(path)))

    async def remove(self, task_id: str) -> None:
        await self._call("DELETE", f"/files/{task_id}")

    async def set_limit(self, totallimit: int) -> None:
        await self._call("POST", "/limits", Limits(totallimit))

    async def trust(self, keys: list[wire.PieceKey]) -> None:
        await self._call("POST", "/keys", TrustKeys(keys))

    async def peer_secret(self, supernode: str, secret: str) -> None:
        await self._call("POST", "/secrets", PeerSecret(supernode, secret))

    async def back_to_source(self, reason: str) -> None:
        await self._call("POST", "/back-to-source", BackToSource(reason))  # type: ignore[arg-type]

    async def shutdown(self) -> None:
        await self._call("POST", "/shutdown")


async def stop_server(home: Path, timeout: float = 10.0) -> int | None:
    """Stop the peer server of this home: ask it over its control socket, then SIGTERM
    the pid it gave (it answered on our socket, so it is ours) if it has not exited
    within `timeout`. The pid it had, or None when none runs. PeerServerError when one
    holds the home's lock but does not answer."""
    client = ControlClient(home)
    try:
        try:
            info = await client.info()
        except PeerServerError:
            other = _pending_pid(home)
            if other is not None:  # started a moment ago by a dfget: it will answer soon
                with contextlib.suppress(PeerServerError):
                    info = await _wait_up(client, lambda: _alive(other), home)
                    await client.shutdown()
                    return await _await_exit(home, info, timeout)
            if _lock_held(home):
                raise PeerServerError(f"a peer server holds {home / 'server.lock'} but does not answer "
                                      f"on {client.path}") from None
            return None
        with contextlib.suppress(PeerServerError):
            await client.shutdown()
    finally:
        await client.close()
    return await _await_exit(home, info, timeout)


async def _await_exit(home: Path, info: ServerInfo, timeout: float = 10.0) -> int:
    for sig in (None, signal.SIGTERM):
        if sig is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, sig)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _lock_held(home) and not _alive(info.pid):
                return info.pid
            await asyncio.sleep(0.05)
    raise PeerServerError(f"the peer server (pid {info.pid}) did not stop")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:  # gone (or no /proc: fall back to signal 0)
        if not Path("/proc/self").exists():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
            return True
        return False
    return state != "Z"


def _lock_held(home: Path) -> bool:
    """Whether a server holds this home's lock (lifecycle.server_lock) right now."""
    try:
        fd = os.open(home / "server.lock", os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _tls_args(tls: ServerTls | None, cacert: str | None) -> list[str]:
    args = ["--cacert", cacert] if cacert else []
    if tls is not None:
        args += ["--cert", tls.cert, "--key", tls.key] + (["--client-ca", tls.client_ca] if tls.client_ca else [])
    return args


def _spawn(home: Path, ip: str, port: int, totallimit: int, alivetime: float, expiretime: float,
           listen: socket.socket | None = None, peer_id: str | None = None,
           tls: ServerTls | None = None, cacert: str | None = None) -> subprocess.Popen[bytes]:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dfget", "server", "--home", str(home), "--ip", ip,
           "--port", str(port), "--totallimit", str(totallimit),
           "--alivetime", str(alivetime), "--expiretime", str(expiretime), *_tls_args(tls, cacert)]
    fds: tuple[int, ...] = ()
    if listen is not None and peer_id is not None:
        cmd += ["--listen-fd", str(listen.fileno()), "--peer-id", peer_id]
        fds = (listen.fileno(),)
    with open(logs / "server.log", "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True, pass_fds=fds)


@dataclass
class Launched:
    """A peer server that answers (`starting` None), or one just started that does not
    answer yet: its address and peer id are already known (we bound its socket and chose
    its id), so a download registers with the supernode at once; connections to it wait
    in the socket's backlog until it accepts, and control calls wait for `starting`."""

    client: ControlClient
    info: ServerInfo
    starting: asyncio.Task[ServerInfo] | None = None


PENDING = "server.pending"  # pid of a server started but perhaps not answering yet


async def launch_server(home: Path, ip: str, port: int, totallimit: int, alivetime: float,
                        expiretime: float, tls: ServerTls | None = None, cacert: str | None = None) -> Launched:
    """Like `ensure_server`, without waiting for a server we start to come up."""
    await asyncio.to_thread(home.mkdir, parents=True, exist_ok=True, mode=0o700)
    client = ControlClient(home)
    try:
        return Launched(client, await client.info())
    except PeerServerError:
        pass
    fd = await _acquire_launch_lock(home)
    try:
        try:
            return Launched(client, await client.info())
        except PeerServerError:
            pass
        other = _pending_pid(home)
        if other is not None:  # another dfget started one a moment ago: wait for it
            return Launched(client, await _wait_up(client, lambda: _alive(other), home))
        peer_id = new_id()
        try:
            sock = listen_socket(ip, port)
            sock.listen(BACKLOG)
        except OSError as exc:
            await client.close()
            raise PeerServerError(f"cannot listen on {ip}:{port}: {exc}") from None
        with sock:
            proc = _spawn(home, ip, port, totallimit, alivetime, expiretime, sock, peer_id, tls, cacert)
            bound = sock.getsockname()
        _CHILDREN.append(proc)
        (home / PENDING).write_text(str(proc.pid))
        info = ServerInfo(peer_id=peer_id, ip=ip, port=int(bound[1]), pid=proc.pid, version="",
                          totallimit=totallimit, tls=tls is not None)
        starting = asyncio.ensure_future(_wait_up(client, lambda: proc.poll() is None, home))
        return Launched(client, info, starting)
    finally:
        os.close(fd)


def _pending_pid(home: Path) -> int | None:
    try:
        pid = int((home / PENDING).read_text())
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _alive(pid) else None


async def _wait_up(client: ControlClient, alive: Callable[[], bool], home: Path) -> ServerInfo:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            return await client.info()
        except PeerServerError:
            if not alive():
                break
        await asyncio.sleep(0.02)
    raise PeerServerError(f"the peer server did not start; see {home / 'logs' / 'server.log'}")


def _launch_lock(home: Path, deadline: float) -> int:
    """The home's launch lock, waited for until `deadline` (monotonic) at most: a thread
    blocked in flock() for ever cannot be cancelled, and it kept a process from exiting
    (asyncio waits for its executor's threads at shutdown)."""
    fd = os.open(home / "launch.lock", os.O_RDWR | os.O_CREAT, 0o600)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise PeerServerError(f"another dfget has been starting the peer server of {home} "
                                      f"for over {START_TIMEOUT:g} s") from None
            time.sleep(0.02)


async def _acquire_launch_lock(home: Path) -> int:
    """The lock from a worker thread; if we are cancelled meanwhile, the lock the thread
    still gets is released at once (a leaked one would block every later start)."""
    fut = asyncio.ensure_future(asyncio.to_thread(_launch_lock, home, time.monotonic() + START_TIMEOUT))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        fut.add_done_callback(_close_acquired)
        raise


def _close_acquired(fut: asyncio.Future[int]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result())


async def ensure_server(home: Path, ip: str, port: int, totallimit: int, alivetime: float,
                        expiretime: float,
                        on_start: Callable[[ServerInfo], None] | None = None,
                        tls: ServerTls | None = None, cacert: str | None = None,
                        ) -> tuple[ControlClient, ServerInfo]:
    """Reuse the running server or start one (then `on_start` is called with it);
    concurrent dfgets serialize on a lock so only one of them starts it."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    client = ControlClient(home)
    try:
        return client, await client.info()
    except PeerServerError:
        pass
    fd = await _acquire_launch_lock(home)
    try:
        try:
            return client, await client.info()
        except PeerServerError:
            pass
        proc = _spawn(home, ip, port, totallimit, alivetime, expiretime, tls=tls, cacert=cacert)
        _CHILDREN.append(proc)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            try:
                info = await client.info()
            except PeerServerError:
                if proc.poll() is not None:
                    break
            else:
                if on_start is not None:
                    on_start(info)
                return client, info
        await client.close()
        raise PeerServerError(f"the peer server did not start; see {home / 'logs' / 'server.log'}")
    finally:
        os.close(fd)
