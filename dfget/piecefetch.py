"""Fetch one piece: GET with Range from the assigned source, stream it to disk at its
offset while hashing, and verify the digest the supernode gave.

Two ways to receive, the same checks and failure reasons:
- plain HTTP without a rate cap (the common case): one worker thread per piece in flight
  (up to 256 a process: more go the other way) reads a blocking socket a whole CHUNK per
  recv (MSG_WAITALL) and hashes and writes each buffer itself; one CHUNK of memory per
  thread (`_fetch_threaded`);
- TLS sources and rate-capped downloads: the event loop receives into two CHUNK buffers
  per piece while a worker thread hashes and writes the other (`_fetch`, piecewire).
The piece counts as present only after `digest.matches`; until then its bytes on disk
mean nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import random
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from common import digest
from common import tls as tlsconf
from common.errors import Signal
from common.hostport import hostport
from common.ranges import RangeSyntaxError, parse_content_range
from common.tokenheaders import CLIENT_HEADER, SOURCE_HEADER, TOKEN_HEADER
from common.wire import Assignment

from .output import PartFile
from .piecewire import BlockingPiece, Head, PieceProtocol, WireError, dechunk, open_piece, request
from .throttle import Throttle

log = logging.getLogger("dfget.piece")
CHUNK = 1 << 20  # bytes handed to a worker thread at once
STALL = 30.0  # seconds without a buffer filled: the source stalled
BUSY_RETRIES = 4  # a source answering 503/429 is asked again this many times...
BUSY_DELAY = 0.05  # ...after this, doubling (jittered): about 0.75 s in all
CONNECT_TIMEOUT = 5.0  # an unreachable peer (SYNs dropped) fails fast as "refused"


class PieceFailed(Signal):
    """The piece could not be fetched from this source; `reason` is a wire FailReason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class FetchLimits:
    minrate: int  # bytes/s; the piece deadline is len/minrate + 10 s
    throttles: tuple[Throttle, ...] = ()
    tls: tlsconf.ClientTls = field(default_factory=tlsconf.ClientTls)  # for sources that serve over TLS (Source.tls)

    def deadline(self, nbytes: int) -> float:
        return nbytes / max(self.minrate, 1) + 10.0


def piece_url(task_id: str, a: Assignment) -> str:
    scheme = "https" if a.source.tls else "http"
    return f"{scheme}://{hostport(a.source.ip, a.source.port)}/peer/file/{task_id}"


def _write_and_hash(part: PartFile, hasher: Any, offset: int, data: memoryview) -> None:
    hasher.update(data)  # hashlib and pwrite release the GIL: the loop keeps receiving
    part.write(offset, data)


def auth_headers(a: Assignment, client: str | None) -> str:
    """The piece token's header lines (none when the supernode gave no token). Both values
    were validated by the wire schema (base64url and hex), so they cannot break the head."""
    source = f"{SOURCE_HEADER}: {a.source.cid}\r\n" if a.source.kind == "peer" and a.source.cid else ""
    if a.token is None:
        return source
    return f"{TOKEN_HEADER}: {a.token}\r\n" + (f"{CLIENT_HEADER}: {client}\r\n" if client else "") + source


async def fetch_piece(session: object | None, task_id: str, a: Assignment,
                      part: PartFile, limits: FetchLimits, client: str | None = None,
                      algo: str = digest.LEGACY) -> int:
    """Returns the number of bytes of the verified piece; raises PieceFailed. Logs one
    line per transfer at debug level (piece, source, bytes, ms, result). `client` is our
    cid, sent with the piece token; `algo` the task's piece digest."""
    if not log.isEnabledFor(logging.DEBUG):
        return await _fetch_piece(session, task_id, a, part, limits, client, algo)
    t0 = time.perf_counter()
    try:
        n = await _fetch_piece(session, task_id, a, part, limits, client, algo)
    except PieceFailed as exc:
        _log_transfer(task_id, a, 0, t0, exc.reason)
        raise
    except asyncio.CancelledError:
        _log_transfer(task_id, a, 0, t0, "cancelled")
        raise
    _log_transfer(task_id, a, n, t0, "ok")
    return n


def _log_transfer(task_id: str, a: Assignment, nbytes: int, t0: float, result: str) -> None:
    ms = (time.perf_counter() - t0) * 1000
    source = f"{a.source.kind} {a.source.ip}:{a.source.port}"
    log.debug("piece %d from %s: %s, %d bytes in %.1f ms", a.piece, source, result, nbytes, ms,
              extra={"task": task_id[:16], "piece": a.piece, "source": source,
                     "source_id": a.source.cid, "bytes": nbytes, "ms": round(ms, 1),
                     "result": result})


async def _fetch_piece(session: object | None, task_id: str, a: Assignment,
                       part: PartFile, limits: FetchLimits, client: str | None, algo: str) -> int:
    expected = a.end - a.start + 1
    try:
        async with asyncio.timeout(limits.deadline(expected)):
            for attempt in range(BUSY_RETRIES + 1):
                try:
                    if threaded(a, limits) and WORKERS.take():
                        try:
                            return await _fetch_threaded(task_id, a, part, expected, auth_headers(a, client), algo)
                        finally:
                            WORKERS.give()
                    return await _fetch(session, task_id, a, part, limits, expected, auth_headers(a, client), algo)
                except _Busy as exc:
                    if attempt == BUSY_RETRIES:
                        raise PieceFailed("refused", f"source busy (HTTP {exc.status})") from None
                # Its upload slots are full for a moment (they are per server, the
                # supernode's caps per task): a failure would put a good peer on our
                # blacklist and send us to the seed, so ask it again shortly.
                await asyncio.sleep(BUSY_DELAY * 2 ** attempt * random.uniform(0.5, 1.5))
            raise AssertionError("unreachable")
    except TimeoutError:
        raise PieceFailed("timeout", f"piece {a.piece} not received in time") from None
    except _Refused as exc:
        where = hostport(a.source.ip, a.source.port)
        if tlsconf.is_tls_error(exc):
            raise PieceFailed("refused", tlsconf.describe(exc.__cause__ or exc, where)) from None
        raise PieceFailed("refused", f"cannot connect to {where}: {exc.__cause__}") from None
    except WireError as exc:
        raise PieceFailed(exc.reason, str(exc)) from None
    except OSError as exc:
        raise PieceFailed("error", f"{type(exc).__name__}: {exc}") from None


class _Refused(Signal):
    pass


class _Busy(Signal):
    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


async def _fetch(session: object | None, task_id: str, a: Assignment, part: PartFile,
                 limits: FetchLimits, expected: int, extra: str = "", algo: str = digest.LEGACY) -> int:
    """`session` is unused: pieces go over their own connection (see piecewire)."""
    path = f"/peer/file/{task_id}"
    async with asyncio.timeout(STALL) as stall:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                proto, transport = await open_piece(a.source.ip, a.source.port, path, a.start, a.end,
                                                    CHUNK, expected, extra,
                                                    tls=limits.tls.context() if a.source.tls else None)
        except (OSError, TimeoutError) as exc:
            raise _Refused() from exc
        try:
            _check_head(await proto.head, a, expected)
            hasher = digest.new(algo)
            if proto.head.result().chunked:
                received = await _dechunked(proto, a, part, hasher, expected)
            else:
                received = await _stream(proto, a, part, limits, hasher, stall)
        finally:
            transport.abort()
            proto.recycle()
    if received < expected:
        raise PieceFailed("short_body", f"got {received} of {expected} bytes")
    if not digest.matches(a.digest, hasher.hexdigest()):
        raise PieceFailed("digest_mismatch", f"piece {a.piece} from {a.source.ip}:{a.source.port}")
    return received


def _check_head(resp: Head, a: Assignment, expected: int) -> None:
    if resp.status == 404:
        raise PieceFailed("not_found", "source does not hold the piece")
    if resp.status in (429, 503):
        raise _Busy(resp.status)
    if resp.status in (401, 403):
        raise PieceFailed("refused", f"source refused the piece token (HTTP {resp.status})")
    if resp.status != 206:
        raise PieceFailed("error", f"unexpected HTTP {resp.status}")
    declared = resp.content_length
    if declared is not None and declared > expected:
        raise PieceFailed("long_body", f"declared {declared} bytes, piece has {expected}")
    if declared is not None and declared < expected:
        raise PieceFailed("short_body", f"declared {declared} bytes, piece has {expected}")
    cr = resp.headers.get("content-range")
    if cr is not None:
        try:
            start, end, _ = parse_content_range(cr)
        except RangeSyntaxError:
            raise PieceFailed("error", "malformed Content-Range") from None
        if (start, end) != (a.start, a.end):
            raise PieceFailed("error", f"Content-Range {cr!r} is not the piece asked for")


async def _stream(proto: PieceProtocol, a: Assignment, part: PartFile, limits: FetchLimits,
                  hasher: Any, stall: asyncio.Timeout) -> int:
    """Hash and write each filled buffer in a worker thread while the socket fills the
    other; the protocol stops reading past the piece (long body)."""
    loop = asyncio.get_running_loop()
    offset = a.start
    while (block := await proto.next_block()) is not None:
        buf, n = block
        try:
            for t in limits.throttles:
                await t.consume(n)
            stall.reschedule(loop.time() + STALL)
            # Awaited to the end even if we are cancelled meanwhile: the caller relies on
            # "no writes in flight" once we return or raise.
            work = asyncio.ensure_future(asyncio.to_thread(_write_and_hash, part, hasher, offset, memoryview(buf)[:n]))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait([work])
                if not work.cancelled():
                    work.exception()  # retrieved: a failed write (disk full) is not "never retrieved"
                raise
        finally:
            proto.release(buf)
        offset += n
    return offset - a.start


# --- plain HTTP without a rate cap: the whole piece in one worker thread ------------------
def threaded(a: Assignment, limits: FetchLimits) -> bool:
    """Whether the piece may go through a worker thread's blocking socket: plain HTTP
    and no rate cap (a TLS source and a throttled download stay on the loop)."""
    return not a.source.tls and not limits.throttles


class _Workers:
    """At most `size` pieces of this process in worker threads at once, each with its
    thread ready (threads are started as needed and kept): a piece finding them all busy
    goes through the event loop instead of waiting for one, as a queue would spend the
    waiting pieces' deadlines on pieces from slow peers. A worker holds one CHUNK buffer,
    half of what a piece costs on the loop (two), and a thread blocked in recv costs no
    CPU: `size` covers a dfdaemon's default 64 downloads x 4 pieces at once."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.busy = 0
        self.lock = threading.Lock()
        self.pool: concurrent.futures.ThreadPoolExecutor | None = None

    def take(self) -> bool:
        with self.lock:
            if self.busy >= self.size:
                return False
            self.busy += 1
            if self.pool is None:
                self.pool = concurrent.futures.ThreadPoolExecutor(self.size, thread_name_prefix="piece")
            return True

    def give(self) -> None:
        with self.lock:
            self.busy -= 1


WORKERS = _Workers(256)
_BUF = threading.local()  # each worker's receive buffer, reused: no page faults per piece


class _Abort:
    """The loop's handle on a piece read in a worker thread: abort() ends it (a
    cancelled fetch: deadline, failover, shutdown) however it is blocked."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.reader: BlockingPiece | None = None
        self.aborted = False

    def attach(self, reader: BlockingPiece) -> None:
        with self.lock:
            self.reader = reader
            if self.aborted:
                reader.abort()

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            if self.reader is not None:
                self.reader.abort()


async def _fetch_threaded(task_id: str, a: Assignment, part: PartFile, expected: int, extra: str,
                          algo: str) -> int:
    """The piece received, hashed and written by one worker thread on a blocking socket.
    On the loop, one piece from a fast source cost a callback per recv (~64-256 KiB)
    and a hand-off per buffer; here a buffer costs three system calls and no Python in
    between (recv with MSG_WAITALL, the hash and pwrite release the GIL). TLS sources
    and rate-capped downloads keep the asyncio path (`_fetch`)."""
    box = _Abort()
    assert WORKERS.pool is not None  # a slot was taken (WORKERS.take)
    fut = asyncio.get_running_loop().run_in_executor(
        WORKERS.pool, _fetch_blocking, task_id, a, part, expected, extra, algo, box)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        # the caller relies on "no writes in flight" once we return or raise
        box.abort()
        await asyncio.wait([fut])
        if not fut.cancelled():
            fut.exception()  # retrieved: its error is moot now
        raise


def _fetch_blocking(task_id: str, a: Assignment, part: PartFile, expected: int, extra: str, algo: str,
                    box: _Abort) -> int:
    stall = STALL  # read at call time (tests shorten it)
    try:
        sock = _connect(a.source.ip, a.source.port, CONNECT_TIMEOUT)
    except OSError as exc:
        raise _Refused() from exc
    with sock:
        sock.settimeout(None)
        reader = BlockingPiece(sock, stall)
        box.attach(reader)
        if box.aborted:
            raise OSError("piece fetch aborted")
        sock.sendall(request(a.source.ip, a.source.port, f"/peer/file/{task_id}", a.start, a.end, extra))
        head = reader.head()
        _check_head(head, a, expected)
        hasher = digest.new(algo)
        if head.chunked:
            received = _dechunk_blocking(reader, a, part, hasher, expected)
        else:
            received = _body_blocking(reader, a, part, hasher, expected)
    if received < expected:
        raise PieceFailed("short_body", f"got {received} of {expected} bytes")
    if not digest.matches(a.digest, hasher.hexdigest()):
        raise PieceFailed("digest_mismatch", f"piece {a.piece} from {a.source.ip}:{a.source.port}")
    return received


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    return socket.create_connection((host, port), timeout=timeout)


def _body_blocking(reader: BlockingPiece, a: Assignment, part: PartFile, hasher: Any, expected: int) -> int:
    buf = getattr(_BUF, "buf", None)
    if buf is None:
        buf = _BUF.buf = bytearray(CHUNK)
    view = memoryview(buf)
    got = 0
    while got < expected:
        want = min(CHUNK, expected - got)
        n = reader.fill(view[:want])
        if n:
            hasher.update(view[:n])
            part.write(a.start + got, view[:n])
            got += n
        if n < want:
            break  # the stream ended early
    if got == expected and reader.fill(view[:1]):
        # Connection: close was asked for: past the piece comes the end of the stream
        raise WireError("long_body", f"more than {expected} body bytes")
    return got


def _dechunk_blocking(reader: BlockingPiece, a: Assignment, part: PartFile, hasher: Any, expected: int) -> int:
    limit = expected * 2 + 65536  # framing bytes come on top of the body
    raw = bytearray()
    chunk = memoryview(bytearray(65536))
    while n := reader.fill(chunk):
        raw += chunk[:n]
        if len(raw) > limit:
            raise WireError("long_body", f"more than {limit} body bytes")
    body = dechunk(bytes(raw))
    if len(body) > expected:
        raise PieceFailed("long_body", f"more than {expected} bytes")
    hasher.update(body)
    part.write(a.start, body)
    return len(body)


async def _dechunked(proto: PieceProtocol, a: Assignment, part: PartFile, hasher: Any, expected: int) -> int:
    raw = bytearray()
    while (block := await proto.next_block()) is not None:
        raw += memoryview(block[0])[:block[1]]
        proto.release(block[0])
    body = dechunk(bytes(raw))
    if len(body) > expected:
        raise PieceFailed("long_body", f"more than {expected} bytes")
    await asyncio.to_thread(_write_and_hash, part, hasher, a.start, memoryview(body))
    return len(body)
