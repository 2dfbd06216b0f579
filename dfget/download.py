"""One dfget run: P2P through the supernodes, or back to source when that cannot work.

Decides *whether* to go back to source; `p2p.P2PSession` and `source.download` do the
transfers. Origin refusals (404/401/403) are final: the origin is not asked again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING

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
    TlsError,
    UnknownDigest,
)
from common.wire import BackToSourceReason

from .config import DownloadConfig, local_ip_towards
from .httpclient import HttpClient
from .notices import notice
from .output import PartFile, disk_errors
from .p2p import P2PGaveUp, P2PSession
from .peerlink import PeerLink
from .piecefetch import FetchLimits
from .progress import Stats
from .server.jobs import DownloadInvalidated
from .stream import RangeOutsideFile, Want
from .throttle import Throttle

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("dfget")
# Final answers about the file itself: going to the origin ourselves would only repeat them.
# A supernode TLS cannot work with answers all the same: the user must fix a flag.
_FINAL = (OriginNotFound, OriginUnauthorized, OriginForbidden, IntegrityError, LocalDiskError, TlsError,
          RangeOutsideFile, DownloadInvalidated, UnknownDigest)


def _session(cfg: DownloadConfig) -> aiohttp.ClientSession:
    """Only to go to the origin: importing aiohttp is a good part of a small download's cost."""
    import aiohttp

    # an https origin is verified against the system CAs plus --cacert
    ssl = cfg.tls.context() if cfg.tls.cacert or cfg.tls.cert else True
    connector = aiohttp.TCPConnector(limit=64, limit_per_host=16, ttl_dns_cache=60, ssl=ssl)
    return aiohttp.ClientSession(
        connector=connector, read_bufsize=256 << 10, auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30))


def _output_dir(cfg: DownloadConfig) -> None:
    """Like curl and wget, a missing directory in -o is an error, not created behind the
    user's back (a typo would scatter files), unless --create-dirs asks for it."""
    parent = cfg.output.parent
    if parent.is_dir():
        return
    if not cfg.create_dirs:
        what = "is not a directory" if parent.exists() else "does not exist"
        raise LocalDiskError(f"output directory {parent} {what} (pass --create-dirs to create it)")
    with disk_errors(f"cannot create {parent}"):
        parent.mkdir(parents=True, exist_ok=True)


def _throttles(cfg: DownloadConfig) -> tuple[Throttle, ...]:
    # --totallimit is host-wide; applied here to this download as well as to the peer
    # server's uploads (an approximation: two concurrent dfgets each get the full rate).
    return tuple(Throttle(r) for r in (cfg.locallimit, cfg.totallimit) if r > 0)


async def download(cfg: DownloadConfig, stats: Stats, want: Want | None = None) -> None:
    """`want`: only the pieces covering --range are needed (dfget/stream.py)."""
    local_tid = taskid.task_id(cfg.url, filter_keys=cfg.filter_keys, md5=cfg.md5,
                               identifier=cfg.identifier)
    stats.task_id = local_tid
    await asyncio.to_thread(_output_dir, cfg)
    part = PartFile(cfg.output, local_tid)
    throttles = _throttles(cfg)
    try:
        reason = "pattern source"
        if cfg.pattern != "source":
            async with HttpClient() as http:
                why = await _p2p(cfg, http, part, stats, throttles, want)
            if why is None:
                return
            reason = why[1]
        async with _session(cfg) as session:
            await _back_to_source(cfg, session, part, stats, throttles, reason)
    except (IntegrityError, UnknownDigest):
        # bytes that are not the file asked for (or no file at all): nothing to resume
        await asyncio.to_thread(part.discard)
        raise
    finally:
        part.close()


async def _p2p(cfg: DownloadConfig, http: HttpClient, part: PartFile, stats: Stats,
               throttles: tuple[Throttle, ...], want: Want | None = None) -> tuple[BackToSourceReason, str] | None:
    """None when P2P completed; otherwise why we should go back to source (the metric
    label and the text)."""
    peer = PeerLink(None, None)
    if cfg.serve:
        ip = cfg.ip or local_ip_towards(cfg.nodes[0])
        peer = await PeerLink.start(cfg.home, ip, cfg.port, cfg.totallimit, cfg.alivetime, cfg.expiretime,
                                    tls=cfg.server_tls, cacert=cfg.tls.cacert)
    p2p = P2PSession(cfg, http, part, stats, peer, FetchLimits(cfg.minrate, throttles, cfg.tls), want)
    why: tuple[BackToSourceReason, str] | None = None
    try:
        await p2p.run()
        return None
    except SupernodeUnavailable as exc:
        if cfg.notbs:
            raise
        why = ("no_supernode", f"no supernode: {exc.message}")
    except P2PGaveUp as exc:
        if cfg.notbs:
            raise P2PFailed(f"P2P failed: {exc}") from None
        why = ("p2p_failed", f"p2p failed: {exc}")
    except _FINAL:
        raise
    except DfError as exc:
        if cfg.notbs:
            raise P2PFailed(f"P2P failed: {exc.code}: {exc.message}") from None
        why = ("error", f"{exc.code}: {exc.message}")
    finally:
        # The supernode releases what we had in flight, and counts a back-to-source.
        await p2p.leave(why[0] if why else None)
        if p2p.task is not None and not p2p.complete():
            # Bytes the origin is about to rewrite must not be served meanwhile.
            await peer.remove(p2p.task.task_id)
        if why is not None:
            await peer.back_to_source(why[0])
        await peer.close()
    return why


async def _back_to_source(cfg: DownloadConfig, session: aiohttp.ClientSession, part: PartFile,
                          stats: Stats, throttles: tuple[Throttle, ...], reason: str) -> None:
    # Always said, whatever the log level: an origin serving a whole swarm is what this
    # system exists to prevent, and must never happen silently (unless asked for: -p source).
    if cfg.pattern != "source":
        notice(f"downloading from the origin: {reason}", back_to_source=reason)
    stats.back_to_source = reason
    # P2P bytes may already sit in the part file; the origin rewrites all of it.
    stats.bytes_from_peers = stats.bytes_from_supernode = stats.bytes_resumed = 0

    def on_bytes(n: int) -> None:
        stats.bytes_from_origin += n

    from . import source  # with aiohttp: only when the origin is asked

    result = await source.download(session, cfg.url, cfg.headers, part, want_md5=cfg.md5 is not None,
                                   throttles=throttles, on_bytes=on_bytes)
    stats.length = result.length
    stats.bytes_from_origin = result.length
    await asyncio.to_thread(functools.partial(part.finish, result.length, cfg.md5, result.md5,
                                              sha256=cfg.digest.split(":", 1)[1] if cfg.digest else None))
