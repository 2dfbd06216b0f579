"""A test and benchmark origin: serves DIR at /files/<name>, and misbehaves on request.

    python -m bench.origin --dir DIR [--host 127.0.0.1] [--port 0] [--port-file F] [--rate 100MB]

Plain requests go out with sendfile (>1 GB/s on loopback). Query parameters select a
behaviour per request, so one server covers every test:

  mode=M[,M...]  (also repeatable)
    chunked        no Content-Length, chunked transfer encoding
    eof            no Content-Length, no chunking: the body ends when the connection closes
    short          declares the full Content-Length, sends half, closes
    long[=N]       declares Content-Length, sends N (default 1024) extra bytes after the
                   body, closes. A client that reads exactly Content-Length bytes sees a
                   correct body; the extra bytes are on the wire only.
    fail_after=N   sends N body bytes, then drops the connection
    stall_after=N  sends N body bytes, then sends nothing (until the client goes away)
    status=CODE    answers CODE (200..599) with a short text body
    slow[=RATE]    trickles the body at RATE bytes/s (default 1) for this request
    delay=S        waits S seconds before answering headers
    changing[=K]   the first K requests (default 1) for this name get the file; every
                   later request (GET or HEAD) gets different bytes of the same length
                   (each byte XOR-ed with the version number) and a different ETag and
                   Last-Modified
    norange        ignores Range (answers 200 with the whole body)
    badrange       answers 206 with the right bytes but a Content-Range that is off by one
    novalidators   no ETag and no Last-Modified
  times=K        the failure modes (short, long, fail_after, stall_after, status) apply
                 to the first K requests for this name with this same `mode` value only;
                 later ones are served normally
  etag=VALUE     ETag override (quoted if not already)
  encoding=E     adds Content-Encoding: E and sends the file bytes as they are
  require_header=Name:Value   401 unless the request carries that header (repeatable)
  redirect=URL   302 to URL
  redirects=N    302 to this same URL with redirects=N-1, N times, then serves

Range (one range; invalid or multi-range headers are ignored, as RFC 9110 allows),
If-Range (ETag or Last-Modified; a mismatch answers 200 with the whole body),
If-None-Match and If-Modified-Since (304) are honoured.

GET /_stats -> {"bytes_sent", "requests", "by_file": {name: {"bytes", "requests",
"last_headers"}}}; POST /_stats/reset zeroes it (and the changing/times counters).
`--rate` caps the body bytes of all connections together (one token bucket).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import stat
import sys
from dataclasses import dataclass, field, replace
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode

from aiohttp import web

from common.units import parse_size
from dfget.throttle import Throttle

CHUNK = 256 * 1024
THROTTLED_CHUNK = 64 * 1024
MAX_WAIT = 300.0  # bounds delay= and stall_after=
MAX_REDIRECTS = 1000


# --- counting ---------------------------------------------------------------------------
@dataclass
class FileStats:
    bytes: int = 0
    requests: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Stats:
    bytes_sent: int = 0
    requests: int = 0
    by_file: dict[str, FileStats] = field(default_factory=dict)
    # per-name counters behind mode=changing and times=K
    seen_changing: dict[str, int] = field(default_factory=dict)
    seen_failing: dict[tuple[str, str], int] = field(default_factory=dict)

    def request(self, name: str, headers: dict[str, str]) -> None:
        self.requests += 1
        fs = self.by_file.setdefault(name, FileStats())
        fs.requests += 1
        fs.last_headers = headers

    def sent(self, name: str, n: int) -> None:
        self.bytes_sent += n
        self.by_file.setdefault(name, FileStats()).bytes += n

    def reset(self) -> None:
        self.bytes_sent = self.requests = 0
        self.by_file.clear()
        self.seen_changing.clear()
        self.seen_failing.clear()

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_sent": self.bytes_sent,
            "requests": self.requests,
            "by_file": {
                k: {"bytes": v.bytes, "requests": v.requests, "last_headers": v.last_headers}
                for k, v in self.by_file.items()
            },
        }


# --- modes ------------------------------------------------------------------------------
@dataclass
class Modes:
    chunked: bool = False
    eof: bool = False
    short: bool = False
    long: int = 0
    fail_after: int | None = None
    stall_after: int | None = None
    status: int | None = None
    slow: float | None = None
    delay: float = 0.0
    changing: int | None = None
    norange: bool = False
    badrange: bool = False
    novalidators: bool = False

    def failing(self) -> bool:
        return (self.short or self.long > 0 or self.fail_after is not None
                or self.stall_after is not None or self.status is not None)


_FLAGS = ("chunked", "eof", "short", "norange", "badrange", "novalidators")


def parse_modes(values: list[str]) -> Modes:
    """Raises ValueError on an unknown mode or a bad argument (answered 400)."""
    m = Modes()
    for item in (p.strip() for v in values for p in v.split(",")):
        if not item:
            continue
        key, _, arg = item.partition("=")
        if key in _FLAGS and not arg:
            setattr(m, key, True)
        elif key == "long":
            m.long = int(arg) if arg else 1024
        elif key in ("fail_after", "stall_after"):
            setattr(m, key, _nonneg_int(arg))
        elif key == "status":
            m.status = int(arg)
            if not 200 <= m.status <= 599:
                raise ValueError("status must be 200..599")
        elif key == "slow":
            m.slow = float(arg) if arg else 1.0
        elif key == "delay":
            m.delay = min(float(arg), MAX_WAIT)
        elif key == "changing":
            m.changing = _nonneg_int(arg) if arg else 1
        else:
            raise ValueError(f"unknown mode {item!r}")
    if m.long < 0 or (m.slow is not None and m.slow <= 0) or m.delay < 0:
        raise ValueError("negative or zero argument")
    return m


def _nonneg_int(text: str) -> int:
    n = int(text)
    if n < 0:
        raise ValueError("must not be negative")
    return n


# --- validators, conditionals and ranges -------------------------------------------------
def _quote(etag: str) -> str:
    return etag if etag.startswith(('"', 'W/"')) else f'"{etag}"'


def _etag_list(header: str) -> list[str]:
    return [t.strip().removeprefix("W/") for t in header.split(",") if t.strip()]


def _http_date(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def not_modified(headers: Any, etag: str | None, mtime: int | None) -> bool:
    inm = headers.get("If-None-Match")
    if inm is not None:
        tags = _etag_list(inm)
        return "*" in tags or (etag is not None and etag.removeprefix("W/") in tags)
    ims = _http_date(headers.get("If-Modified-Since"))
    return ims is not None and mtime is not None and mtime <= ims


def if_range_holds(header: str | None, etag: str | None, mtime: int) -> bool:
    if header is None:
        return True
    header = header.strip()
    if header.startswith(('"', "W/")):
        # strong comparison only (RFC 9110 13.1.5)
        return etag is not None and not etag.startswith("W/") and header == etag
    date = _http_date(header)
    return date is not None and int(date) == mtime


def select_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """(start, count), None for the whole body, or "416"."""
    if header is None:
        return None
    spec = header.strip()
    if not spec.startswith("bytes=") or "," in spec:
        return None
    first, sep, last = spec[6:].strip().partition("-")
    if not sep or not (first.isdigit() or first == "") or not (last.isdigit() or last == ""):
        return None
    if first == "":
        if last == "":
            return None
        n = int(last)
        if n == 0 or size == 0:
            return "416"
        start = max(0, size - n)
        return start, size - start
    start = int(first)
    end = int(last) if last else None
    if end is not None and end < start:
        return None
    if start >= size:
        return "416"
    end = size - 1 if end is None else end
    return start, min(end, size - 1) - start + 1


def safe_path(root: Path, name: str) -> Path | None:
    """The regular file `name` inside root, or None (traversal, NUL, symlink out, dir)."""
    if not name or "\x00" in name or "\\" in name or name.startswith("/"):
        return None
    if any(part in ("", ".", "..") for part in name.split("/")):
        return None
    try:
        path = (root / name).resolve(strict=True)
        if not path.is_relative_to(root) or not stat.S_ISREG(path.stat().st_mode):
            return None
    except (OSError, RuntimeError):
        return None
    return path


# --- the application ---------------------------------------------------------------------
ROOT: web.AppKey[Path] = web.AppKey("root", Path)
STATS: web.AppKey[Stats] = web.AppKey("stats", Stats)
THROTTLE: web.AppKey[Throttle] = web.AppKey("throttle", Throttle)

_XOR: dict[int, bytes] = {}


def _xor_table(key: int) -> bytes:
    if key not in _XOR:
        _XOR[key] = bytes(b ^ key for b in range(256))
    return _XOR[key]


def make_app(root: str | os.PathLike[str], *, rate: float = 0.0) -> web.Application:
    app = web.Application()
    app[ROOT] = Path(root).resolve()
    app[STATS] = Stats()
    app[THROTTLE] = Throttle(rate)
    app.router.add_get("/_stats", _get_stats)
    app.router.add_post("/_stats/reset", _reset_stats)
    app.router.add_get("/files/{name:.+}", _serve_file)  # also answers HEAD
    return app


async def _get_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].to_json())


async def _reset_stats(request: web.Request) -> web.Response:
    request.app[STATS].reset()
    return web.json_response({"ok": True})


def _precheck(request: web.Request, name: str) -> web.StreamResponse | None:
    """Answers that come before the file is looked at: auth and redirects."""
    for req in request.query.getall("require_header", []):
        hname, _, value = req.partition(":")
        if request.headers.get(hname.strip()) != value.strip():
            return web.Response(status=401, text=f"missing header {hname.strip()}\n")
    if "redirect" in request.query:
        return web.Response(status=302, headers={"Location": request.query["redirect"]})
    if "redirects" in request.query:
        n = min(int(request.query["redirects"]), MAX_REDIRECTS)
        if n > 0:
            q = [(k, v) for k, v in request.query.items() if k != "redirects"]
            q.append(("redirects", str(n - 1)))
            loc = f"{request.path}?{urlencode(q)}"
            return web.Response(status=302, headers={"Location": loc})
    return None


async def _serve_file(request: web.Request) -> web.StreamResponse:
    app = request.app
    stats = app[STATS]
    name = request.match_info["name"]
    stats.request(name, dict(request.headers))
    path = safe_path(app[ROOT], name)
    if path is None:
        return web.Response(status=404, text="not found\n")
    try:
        modes = parse_modes(request.query.getall("mode", []))
        times = int(request.query["times"]) if "times" in request.query else None
        early = _precheck(request, name)
    except ValueError as exc:
        return web.Response(status=400, text=f"bad query: {exc}\n")
    if early is not None:
        return early
    if modes.delay:
        await asyncio.sleep(modes.delay)
    if modes.failing():
        key = (name, ",".join(request.query.getall("mode", [])))
        seen = stats.seen_failing.get(key, 0)
        stats.seen_failing[key] = seen + 1
        if times is not None and seen >= times:
            modes = replace(modes, short=False, long=0, fail_after=None, stall_after=None,
                            status=None)
    if modes.status is not None:
        return web.Response(status=modes.status, text=f"status {modes.status}\n")
    return await _send_file(request, name, path, modes)


def _validators(request: web.Request, st: os.stat_result, modes: Modes, version: int
                ) -> tuple[str | None, int]:
    etag = f'"{st.st_mtime_ns:x}-{st.st_size:x}' + (f'-v{version}"' if version else '"')
    if "etag" in request.query:
        etag = _quote(request.query["etag"])
    mtime = int(st.st_mtime) + version
    return (None if modes.novalidators else etag), mtime


async def _send_file(request: web.Request, name: str, path: Path, modes: Modes
                     ) -> web.StreamResponse:
    stats = request.app[STATS]
    version = 0
    if modes.changing is not None:
        seen = stats.seen_changing.get(name, 0)
        stats.seen_changing[name] = seen + 1
        version = max(0, seen - modes.changing + 1)
    st = path.stat()
    size = st.st_size
    etag, mtime = _validators(request, st, modes, version)
    headers = {"Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
    if etag is not None:
        headers["ETag"] = etag
    if not modes.novalidators:
        headers["Last-Modified"] = formatdate(mtime, usegmt=True)
    if "encoding" in request.query:
        headers["Content-Encoding"] = request.query["encoding"]
    if not_modified(request.headers, etag, None if modes.novalidators else mtime):
        return web.Response(status=304, headers=headers)

    start, count, status = 0, size, 200
    rng_header = request.headers.get("Range")
    if not modes.norange and if_range_holds(request.headers.get("If-Range"), etag, mtime):
        sel = select_range(rng_header, size)
        if sel == "416":
            headers["Content-Range"] = f"bytes */{size}"
            return web.Response(status=416, headers=headers)
        if isinstance(sel, tuple):
            start, count = sel
            status = 206
            shown = start + (1 if start == 0 else -1) if modes.badrange else start
            headers["Content-Range"] = f"bytes {shown}-{shown + count - 1}/{size}"

    resp = web.StreamResponse(status=status, headers=headers)
    if modes.chunked:
        resp.enable_chunked_encoding()
    elif not modes.eof:
        resp.content_length = count
    if modes.long or modes.short or modes.fail_after is not None or modes.eof:
        resp.force_close()
    if modes.eof:
        return await _send_raw_eof(request, resp, name, path, start, count, version, modes)
    try:
        await resp.prepare(request)
        if request.method != "HEAD":
            await _body(request, resp, name, path, start, count, version, modes)
    except ConnectionError:
        pass  # the client went away; aiohttp's write_eof sees it too and drops quietly
    return resp


async def _send_raw_eof(request: web.Request, resp: web.StreamResponse, name: str, path: Path,
                        start: int, count: int, version: int, modes: Modes) -> web.StreamResponse:
    """HTTP/1.1 response delimited by connection close: aiohttp would chunk, so we write
    the head ourselves, then the body, then close; aiohttp's own attempt then finds a
    closed transport and gives up quietly."""
    transport = request.transport
    if transport is None:
        return resp
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in resp.headers.items()]
    transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        if request.method != "HEAD":
            await _body(request, None, name, path, start, count, version, modes)
    except ConnectionError:
        pass
    transport.close()
    return web.Response()


async def _body(request: web.Request, resp: web.StreamResponse | None, name: str, path: Path,
                start: int, count: int, version: int, modes: Modes) -> None:
    """Send `count` bytes of the file from `start`, as the modes say. `resp` None means
    write straight to the transport (the head is already out)."""
    cut = count
    if modes.short:
        cut = count // 2
    for limit in (modes.fail_after, modes.stall_after):
        if limit is not None:
            cut = min(cut, limit)
    throttle = request.app[THROTTLE]
    transform = _xor_table((version - 1) % 255 + 1) if version else None
    framed = resp if modes.chunked and resp is not None else None
    fobj = await asyncio.to_thread(open, path, "rb", buffering=0)  # tell() = real position
    try:
        sink = _Sink(request, name, fobj, framed, transform)
        if throttle.unlimited and modes.slow is None:
            await sink.send(start, cut)
        else:
            await _paced(sink, throttle, modes.slow, start, cut)
        if modes.stall_after is not None and cut < count:
            await _stall(request)
        elif cut < count:
            _abort(request)
        elif modes.long and request.transport is not None:
            request.app[STATS].sent(name, modes.long)
            request.transport.write(b"X" * modes.long)
            _abort(request)
    finally:
        fobj.close()


async def _paced(sink: _Sink, throttle: Throttle, slow: float | None, start: int, n: int) -> None:
    end = start + n
    step = THROTTLED_CHUNK if slow is None else max(1, min(THROTTLED_CHUNK, int(slow / 20)))
    pos = start
    while pos < end:
        k = min(step, end - pos)
        if not throttle.unlimited:
            await throttle.consume(k)
        await sink.send(pos, k)
        pos += k
        if slow is not None and pos < end:
            await asyncio.sleep(k / slow)


async def _stall(request: web.Request) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + MAX_WAIT
    while loop.time() < deadline:
        transport = request.transport
        if transport is None or transport.is_closing():
            return
        await asyncio.sleep(0.05)
    _abort(request)


def _abort(request: web.Request) -> None:
    # close(), not abort(): the bytes already written must reach the client first
    if request.transport is not None:
        request.transport.close()


class _Sink:
    """Writes file regions: sendfile when the bytes go out unchanged and unframed."""

    def __init__(self, request: web.Request, name: str, fobj: IO[bytes],
                 framed: web.StreamResponse | None, transform: bytes | None) -> None:
        self.request, self.name, self.fobj = request, name, fobj
        self.framed, self.transform = framed, transform
        self.stats = request.app[STATS]

    async def send(self, offset: int, n: int) -> None:
        if n <= 0:
            return
        if self.framed is None and self.transform is None:
            await self._sendfile(offset, n)
            return
        pos, end = offset, offset + n
        while pos < end:
            data = await asyncio.to_thread(_pread, self.fobj, pos, min(CHUNK, end - pos))
            if not data:
                raise ConnectionResetError("file shrank while sending")
            if self.transform is not None:
                data = data.translate(self.transform)
            self.stats.sent(self.name, len(data))  # before: the client may be faster
            try:
                await self._write(data)
            except BaseException:
                self.stats.sent(self.name, -len(data))
                raise
            pos += len(data)

    async def _write(self, data: bytes) -> None:
        if self.framed is not None:
            await self.framed.write(data)
            return
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        transport.write(data)
        await self.request.writer.drain()

    async def _sendfile(self, offset: int, n: int) -> None:
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("connection lost")
        self.fobj.seek(offset)
        # counted before sending: the client may have every byte before we resume here
        self.stats.sent(self.name, n)
        try:
            await asyncio.get_running_loop().sendfile(transport, self.fobj, offset, n)
        except BaseException:
            # asyncio leaves the file position after the last byte actually sent
            self.stats.sent(self.name, max(0, self.fobj.tell() - offset) - n)
            raise


def _pread(fobj: IO[bytes], offset: int, n: int) -> bytes:
    return os.pread(fobj.fileno(), n, offset)


# --- running it ---------------------------------------------------------------------------
def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class OriginServer:
    """In-process origin for pytest: `async with OriginServer(dir) as o: o.url("f")`."""

    def __init__(self, root: str | os.PathLike[str], *, rate: float = 0.0,
                 host: str = "127.0.0.1", port: int = 0) -> None:
        self.app = make_app(root, rate=rate)
        self.root = self.app[ROOT]
        self.host, self.port = host, port
        self._runner: web.AppRunner | None = None

    @property
    def stats(self) -> Stats:
        return self.app[STATS]

    @property
    def base(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def url(self, name: str, **query: str | int | float) -> str:
        qs = urlencode({k: str(v) for k, v in query.items()})
        return f"{self.base}/files/{name}" + (f"?{qs}" if qs else "")

    async def start(self) -> None:
        sock = bind(self.host, self.port)
        self.port = sock.getsockname()[1]
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=1.0)
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
        except BaseException:
            sock.close()
            await self.stop()
            raise

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> OriginServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _write_port_file(path: str, port: int) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"{port}\n")
    os.replace(tmp, path)  # readers never see a half-written number


async def _serve(args: argparse.Namespace) -> None:
    server = OriginServer(args.dir, rate=args.rate, host=args.host, port=args.port)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if args.port_file:
            _write_port_file(args.port_file, server.port)
        print(f"origin: serving {server.root} on {server.base} rate={args.rate or 'unlimited'}",
              flush=True)
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.origin", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="directory to serve at /files/")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--port-file", help="write the bound port here once listening")
    p.add_argument("--rate", type=parse_size, default=0,
                   help="total body bytes/s for all connections (e.g. 100MB); 0 = unlimited")
    args = p.parse_args(argv)
    if not Path(args.dir).is_dir():
        p.error(f"not a directory: {args.dir}")
    asyncio.run(_serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
