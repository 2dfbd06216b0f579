"""dfget's link to this host's peer server. Serving is a bonus, never a reason for a
download to fail: after the first error the link goes quiet and the download goes on."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
from pathlib import Path

from common import wire
from common.hostport import hostport
from common.tls import ServerTls
from common.wire import PeerAddr, PieceKey

from .notices import notice
from .server import spool
from .server.jobs import DownloadInvalidated
from .server.launcher import ControlClient, JobInvalidated, PeerServerError, launch_server
from .server.protocol import (
    BackToSource,
    Limits,
    MarkVerified,
    MovedFile,
    PeerSecret,
    RegisterFile,
    ServerInfo,
    TrustKeys,
)

log = logging.getLogger("dfget.peer")


def _started(home: Path, info: ServerInfo, alivetime: float) -> None:
    # It outlives this dfget on purpose (it serves peers), so the user must hear of it.
    notice(f"started a peer server for {home} (pid {info.pid}, {hostport(info.ip, info.port)}); it serves "
           f"this host's files to peers and exits after {alivetime:g} s idle; stop it now with: "
           f"dfget server stop --home {shlex.quote(str(home))}", peer_server_pid=info.pid)


class PeerLink:
    """Control calls go to the server in order. While a server we started is still coming
    up they queue (nothing in a download waits for it); at the end, what is still queued
    is sent if it is up by then, else spooled for it to replay (server/spool.py)."""

    def __init__(self, client: ControlClient | None, info: ServerInfo | None,
                 starting: asyncio.Task[ServerInfo] | None = None, home: Path | None = None) -> None:
        self.client = client
        self.info = info
        self.starting = starting
        self.home = home
        self.queue: list[tuple[str, str, object]] = []
        self.flusher: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, home: Path, ip: str, port: int, totallimit: int, alivetime: float,
                    expiretime: float, tls: ServerTls | None = None, cacert: str | None = None) -> PeerLink:
        """`tls`: a server we start serves pieces over TLS (one already running for this
        home keeps the scheme it has; `addr` says which); `cacert`: what it trusts when it
        talks to the supernodes (heartbeats, keys)."""
        try:
            launched = await launch_server(home, ip, port, totallimit, alivetime, expiretime, tls, cacert)
        except (PeerServerError, OSError, TimeoutError) as exc:
            log.warning("peer server unavailable, downloading without serving: %s", exc)
            return cls(None, None)
        if launched.starting is not None:
            _started(home, launched.info, alivetime)
        link = cls(launched.client, launched.info, launched.starting, home)
        if totallimit and launched.starting is None and launched.info.totallimit != totallimit:
            await link._call("POST", "/limits", Limits(totallimit))
        return link

    @property
    def addr(self) -> PeerAddr | None:
        if self.info is None or self.client is None:
            return None
        return PeerAddr(peer_id=self.info.peer_id, ip=self.info.ip, port=self.info.port, tls=self.info.tls)

    def _up(self) -> bool:
        return self.starting is None or (self.starting.done() and not self.starting.cancelled()
                                         and self.starting.exception() is None)

    async def _call(self, method: str, path: str, body: object) -> None:
        if self.client is None:
            return
        if self.queue or not self._up():
            self.queue.append((method, path, body))
            if self.flusher is None:
                self.flusher = asyncio.ensure_future(self._flush_when_up())
            return
        try:
            await self.client.request(method, path, body)
        except JobInvalidated as exc:
            raise DownloadInvalidated(f"stopped: {exc}") from None
        except PeerServerError as exc:
            log.warning("peer server stopped answering, no longer serving: %s", exc)
            await self.close()

    async def _flush_when_up(self) -> None:
        assert self.starting is not None and self.client is not None
        try:
            await asyncio.shield(self.starting)
            while self.queue:
                method, path, body = self.queue[0]
                await self.client.request(method, path, body)
                self.queue.pop(0)
        except PeerServerError as exc:
            log.warning("peer server did not come up, not serving: %s", exc)
            self.queue.clear()
            self.client = None  # the download goes on without serving

    async def drain(self, timeout: float) -> None:
        """Until the calls queued for a server that is up have reached it (at most
        `timeout` seconds; a server that never comes up ends it at once).

        A server still starting is not waited for (that would add its start-up, about
        0.3 s, to every small download): it has served nothing yet, and it learns the
        queued news in order (register, verified, moved) from the flusher or, after
        close(), from the spool; a piece request that reaches it between the register and
        the moved waits for the news (server/app.py, CATCH_UP)."""
        flusher = self.flusher
        if flusher is None or flusher.done() or not self._up():
            return
        with contextlib.suppress(Exception, TimeoutError):
            await asyncio.wait_for(asyncio.shield(flusher), timeout)

    async def register(self, task_id: str, path: Path, length: int, piece_size: int, supernodes: list[str],
                       piece_auth: bool = False, keys: list[PieceKey] | None = None,
                       clients: list[str] | None = None) -> None:
        await self._call("POST", "/files", RegisterFile(
            task_id=task_id, path=str(path), length=length, piece_size=piece_size,
            supernodes=supernodes, owner_pid=os.getpid(), piece_auth=piece_auth, keys=keys or [],
            clients=clients or []))

    async def trust(self, keys: list[PieceKey]) -> None:
        """Keys of another registration (failover): tokens it issues verify here too."""
        if keys:
            await self._call("POST", "/keys", TrustKeys(keys))

    async def verified(self, task_id: str, pieces: list[int], length: int | None = None) -> None:
        if pieces or length is not None:
            await self._call("POST", f"/files/{task_id}/verified", MarkVerified(pieces, length))

    async def moved(self, task_id: str, path: Path, content: str | None = None) -> None:
        """`content`: the file's sha256 hex, when known (outputs of one content stand in
        for each other at the peer server)."""
        await self._call("POST", f"/files/{task_id}/moved", MovedFile(str(path), content or None))

    async def remove(self, task_id: str) -> None:
        await self._call("DELETE", f"/files/{task_id}", None)

    async def peer_secret(self, supernode: str, secret: str) -> None:
        """Our peer's secret at that supernode: the peer server sends it with heartbeats
        and downs, and later dfgets of this host read it back (secrets)."""
        await self._call("POST", "/secrets", PeerSecret(supernode, secret))

    async def secrets(self) -> dict[str, str]:
        """What the peer server knows now (another dfget of this host may just have
        registered it). A server we are starting knows nothing yet."""
        if self.client is None or not self._up():
            return {}
        try:
            self.info = await self.client.info()
        except PeerServerError:
            return dict(self.info.peer_secrets) if self.info else {}
        return dict(self.info.peer_secrets)

    async def back_to_source(self, reason: str) -> None:
        """Counted in the peer server's metrics: this host's downloads that went to the origin."""
        await self._call("POST", "/back-to-source", BackToSource(reason))  # type: ignore[arg-type]

    async def close(self) -> None:
        client, self.client = self.client, None
        flusher, self.flusher = self.flusher, None
        if flusher is not None and self._up():
            with contextlib.suppress(Exception):
                await flusher  # up: the rest goes over the socket
        elif flusher is not None and client is not None:
            flusher.cancel()  # it waits for the server to come up: no request in flight
            with contextlib.suppress(BaseException):
                await flusher
            await self._hand_over(client)
        self.queue = []
        if self.starting is not None and not self.starting.done():
            self.starting.cancel()
            with contextlib.suppress(BaseException):
                await self.starting
        if client is not None:
            await client.close()

    async def _hand_over(self, client: ControlClient) -> None:
        """The server we started is not up (as far as we know): if it answers now, send
        the queue; else spool it and ask the server to replay the spool, which it does
        anyway once it is up (server/spool.py)."""
        try:
            await client.info()
        except PeerServerError:
            if self.home is None:
                return
            await asyncio.to_thread(self._spool, self.queue)
            with contextlib.suppress(PeerServerError):
                await client.request("POST", "/spool", None, timeout=1.0)
            return
        with contextlib.suppress(PeerServerError):
            for method, path, body in self.queue:
                await client.request(method, path, body)

    def _spool(self, queue: list[tuple[str, str, object]]) -> None:
        assert self.home is not None
        with contextlib.suppress(OSError):
            spool.write(self.home, [(m, p, wire.encode(b) if b is not None else None) for m, p, b in queue])
