"""The wire side of a piece download: one HTTP/1.1 GET on its own connection, the body
received straight into preallocated buffers (`recv_into`, no per-recv `bytes`).

Why not aiohttp here: on a fast source the event loop was the bottleneck, and most of its
time went to copying each recv'd block once more in the HTTP parser and allocating it.
A piece response is the simplest HTTP there is (206, Content-Length, then the bytes), so
this reads it with an `asyncio.BufferedProtocol`: each filled buffer goes to the consumer
(hash + pwrite in a worker thread) while the socket fills the other one; with both busy,
reading pauses (backpressure, so memory is two buffers per piece in flight).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import socket
import ssl
import struct
import time
from dataclasses import dataclass

from common.errors import Signal

HEAD_MAX = 16 << 10
_FRAMING = ("content-length", "transfer-encoding")
POOL_MAX = 16
BUFFERS = 2  # per connection: one being filled while the others are hashed and written
# Buffers are reused across pieces: a fresh bytearray costs page faults on every byte.
_pool: list[bytearray] = []


def _take(size: int) -> bytearray:
    while _pool:
        buf = _pool.pop()
        if len(buf) == size:
            return buf
    return bytearray(size)


def _give(buf: bytearray) -> None:
    if len(_pool) < POOL_MAX:
        _pool.append(buf)


class WireError(Signal):
    """`reason` is a wire FailReason (short_body, long_body, error)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Head:
    status: int
    headers: dict[str, str]  # lower-case names

    @property
    def content_length(self) -> int | None:
        v = self.headers.get("content-length")
        return int(v) if v is not None else None  # checked by parse_head

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()  # isdigit alone accepts '²' (latin-1)


def parse_head(raw: bytes) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or len(parts[1]) != 3 or not _digits(parts[1]):
        raise WireError("error", f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise WireError("error", "malformed header line")
        name, value = name.strip().lower(), value.strip()
        if name in _FRAMING and headers.get(name, value) != value:
            raise WireError("error", f"conflicting {name} headers")  # which one frames the body?
        headers[name] = value
    cl = headers.get("content-length")
    if cl is not None and not _digits(cl):
        raise WireError("error", f"malformed Content-Length {cl[:40]!r}")
    return Head(int(parts[1]), headers)


class PieceProtocol(asyncio.BufferedProtocol):
    def __init__(self, bufsize: int, limit: int) -> None:
        self.limit = limit  # body bytes beyond this are a long body (read no further)
        self.head_buf = bytearray(HEAD_MAX)
        self.head_len = 0
        self.head: asyncio.Future[Head] = asyncio.get_running_loop().create_future()
        self.free = [_take(bufsize) for _ in range(BUFFERS)]
        self.cur: bytearray | None = None
        self.pos = 0
        self.received = 0
        self.full: collections.deque[tuple[bytearray, int]] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.done = False
        self.error: BaseException | None = None
        self.transport: asyncio.Transport | None = None
        self.paused = False

    # --- transport side ---------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if not self.head.done():
            return memoryview(self.head_buf)[self.head_len:]
        if self.cur is None:
            self.cur, self.pos = self.free.pop(), 0
        return memoryview(self.cur)[self.pos:]

    def buffer_updated(self, nbytes: int) -> None:
        if not self.head.done():
            self._head_bytes(nbytes)
            return
        self.pos += nbytes
        self.received += nbytes
        self._body_progress()

    def _head_bytes(self, nbytes: int) -> None:
        self.head_len += nbytes
        end = self.head_buf.find(b"\r\n\r\n", 0, self.head_len)
        if end < 0:
            if self.head_len >= HEAD_MAX:
                self._fail(WireError("error", "response head too large"))
            return
        try:
            head = parse_head(bytes(self.head_buf[:end]))
        except WireError as exc:
            self._fail(exc)
            return
        if head.chunked:  # framing bytes come on top of the body
            self.limit = self.limit * 2 + 65536
        self.head.set_result(head)
        rest = self.head_buf[end + 4:self.head_len]
        self.head_buf = bytearray()
        if rest:
            self.cur, self.pos = self.free.pop(), len(rest)
            self.cur[:len(rest)] = rest
            self.received = len(rest)
            self._body_progress()

    def _body_progress(self) -> None:
        assert self.cur is not None
        if self.received > self.limit:
            self._fail(WireError("long_body", f"more than {self.limit} body bytes"))
            return
        if self.pos == len(self.cur) or self.received == self.limit:
            self._hand_over()

    def _hand_over(self) -> None:
        if self.cur is not None and self.pos:
            self.full.append((self.cur, self.pos))
            self.cur = None
            self._wake()
        if not self.free and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._finish(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(WireError("short_body", f"connection lost: {exc}") if exc else None)

    def _finish(self, exc: BaseException | None) -> None:
        if self.done:
            return
        if not self.head.done():
            self.head.set_exception(exc or WireError("short_body", "connection closed before the response head"))
            self.head.exception()  # retrieved here if nobody awaits it any more
        self._hand_over()
        self.done = True
        if exc is not None and self.error is None:
            self.error = exc
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        self._finish(exc)
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    # --- consumer side --------------------------------------------------------------
    async def next_block(self) -> tuple[bytearray, int] | None:
        """The next filled buffer (give it back with `release`), or None at the end."""
        while not self.full:
            if self.error is not None:
                raise self.error
            if self.done:
                return None
            self.waiter = asyncio.get_running_loop().create_future()
            await self.waiter
        return self.full.popleft()

    def recycle(self) -> None:
        """Once the transport is closed: hand every buffer back to the pool."""
        for buf in self.free:
            _give(buf)
        for buf, _n in self.full:
            _give(buf)
        if self.cur is not None:
            _give(self.cur)
        self.free, self.cur = [], None
        self.full.clear()

    def release(self, buf: bytearray) -> None:
        self.free.append(buf)
        if self.paused and self.transport is not None and not self.done:
            self.paused = False
            self.transport.resume_reading()


def request(host: str, port: int, path: str, first: int, last: int, extra: str) -> bytes:
    """The GET of one piece. `extra`: more header lines, each ending in CRLF (checked
    values only: the piece token and client id)."""
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (f"GET {path} HTTP/1.1\r\nHost: {hostport}\r\nRange: bytes={first}-{last}\r\n{extra}"
            "Accept-Encoding: identity\r\nConnection: close\r\nUser-Agent: dfget\r\n\r\n").encode("latin-1")


async def open_piece(host: str, port: int, path: str, first: int, last: int,
                     bufsize: int, limit: int, extra: str = "",
                     tls: ssl.SSLContext | None = None) -> tuple[PieceProtocol, asyncio.Transport]:
    """`tls`: the source serves over TLS (asyncio's TLS transport hands the decrypted
    bytes to the same buffers)."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_connection(lambda: PieceProtocol(bufsize, limit), host, port, ssl=tls,
                                                    server_hostname=host if tls is not None else None)
    transport.write(request(host, port, path, first, last, extra))
    return proto, transport  # type: ignore[return-value]


# --- the same GET on a blocking socket, in a worker thread ------------------------------
class BlockingPiece:
    """One piece's response read on a blocking socket by the thread that hashes and
    writes it (dfget/piecefetch.py `_fetch_blocking`): no event-loop callback per recv,
    and `MSG_WAITALL` fills a whole buffer per system call. `stall` bounds every wait
    for bytes (SO_RCVTIMEO) as the loop's STALL timer does for the asyncio path;
    `abort()` (from the loop's thread) ends a blocked read at once."""

    def __init__(self, sock: socket.socket, stall: float) -> None:
        self.sock = sock
        self.stall = stall
        secs = max(stall, 0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(secs), int((secs % 1) * 1_000_000)))
        self.rest = b""  # body bytes that came with the head

    def _recv_into(self, view: memoryview, flags: int = 0) -> int:
        try:
            return self.sock.recv_into(view, len(view), flags)
        except BlockingIOError:  # SO_RCVTIMEO ran out: nothing arrived for `stall`
            raise TimeoutError("source stalled") from None

    def head(self) -> Head:
        """Read and parse the response head (within `stall` as a whole, however slowly
        it trickles in)."""
        deadline = time.monotonic() + self.stall
        buf = bytearray(HEAD_MAX)
        view, got = memoryview(buf), 0
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError("response head not received in time")
            n = self._recv_into(view[got:])
            if n == 0:
                raise WireError("short_body", "connection closed before the response head")
            got += n
            end = buf.find(b"\r\n\r\n", 0, got)
            if end >= 0:
                self.rest = bytes(buf[end + 4:got])
                return parse_head(bytes(buf[:end]))
            if got >= HEAD_MAX:
                raise WireError("error", "response head too large")

    def fill(self, view: memoryview) -> int:
        """Fill `view` with body bytes; fewer only at the end of the stream. A buffer
        that does not fill within `stall` of its first wait is a stalled source."""
        got = 0
        if self.rest:
            got = min(len(self.rest), len(view))
            view[:got] = self.rest[:got]
            self.rest = self.rest[got:]
        deadline = time.monotonic() + self.stall
        while got < len(view):
            n = self._recv_into(view[got:], socket.MSG_WAITALL)
            if n == 0:
                break
            got += n
            if got < len(view) and time.monotonic() > deadline:
                raise TimeoutError("source stalled")
        return got

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def dechunk(raw: bytes) -> bytes:
    """Decode a chunked body (the rare path: our sources send Content-Length)."""
    out = bytearray()
    pos = 0
    while True:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            raise WireError("short_body", "chunked body cut short")
        try:
            size = int(raw[pos:eol].split(b";", 1)[0], 16)
        except ValueError:
            raise WireError("error", "malformed chunk size") from None
        pos = eol + 2
        if size == 0:
            return bytes(out)
        if pos + size > len(raw):
            raise WireError("short_body", "chunked body cut short")
        out += raw[pos:pos + size]
        pos += size + 2
