"""dfget's link to this host's peer server. Serving is a bonus, never a reason for a
download to fail: after the first error the link goes quiet and the download goes on."""

from __future__ import annotations

import logging
import os
import shlex
from pathlib import Path

from common.hostport import hostport
from common.wire import PeerAddr, PieceKey

from .notices import notice
from .server.launcher import ControlClient, PeerServerError, ensure_server
from .server.protocol import RegisterFile, ServerInfo

log = logging.getLogger("dfget.peer")


def _started(home: Path, info: ServerInfo, alivetime: float) -> None:
    # It outlives this dfget on purpose (it serves peers), so the user must hear of it.
    notice(f"started a peer server for {home} (pid {info.pid}, {hostport(info.ip, info.port)}); it serves "
           f"this host's files to peers and exits after {alivetime:g} s idle; stop it now with: "
           f"dfget server stop --home {shlex.quote(str(home))}", peer_server_pid=info.pid)


class PeerLink:
    def __init__(self, client: ControlClient | None, info: ServerInfo | None) -> None:
        self.client = client
        self.info = info

    @classmethod
    async def start(cls, home: Path, ip: str, port: int, totallimit: int, alivetime: float,
                    expiretime: float) -> PeerLink:
        try:
            client, info = await ensure_server(home, ip, port, totallimit, alivetime, expiretime,
                                               on_start=lambda i: _started(home, i, alivetime))
        except (PeerServerError, OSError, TimeoutError) as exc:
            log.warning("peer server unavailable, downloading without serving: %s", exc)
            return cls(None, None)
        link = cls(client, info)
        if totallimit and info.totallimit != totallimit:
            await link._do(client.set_limit(totallimit))
        return link

    @property
    def addr(self) -> PeerAddr | None:
        if self.info is None or self.client is None:
            return None
        return PeerAddr(peer_id=self.info.peer_id, ip=self.info.ip, port=self.info.port)

    async def _do(self, coro: object) -> bool:
        try:
            await coro  # type: ignore[misc]
            return True
        except PeerServerError as exc:
            log.warning("peer server stopped answering, no longer serving: %s", exc)
            await self.close()
            return False

    async def register(self, task_id: str, path: Path, length: int, piece_size: int, supernodes: list[str],
                       piece_auth: bool = False, keys: list[PieceKey] | None = None,
                       clients: list[str] | None = None) -> None:
        if self.client is not None:
            await self._do(self.client.register(RegisterFile(
                task_id=task_id, path=str(path), length=length, piece_size=piece_size,
                supernodes=supernodes, owner_pid=os.getpid(), piece_auth=piece_auth, keys=keys or [],
                clients=clients or [])))

    async def trust(self, keys: list[PieceKey]) -> None:
        """Keys of another registration (failover): tokens it issues verify here too."""
        if self.client is not None and keys:
            await self._do(self.client.trust(keys))

    async def verified(self, task_id: str, pieces: list[int], length: int | None = None) -> None:
        if self.client is not None and (pieces or length is not None):
            await self._do(self.client.verified(task_id, pieces, length))

    async def moved(self, task_id: str, path: Path) -> None:
        if self.client is not None:
            await self._do(self.client.moved(task_id, path))

    async def remove(self, task_id: str) -> None:
        if self.client is not None:
            await self._do(self.client.remove(task_id))

    async def peer_secret(self, supernode: str, secret: str) -> None:
        """Our peer's secret at that supernode: the peer server sends it with heartbeats
        and downs, and later dfgets of this host read it back (secrets)."""
        if self.client is not None:
            await self._do(self.client.peer_secret(supernode, secret))

    async def secrets(self) -> dict[str, str]:
        """What the peer server knows now (another dfget of this host may just have
        registered it)."""
        if self.client is None:
            return {}
        try:
            self.info = await self.client.info()
        except PeerServerError:
            return dict(self.info.peer_secrets) if self.info else {}
        return dict(self.info.peer_secrets)

    async def back_to_source(self, reason: str) -> None:
        """Counted in the peer server's metrics: this host's downloads that went to the origin."""
        if self.client is not None:
            await self._do(self.client.back_to_source(reason))

    async def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            await client.close()
