"""One dfget run: P2P through the supernodes, or back to source when that cannot work.

Decides *whether* to go back to source; `p2p.P2PSession` and `source.download` do the
transfers. Origin refusals (404/401/403) are final: the origin is not asked again.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from common import taskid
from common.errors import (
    DfError,
    IntegrityError,
    LocalDiskError,
    OriginForbidden,
    OriginNotFound,
    OriginUnauthorized,
    P2PFailed,
    SupernodeUnavailable,
)
from common.ratelimit import Throttle

from . import source
from .config import DownloadConfig, local_ip_towards
from .output import PartFile
from .p2p import P2PGaveUp, P2PSession
from .peerlink import PeerLink
from .piecefetch import FetchLimits
from .progress import Stats

log = logging.getLogger("dfget")
# Final answers about the file itself: going to the origin ourselves would only repeat them.
_FINAL = (OriginNotFound, OriginUnauthorized, OriginForbidden, IntegrityError, LocalDiskError)


def _session(cfg: DownloadConfig) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=64, limit_per_host=16, ttl_dns_cache=60)
    return aiohttp.ClientSession(
        connector=connector, read_bufsize=256 << 10, auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30))


def _throttles(cfg: DownloadConfig) -> tuple[Throttle, ...]:
    # --totallimit is host-wide; applied here to this download as well as to the peer
    # server's uploads (an approximation: two concurrent dfgets each get the full rate).
    return tuple(Throttle(r) for r in (cfg.locallimit, cfg.totallimit) if r > 0)


async def download(cfg: DownloadConfig, stats: Stats) -> None:
    local_tid = taskid.task_id(cfg.url, filter_keys=cfg.filter_keys, md5=cfg.md5,
                               identifier=cfg.identifier)
    stats.task_id = local_tid
    part = PartFile(cfg.output, local_tid)
    throttles = _throttles(cfg)
    try:
        async with _session(cfg) as session:
            if cfg.pattern == "source":
                await _back_to_source(cfg, session, part, stats, throttles, "pattern source")
                return
            reason = await _p2p(cfg, session, part, stats, throttles)
            if reason is not None:
                await _back_to_source(cfg, session, part, stats, throttles, reason)
    finally:
        part.close()


async def _p2p(cfg: DownloadConfig, session: aiohttp.ClientSession, part: PartFile, stats: Stats,
               throttles: tuple[Throttle, ...]) -> str | None:
    """None when P2P completed; otherwise why we should go back to source."""
    peer = PeerLink(None, None)
    if cfg.serve:
        ip = cfg.ip or local_ip_towards(cfg.nodes[0])
        peer = await PeerLink.start(cfg.home, ip, cfg.port, cfg.totallimit, cfg.alivetime, cfg.expiretime)
    p2p = P2PSession(cfg, session, part, stats, peer, FetchLimits(cfg.minrate, throttles))
    try:
        await p2p.run()
        return None
    except SupernodeUnavailable as exc:
        if cfg.notbs:
            raise
        return f"no supernode: {exc.message}"
    except P2PGaveUp as exc:
        if cfg.notbs:
            raise P2PFailed(f"P2P failed: {exc}") from None
        return f"p2p failed: {exc}"
    except _FINAL:
        raise
    except DfError as exc:
        if cfg.notbs:
            raise P2PFailed(f"P2P failed: {exc.code}: {exc.message}") from None
        return f"{exc.code}: {exc.message}"
    finally:
        if p2p.task is not None and not p2p.complete():
            # Bytes the origin is about to rewrite must not be served meanwhile.
            await peer.remove(p2p.task.task_id)
        await peer.close()


async def _back_to_source(cfg: DownloadConfig, session: aiohttp.ClientSession, part: PartFile,
                          stats: Stats, throttles: tuple[Throttle, ...], reason: str) -> None:
    log.warning("downloading from the origin: %s", reason)
    stats.back_to_source = reason
    # P2P bytes may already sit in the part file; the origin rewrites all of it.
    stats.bytes_from_peers = stats.bytes_from_supernode = stats.bytes_resumed = 0

    def on_bytes(n: int) -> None:
        stats.bytes_from_origin += n

    result = await source.download(session, cfg.url, cfg.headers, part, want_md5=cfg.md5 is not None,
                                   throttles=throttles, on_bytes=on_bytes)
    stats.length = result.length
    stats.bytes_from_origin = result.length
    await asyncio.to_thread(part.finish, result.length, cfg.md5, result.md5)
