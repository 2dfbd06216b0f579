"""Running the peer server: one per home (flock), two listeners (peer TCP, control Unix
socket), periodic sweep / heartbeat / idle check, and a clean shutdown sequence:
stop accepting, tell the supernodes, drain with a deadline, exit 0."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
from aiohttp import web

from common import logs, wire
from common.errors import DfError, Signal
from common.hostport import hostport
from common.listen import BACKLOG, listen_socket

from ..neterr import describe
from ..supernodes import PEER_SECRET_HEADER
from . import spool
from .app import build_peer_app, runner_kwargs
from .control import build_control_app
from .launcher import PENDING
from .protocol import socket_path
from .state import ServerConfig, ServerState
from .table import FileEntry

log = logging.getLogger("dfget.server")
LOCK_NAME = "server.lock"


class AlreadyRunning(Signal):
    pass


@contextlib.contextmanager
def server_lock(home: Path) -> Iterator[None]:
    """Held for the whole life of the server: a second server on this home cannot start."""
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AlreadyRunning(f"a peer server already runs for {home}") from None
        yield
    finally:
        os.close(fd)


class Notifier:
    """Best-effort calls to the supernodes; a dead supernode must not stall the server."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Notifier:
        tls = self.state.config.client_tls
        connector = aiohttp.TCPConnector(ssl=tls.context() if tls.cacert or tls.cert else True)
        self.session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=3))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.session is not None:
            await self.session.close()

    async def _post(self, base: str, path: str, body: object) -> None:
        assert self.session is not None
        try:
            async with self.session.post(base + path, data=wire.encode(body),
                                         headers=self._headers(base)) as resp:
                raw = await resp.read()
                if resp.status == 403:
                    log.warning("supernode %s%s refused us: %s", base, path, raw[:300].decode(errors="replace"))
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.info("supernode %s%s: %s", base, path, describe(exc))

    def _headers(self, base: str) -> dict[str, str]:
        """Our secret at that supernode, or one from another supernode (likely the same
        cluster: the list came from one dfget's -n) when it gave us none yet."""
        headers = {"Content-Type": wire.JSON_TYPE}
        secrets = self.state.peer_secrets
        secret = secrets.get(base) or next(iter(secrets.values()), None)
        if secret is not None:
            headers[PEER_SECRET_HEADER] = secret
        return headers

    async def files_gone(self, entries: list[FileEntry]) -> None:
        """Tell the supernodes which of this host's clients no longer serve: by client id
        when the download said which (another download of the same task may be running
        here now and must stay), else every client of this host in those tasks."""
        by_node: dict[tuple[str, bool], tuple[list[str], list[str]]] = {}
        for e in entries:
            log.info("file of task %s is gone, telling supernodes", e.task_id[:16])
            for url in e.supernodes:
                tids, cids = by_node.setdefault((url, bool(e.clients)), ([], []))
                tids.append(e.task_id)
                cids.extend(e.clients)
        await asyncio.gather(*(self._post(url, "/api/v1/peers/down",
                                          wire.PeerDownRequest(self.state.peer_id, tids, cids if named else None))
                               for (url, named), (tids, cids) in by_node.items()))

    async def server_down(self) -> None:
        await asyncio.gather(*(self._post(url, "/api/v1/peers/down",
                                          wire.PeerDownRequest(self.state.peer_id, None))
                               for url in self.state.known_supernodes))

    async def heartbeat(self) -> None:
        await asyncio.gather(*(self._post(url, "/api/v1/peers/heartbeat",
                                          wire.HeartbeatRequest(self.state.peer_id))
                               for url in self.state.table.supernodes()))
        await self.fetch_keys()

    async def fetch_keys(self) -> bool:
        """Re-read the piece-token keys from the supernodes of our files; True if a key
        was new."""
        replies = await asyncio.gather(*(self._keys(url) for url in self.state.table.supernodes()))
        return sum(self.state.keys.add(r.keys) for r in replies if r is not None) > 0

    async def refresh_keys(self) -> bool:
        """A token named an unknown key: ask the supernodes, at most every few seconds."""
        if not self.state.keys.may_refresh():
            return False
        return await self.fetch_keys()

    async def _keys(self, base: str) -> wire.KeysReply | None:
        assert self.session is not None
        try:
            async with self.session.get(base + "/api/v1/keys", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    return None
            return wire.decode(raw, wire.KeysReply)
        except (aiohttp.ClientError, OSError, TimeoutError, DfError) as exc:
            log.info("supernode %s: cannot read keys: %s", base, exc)
            return None


async def _periodic(state: ServerState, notifier: Notifier) -> None:
    cfg = state.config
    next_beat = time.monotonic() + cfg.heartbeat_interval
    tick = min(cfg.scan_interval, 1.0)
    last_scan = time.monotonic()
    while not state.stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(state.stop.wait(), tick)
        now = time.monotonic()
        if now - last_scan >= cfg.scan_interval:
            last_scan = now
            gone = state.table.sweep(now, cfg.expiretime)
            if gone:
                await notifier.files_gone(gone)
                await asyncio.to_thread(drop_store_files, cfg.home, gone)
        if now >= next_beat:
            next_beat = now + cfg.heartbeat_interval
            await notifier.heartbeat()
        if state.active_uploads == 0 and state.idle_for(now) > cfg.alivetime and not state.table.busy():
            log.info("no request for %.0f s and no download in progress: exiting", cfg.alivetime)
            state.stop.set()


def drop_store_files(home: Path, gone: list[FileEntry]) -> None:
    """Files dfget keeps in <home>/store (`-o -`, `--range`: no output of the user's) go
    with their entry; any other file is the user's output and stays."""
    store = home / "store"
    for e in gone:
        if e.path.parent == store:
            for p in (e.path, e.path.with_name(e.path.name + ".cid")):
                with contextlib.suppress(OSError):
                    p.unlink()


class ListenError(Signal):
    """The peer port cannot be had (taken, or --ip is not an address of this host)."""


def _peer_socket(cfg: ServerConfig) -> socket.socket:
    if cfg.listen_fd >= 0:  # bound (and listening) by the dfget that started us
        sock = socket.socket(fileno=cfg.listen_fd)
        sock.setblocking(False)
        return sock
    return listen_socket(cfg.ip, cfg.port)


async def serve(cfg: ServerConfig) -> None:
    state = ServerState(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, state.stop.set)
    async with Notifier(state) as notifier:
        def dropped(entry: FileEntry) -> None:
            if state.table.remove(entry.task_id) is not None:
                task = loop.create_task(notifier.files_gone([entry]))
                background.add(task)
                task.add_done_callback(background.discard)

        background: set[asyncio.Task[None]] = set()
        peer_runner = web.AppRunner(build_peer_app(state, dropped, notifier.refresh_keys), access_log=None,
                                    **runner_kwargs(state))  # type: ignore[arg-type]
        control_runner = web.AppRunner(build_control_app(state, notifier.files_gone), access_log=None)
        await peer_runner.setup()
        await control_runner.setup()
        try:
            try:
                peer_sock = _peer_socket(cfg)
            except OSError as exc:
                why = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ListenError(f"cannot listen on {hostport(cfg.ip, cfg.port)} (--ip, --port): {why}") from None
            state.port = peer_sock.getsockname()[1]
            sock = socket_path(cfg.home)
            with contextlib.suppress(FileNotFoundError):
                sock.unlink()  # stale: we hold the lock, so nobody else serves it
            old = os.umask(0o077)
            try:
                await web.UnixSite(control_runner, str(sock)).start()
            finally:
                os.umask(old)
            os.chmod(sock, 0o600)  # only this user's dfget processes may control us
            # What the dfget that started us left (it may have finished before we were
            # up) is in the table before the first peer request is accepted (they wait
            # in the socket's backlog meanwhile).
            await spool.replay(cfg.home, sock)
            with contextlib.suppress(OSError):
                (cfg.home / PENDING).unlink()
            ssl_context = cfg.tls.context() if cfg.tls is not None else None
            await web.SockSite(peer_runner, peer_sock, ssl_context=ssl_context, backlog=BACKLOG).start()
            log.info("peer server %s on %s://%s, control %s", state.peer_id, "https" if ssl_context else "http",
                     hostport(cfg.ip, state.port), sock)
            await _periodic(state, notifier)
        finally:
            log.info("shutting down")
            await notifier.server_down()
            await control_runner.cleanup()
            await peer_runner.cleanup()  # stops accepting, drains uploads with a deadline
            for task in list(background):
                task.cancel()
            with contextlib.suppress(FileNotFoundError):
                socket_path(cfg.home).unlink()


def _loop_factory(tls: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when serving TLS (where installed; not with DF_NO_UVLOOP=1):
    asyncio's TLS transport is written in Python and cost the peer server about 3.5 times
    the CPU per GiB of uvloop's (bench/results/tls.md), and over TLS there is no sendfile
    to lose. Plain HTTP keeps the standard loop, whose loop.sendfile aiohttp uses (uvloop
    has none)."""
    if not tls or os.environ.get("DF_NO_UVLOOP"):
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def keep_nice() -> int | None:
    """A peer server started by dfget leads a session of its own, and where the kernel
    groups the scheduling of each session (autogroup), that group competes at nice 0 with
    the session of whoever started it: `nice -n 10 dfget ...` would leave a peer server
    that takes CPU as if not niced. Give our own session's group the nice level we were
    started with. Returns the level set, or None (not niced, not a session of our own, no
    autogroup)."""
    level = os.nice(0)
    if level <= 0 or os.getsid(0) != os.getpid() or not os.path.exists("/proc/self/autogroup"):
        return None
    if not set_group_nice(level):
        log.warning("could not give this session's scheduling group nice %d", level)
        return None
    return level


def set_group_nice(level: int, attempts: int = 5) -> bool:
    """Write `level` as the nice level of this process's autogroup. Without CAP_SYS_ADMIN
    the kernel takes one such write per 100 ms on the whole machine and refuses the others
    with EAGAIN (several peer servers starting at once), so that is retried a few times."""
    for _ in range(attempts):
        try:
            with open("/proc/self/autogroup", "w") as f:
                f.write(str(level))
            return True
        except BlockingIOError:
            time.sleep(0.11)
        except OSError:
            return False
    return False


def run_server(cfg: ServerConfig) -> int:
    logs.setup(cfg.log_level, as_json=cfg.log_json,
               text_format="%(asctime)s %(name)s %(levelname)s %(message)s")
    keep_nice()
    try:
        with server_lock(cfg.home), asyncio.Runner(loop_factory=_loop_factory(cfg.tls is not None)) as runner:
            runner.run(serve(cfg))
    except AlreadyRunning as exc:
        log.info("%s", exc)
        return 0
    return 0
