"""dfget's side of the peer server: reuse the one running for this home, or start it as
a detached process; then talk to it over its Unix socket."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import TypeVar

import msgspec

from common import wire

from ..httpclient import HttpClient
from ..neterr import describe
from .protocol import (
    BackToSource,
    PeerSecret,
    Limits,
    MarkVerified,
    MovedFile,
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


class PeerServerError(Exception):
    """The local peer server could not be reached or started (downloads go on without it)."""


class ControlClient:
    def __init__(self, home: Path) -> None:
        self.path = socket_path(home)
        self.http = HttpClient(unix=str(self.path))

    async def close(self) -> None:
        await self.http.close()

    async def _call(self, method: str, path: str, body: object = None, typ: type[T] | None = None) -> T:
        data = wire.encode(body) if body is not None else None
        try:
            resp = await self.http.request(method, "peer-server", 0, path, data,
                                           {"Content-Type": wire.JSON_TYPE}, timeout=5)
            raw = resp.body
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
            if _lock_held(home):
                raise PeerServerError(f"a peer server holds {home / 'server.lock'} but does not answer "
                                      f"on {client.path}") from None
            return None
        with contextlib.suppress(PeerServerError):
            await client.shutdown()
    finally:
        await client.close()
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


def _spawn(home: Path, ip: str, port: int, totallimit: int, alivetime: float, expiretime: float) -> subprocess.Popen[bytes]:
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "dfget", "server", "--home", str(home), "--ip", ip,
           "--port", str(port), "--totallimit", str(totallimit),
           "--alivetime", str(alivetime), "--expiretime", str(expiretime)]
    with open(logs / "server.log", "ab") as out:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True, close_fds=True)


def _launch_lock(home: Path) -> int:
    fd = os.open(home / "launch.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


async def ensure_server(home: Path, ip: str, port: int, totallimit: int, alivetime: float,
                        expiretime: float,
                        on_start: Callable[[ServerInfo], None] | None = None,
                        ) -> tuple[ControlClient, ServerInfo]:
    """Reuse the running server or start one (then `on_start` is called with it);
    concurrent dfgets serialize on a lock so only one of them starts it."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    client = ControlClient(home)
    try:
        return client, await client.info()
    except PeerServerError:
        pass
    fd = await asyncio.wait_for(asyncio.to_thread(_launch_lock, home), START_TIMEOUT)
    try:
        try:
            return client, await client.info()
        except PeerServerError:
            pass
        proc = _spawn(home, ip, port, totallimit, alivetime, expiretime)
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
