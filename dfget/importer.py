"""`dfget import FILE`: put a local file into the swarm with no origin.

The importer hashes the file (every piece and the whole), refuses it if `--digest` was
given and does not match, has this host's peer server serve it as a complete file, then
tells the supernode (POST /api/v1/import) the digest, length, piece size and piece
digests. The supernode believes none of it: its CDN fetches the file from this peer
server and checks every piece and the whole before anyone is told of a byte
(supernode/cdn/imports.py). We wait until it says success or failed.

Other hosts then get the file with `dfget --digest sha256:<hex> -o OUT` (no URL).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import content, wire
from common.errors import (
    BadRequest,
    ContentDigestMismatch,
    DfError,
    LocalDiskError,
    SupernodeUnavailable,
    TaskFailed,
    from_wire,
)
from common.pieces import piece_count, piece_size_for
from common.tls import ClientTls, ServerTls

from .config import Node, local_ip_towards
from .httpclient import HttpClient
from .notices import notice
from .peerlink import PeerLink
from .supernodes import API_TIMEOUT, SupernodeDown, Supernodes

READ = 1 << 20
POLL = 0.2


@dataclass(frozen=True)
class ImportConfig:
    path: Path
    home: Path
    nodes: tuple[Node, ...]
    digest: str | None = None  # --digest: the file must hash to it
    ip: str | None = None
    port: int = 0
    timeout: float = 600.0  # how long we wait for the supernode's verdict
    alivetime: float = 300.0
    expiretime: float = 180.0
    tls: ClientTls = field(default_factory=ClientTls)
    server_tls: ServerTls | None = None


@dataclass(frozen=True)
class Hashed:
    digest: str  # sha256:<hex>
    length: int
    piece_size: int
    digests: tuple[str, ...]


def _open(path: Path) -> int:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO must not block us
    except FileNotFoundError:
        raise BadRequest(f"{path}: no such file") from None
    except PermissionError:
        raise LocalDiskError(f"{path}: not readable (permission denied)") from None
    except OSError as exc:
        raise LocalDiskError(f"{path}: cannot open: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadRequest(f"{path}: not a regular file")
    return fd


def hash_file(path: Path) -> Hashed:
    """Every piece's sha256 and the whole file's, in one read; the file must not change
    meanwhile (size and mtime are compared before and after)."""
    fd = _open(path)
    try:
        before = os.fstat(fd)
        length = before.st_size
        ps = piece_size_for(length)
        if piece_count(length, ps) > wire.MAX_IMPORT_PIECES:
            raise BadRequest(f"{path}: {length} bytes make more than {wire.MAX_IMPORT_PIECES} pieces, "
                             "the most one import can describe")
        whole, pieces = hashlib.sha256(), []
        pos = 0
        while pos < length:
            h = hashlib.sha256()
            end = min(pos + ps, length)
            while pos < end:
                chunk = os.pread(fd, min(READ, end - pos), pos)
                if not chunk:
                    raise LocalDiskError(f"{path}: shrank while being read")
                h.update(chunk)
                whole.update(chunk)
                pos += len(chunk)
            pieces.append(h.hexdigest())
        after = os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EISDIR:
            raise BadRequest(f"{path}: not a regular file") from None
        raise LocalDiskError(f"{path}: cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise LocalDiskError(f"{path}: changed while being hashed; import it again when it is still")
    return Hashed(f"sha256:{whole.hexdigest()}", length, ps, tuple(pieces))


async def run_import(cfg: ImportConfig) -> dict[str, object]:
    try:
        return await _run(cfg)
    except SupernodeDown as exc:
        raise SupernodeUnavailable(f"no supernode answered: {exc}; nothing imported") from None


async def _run(cfg: ImportConfig) -> dict[str, object]:
    started = time.monotonic()
    hashed = await asyncio.to_thread(hash_file, cfg.path)
    if cfg.digest is not None and hashed.digest != cfg.digest:
        raise ContentDigestMismatch(f"{cfg.path} hashes to {hashed.digest}, not {cfg.digest}; nothing imported")
    tid = content.task_id_of(hashed.digest)
    count = len(hashed.digests)
    async with HttpClient() as http:
        sn = Supernodes(http, cfg.nodes, cfg.tls)
        keys = await sn._call(0, "GET", "/api/v1/keys", None, wire.KeysReply, API_TIMEOUT)
        ip = cfg.ip or local_ip_towards(cfg.nodes[0])
        peer = await PeerLink.start(cfg.home, ip, cfg.port, 0, cfg.alivetime, cfg.expiretime,
                                    tls=cfg.server_tls, cacert=cfg.tls.cacert)
        try:
            if peer.addr is None:
                raise DfError("no peer server could be started for this home: an import needs one to serve "
                              "the file")
            addr = peer.addr
            sn.peer_secrets.update(await peer.secrets())
            # served before the supernode hears of it: its CDN fetches at once
            await peer.register(tid, cfg.path, hashed.length, hashed.piece_size, sn.base_urls(),
                                keys.piece_auth, list(keys.keys))
            await peer.verified(tid, list(range(count)), hashed.length)
            await peer.moved(tid, cfg.path, hashed.digest[7:])
            await peer.drain(30)
            req = wire.ImportRequest(digest=hashed.digest, length=hashed.length, piece_size=hashed.piece_size,
                                     digests=list(hashed.digests), peer=addr)
            reply = await sn._call(0, "POST", "/api/v1/import", req, wire.ImportReply, API_TIMEOUT * 6,
                                   sn._secret_header(sn.current))
            if reply.peer_secret is not None:
                sn.peer_secrets[sn.current.base_url] = reply.peer_secret
                await peer.peer_secret(sn.current.base_url, reply.peer_secret)
            task = await _verdict(sn, tid, reply.task, cfg.timeout)
            seeding = await _seed(sn, peer, cfg.path, hashed, tid)
            await peer.drain(5)
        finally:
            await peer.close()
    return {
        "digest": hashed.digest, "task_id": tid, "length": hashed.length, "piece_size": hashed.piece_size,
        "pieces": count, "status": task.status, "new": reply.new, "supernode": sn.current.base_url,
        "seeding": seeding,
        "peer": f"{addr.ip}:{addr.port}", "path": str(cfg.path),
        "elapsed_s": round(time.monotonic() - started, 3),
    }


async def _seed(sn: Supernodes, peer: PeerLink, path: Path, hashed: Hashed, tid: str) -> bool:
    """Once the supernode has checked the file: this host's peer server joins the task as
    a client holding every piece (reported `have`, like a download resumed from verified
    pieces), so the scheduler sends downloaders to it and not only to the CDN. Best
    effort: the file is in the swarm whatever happens here."""
    if peer.addr is None:
        return False
    try:
        reply = await sn.register(wire.RegisterRequest(identifier=hashed.digest, peer=peer.addr))
        if reply.peer_secret is not None:
            await peer.peer_secret(sn.current.base_url, reply.peer_secret)
        # the entry again, now as that client's (its piece requests name it as the source)
        await peer.register(tid, path, hashed.length, hashed.piece_size, sn.base_urls(), reply.piece_auth,
                            list(reply.keys), clients=[reply.cid])
        await peer.verified(tid, list(range(len(hashed.digests))), hashed.length)
        await peer.moved(tid, path, hashed.digest[7:])
        await peer.drain(10)
        have = [wire.Report(piece=n, result="have") for n in range(len(hashed.digests))]
        for i in range(0, len(have), 64):
            await sn.report(tid, wire.ReportRequest(cid=reply.cid, reports=have[i:i + 64]))
    except (DfError, SupernodeDown) as exc:
        notice(f"this host's peer server does not seed the import (downloads use the CDN): {exc}")
        return False
    return True


async def _verdict(sn: Supernodes, tid: str, task: wire.TaskInfo, timeout: float) -> wire.TaskInfo:
    """Until the supernode has checked the file (success) or refused it (failed)."""
    deadline = time.monotonic() + timeout
    while task.status not in ("success", "failed"):
        if time.monotonic() > deadline:
            raise TaskFailed(f"the supernode did not finish checking the import within {timeout:g} s "
                             f"(status {task.status})")
        await asyncio.sleep(POLL)
        task = (await sn.digests(tid)).task
    if task.status == "failed":
        if task.error:
            raise from_wire(task.error, fallback_status=502)
        raise TaskFailed("the supernode refused the import")
    return task

