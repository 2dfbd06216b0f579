"""Settings and shared state of one peer server process."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.taskid import new_id
from common.tls import ClientTls, ServerTls

from ..throttle import Throttle
from .jobs import JobBook
from .metrics import PeerMetrics
from .table import FileTable
from .trust import TrustedKeys


@dataclass(frozen=True)
class ServerConfig:
    home: Path
    ip: str = "127.0.0.1"
    port: int = 0
    totallimit: int = 0  # bytes/s shared by every upload of this host; 0 = unlimited
    alivetime: float = 300.0
    expiretime: float = 180.0
    max_uploads: int = 5  # v1's per-peer upload cap; the next one gets 503
    upload_timeout: float = 60.0  # a reader too slow to take one piece in this frees its slot
    scan_interval: float = 15.0
    heartbeat_interval: float = 30.0
    drain_timeout: float = 10.0
    header_timeout: float = 10.0  # a connection must deliver a request head within this
    max_requests: int = 256  # requests in progress at once (uploads included); more get 503
    log_level: str = "info"
    log_json: bool = False
    # Started by a dfget that bound the peer socket (so it knew the address at once) and
    # chose the peer id (so it could register before we were up).
    listen_fd: int = -1
    peer_id: str | None = None
    tls: ServerTls | None = None  # serve pieces over TLS (--cert/--key, --client-ca)
    # how we talk to https supernodes: --cacert, and our --cert/--key as client certificate
    client_tls: ClientTls = field(default_factory=ClientTls)


@dataclass
class ServerState:
    config: ServerConfig
    peer_id: str = field(default_factory=new_id)
    table: FileTable = field(default_factory=FileTable)
    jobs: JobBook = field(default_factory=JobBook)  # Failed/Invalid jobs (jobs.py, localread.py)
    active_uploads: int = 0
    active_requests: int = 0
    last_request: float = field(default_factory=time.monotonic)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    uploaded_bytes: int = 0
    # Every supernode any file was registered with: told at shutdown even if its files
    # are already gone from the table.
    known_supernodes: set[str] = field(default_factory=set)
    peer_secrets: dict[str, str] = field(default_factory=dict)  # supernode URL -> our secret there
    metrics: PeerMetrics = field(default_factory=PeerMetrics)
    keys: TrustedKeys = field(default_factory=TrustedKeys)
    auth_refused: collections.Counter[str] = field(default_factory=collections.Counter)
    throttle: Throttle = field(init=False)
    started: float = field(default_factory=time.monotonic)
    _table_changed: asyncio.Future[None] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.throttle = Throttle(self.config.totallimit)
        if self.config.peer_id:
            self.peer_id = self.config.peer_id

    def set_totallimit(self, rate: int) -> None:
        self.throttle = Throttle(rate)

    def table_changed(self) -> None:
        """A control call changed the file table: wake the piece requests waiting on it."""
        fut, self._table_changed = self._table_changed, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def wait_table(self, timeout: float) -> None:
        """Until the next change of the file table, or `timeout` seconds."""
        if timeout <= 0:
            return
        if self._table_changed is None:
            self._table_changed = asyncio.get_running_loop().create_future()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._table_changed), timeout)

    def idle_for(self, now: float) -> float:
        return now - self.last_request
