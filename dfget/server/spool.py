"""Control requests a dfget leaves for a peer server that was still starting when the
download ended (a small file downloads faster than the server starts: waiting for it
was most of the fixed cost of a cold run).

dfget writes its pending requests, in order, to `<home>/spool/<time>-<pid>.json`
(renamed into place whole), then asks the server to replay the spool (POST /spool) if
its control socket accepts a connection. The server replays the spool once its control
socket listens, and again on each POST /spool. Either the server scans after our file
is in place, or our connection reached its socket and the POST makes it scan: no file
is left behind. Replay sends each request to the server's own control socket, so a
spooled request is checked exactly like a live one. Only this user can write the home
(mode 0700), like the socket itself (0600).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import msgspec

log = logging.getLogger("dfget.server.spool")
DIR = "spool"
MAX_FILES = 256  # per replay; more wait for the next one
_lock = asyncio.Lock()  # one replay at a time (the start-up one and a POST may overlap)


class Request(msgspec.Struct, frozen=True, array_like=True):
    method: str
    path: str
    body: str | None


def write(home: Path, requests: list[tuple[str, str, bytes | None]]) -> Path:
    spool = home / DIR
    spool.mkdir(mode=0o700, exist_ok=True)
    name = f"{time.time_ns():020d}-{os.getpid()}.json"
    tmp = spool / f".{name}.tmp"
    tmp.write_bytes(msgspec.json.encode([Request(m, p, b.decode() if b is not None else None)
                                         for m, p, b in requests]))
    os.replace(tmp, spool / name)
    return spool / name


async def replay(home: Path, sock: Path) -> int:
    """Requests replayed; each file is removed once sent (a refused request is logged:
    e.g. the file it names is gone meanwhile)."""
    from ..httpclient import HttpClient

    async with _lock:
        files = sorted(p for p in (home / DIR).glob("*.json")) if (home / DIR).is_dir() else []
        done = 0
        async with HttpClient(unix=str(sock)) as http:
            for path in files[:MAX_FILES]:
                try:
                    reqs = msgspec.json.decode(path.read_bytes(), type=list[Request])
                except (OSError, msgspec.DecodeError) as exc:
                    log.warning("spool %s unreadable, dropped: %s", path.name, exc)
                    reqs = []
                for r in reqs:
                    try:
                        resp = await http.request(r.method, "peer-server", 0, r.path,
                                                  r.body.encode() if r.body is not None else None,
                                                  {"Content-Type": "application/json"}, timeout=5)
                    except (OSError, TimeoutError) as exc:
                        log.warning("spool %s: %s %s: %s", path.name, r.method, r.path, exc)
                        continue
                    if resp.status != 200:
                        log.info("spool %s: %s %s: HTTP %d %s", path.name, r.method, r.path,
                                 resp.status, resp.body[:200])
                    done += 1
                path.unlink(missing_ok=True)
    if done:
        log.info("replayed %d spooled control requests", done)
    return done
