"""A small keep-alive HTTP/1.1 client for dfget's control traffic: the supernode API
(JSON requests of a few KiB) and the peer server's Unix control socket; over TLS when
the caller passes an `ssl.SSLContext` (a supernode with `--cert/--key`).

Why not aiohttp here: importing aiohttp costs dfget ~0.15 s of CPU on every run (its
client alone builds a TLS context at import), which was a third of the fixed cost of a
small download. These calls are small bodies, so asyncio streams do (with TLS too).
aiohttp is still used, and imported only then, to download straight from the origin
(https, redirects, compression, all of HTTP).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import ssl
from dataclasses import dataclass

from common import tls as tlsconf
from common.errors import Signal

HEAD_MAX = 64 << 10
BODY_MAX = 64 << 20  # a digests reply of a huge task is the largest answer we expect
IDLE_MAX = 8  # kept-alive connections per destination


class HttpError(Signal, OSError):
    """The peer spoke something that is not the HTTP we expect (or closed mid-answer)."""


class ConnectError(HttpError):
    """No connection (refused, unreachable, no such socket): nothing was sent."""


class NoAnswer(HttpError):
    """The connection closed before a byte of an answer came. On a fresh plain
    connection that is also what a TLS server does with plain HTTP."""


class TlsFailure(HttpError):
    """TLS with this server cannot work as configured: its certificate is not trusted, it
    does not speak TLS, or it refused our client certificate. Asking again will not help.
    `kind`: common.tls.UNTRUSTED, NOT_TLS, CLIENT_CERT or OTHER."""

    def __init__(self, message: str, kind: str = tlsconf.OTHER) -> None:
        super().__init__(message)
        self.kind = kind


def _tls_failure(exc: BaseException, host: str, port: int) -> TlsFailure:
    return TlsFailure(tlsconf.describe(exc, _where(host, port)), tlsconf.classify(exc))


def os_reason(err: OSError) -> str:
    if err.errno:
        reason = os.strerror(err.errno).lower()
        return reason if err.errno != errno.ECONNREFUSED else "connection refused"
    return str(err) or type(err).__name__


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[str, str]  # lower-case names
    body: bytes


_Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]
# host, port, and the TLS context the connection was verified with: one made with another
# context (other trusted CAs, another client certificate) is not reused
_Key = tuple[str, int, ssl.SSLContext | None]


def _where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class HttpClient:
    """`unix`: every request goes to that Unix socket (the host name is only a label)."""

    def __init__(self, unix: str | None = None) -> None:
        self.unix = unix
        self.idle: dict[_Key, list[_Conn]] = {}
        self.closed = False

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self.closed = True
        conns = [c for lst in self.idle.values() for c in lst]
        self.idle.clear()
        for _r, w in conns:
            w.close()
        for _r, w in conns:
            with contextlib.suppress(Exception):
                await w.wait_closed()

    async def request(self, method: str, host: str, port: int, path: str, body: bytes | None = None,
                      headers: dict[str, str] | None = None, timeout: float = 30.0,
                      tls: ssl.SSLContext | None = None) -> Response:
        """OSError (HttpError included) or TimeoutError when no answer came; TlsFailure
        when TLS (`tls` given) cannot work with this server."""
        async with asyncio.timeout(timeout):
            key = (host, port, tls)
            closed_fresh = 0
            while True:
                conn, reused = await self._connect(key, tls)
                try:
                    resp, keep = await self._exchange(conn, method, host, port, path, body, headers or {})
                except (HttpError, ConnectionError) as exc:
                    conn[1].close()
                    # A kept-alive connection the server closed meanwhile: not an answer,
                    # and nothing was processed (no byte of a response came); ask anew.
                    if reused and isinstance(exc, NoAnswer):
                        continue
                    if tls is not None and not reused and isinstance(exc, (NoAnswer, ConnectionResetError)):
                        # A TLS server that rejects our client certificate (or the lack of
                        # one) closes or resets once its side of the handshake fails: under
                        # TLS 1.3 we see that only after our side of it succeeded, before any
                        # answer. Twice in a row on fresh connections is no accident.
                        closed_fresh += 1
                        if closed_fresh < 2:
                            continue
                        raise TlsFailure(
                            f"{_where(host, port)} closed the TLS connection without answering: it requires "
                            "a client certificate its --client-ca trusts (pass --cert/--key)",
                            tlsconf.CLIENT_CERT) from None
                    raise
                except ssl.SSLError as exc:
                    conn[1].close()
                    raise _tls_failure(exc, host, port) from exc
                except BaseException:
                    conn[1].close()
                    raise
                if keep and not self.closed and len(self.idle.setdefault(key, [])) < IDLE_MAX:
                    self.idle[key].append(conn)
                else:
                    conn[1].close()
                return resp

    async def _connect(self, key: _Key, tls: ssl.SSLContext | None) -> tuple[_Conn, bool]:
        pool = self.idle.get(key, [])
        while pool:
            r, w = pool.pop()
            if not r.at_eof() and not w.is_closing():
                return (r, w), True
            w.close()
        try:
            if self.unix is not None:
                r, w = await asyncio.open_unix_connection(self.unix, limit=HEAD_MAX)
            else:
                r, w = await asyncio.open_connection(key[0], key[1], limit=HEAD_MAX, ssl=tls,
                                                     server_hostname=key[0] if tls is not None else None)
        except ssl.SSLError as exc:
            raise _tls_failure(exc, key[0], key[1]) from exc
        except OSError as exc:
            where = self.unix or _where(key[0], key[1])
            raise ConnectError(f"cannot connect to {where}: {os_reason(exc)}") from exc
        return (r, w), False

    async def _exchange(self, conn: _Conn, method: str, host: str, port: int, path: str,
                        body: bytes | None, headers: dict[str, str]) -> tuple[Response, bool]:
        r, w = conn
        hostport = host if not port else f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"{method} {path} HTTP/1.1", f"Host: {hostport}", "Accept-Encoding: identity",
                 "User-Agent: dfget"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body is not None or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body or b'')}")
        w.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b""))
        try:
            raw = await r.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise NoAnswer("connection closed before an answer") from None
            raise HttpError("connection closed in the response head") from None
        except asyncio.LimitOverrunError:
            raise HttpError("response head too large") from None
        status, hdrs = _parse_head(raw)
        data = await _read_body(r, hdrs, method, status)
        framed = "content-length" in hdrs or "chunked" in hdrs.get("transfer-encoding", "").lower()
        keep = framed and hdrs.get("connection", "").lower() != "close"
        return Response(status, hdrs, data), keep


def _parse_head(raw: bytes) -> tuple[int, dict[str, str]]:
    lines = raw[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not (parts[1].isascii() and parts[1].isdigit()):
        raise HttpError(f"malformed status line {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise HttpError("malformed header line")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers


async def _read_body(r: asyncio.StreamReader, headers: dict[str, str], method: str, status: int) -> bytes:
    if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
        return b""
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(r)
        cl = headers.get("content-length")
        if cl is not None:
            if not (cl.isascii() and cl.isdigit()) or int(cl) > BODY_MAX:
                raise HttpError(f"bad Content-Length {cl[:40]!r}")
            return await r.readexactly(int(cl))
        data = await r.read(BODY_MAX + 1)  # no framing: the body ends with the connection
        rest = data
        while rest and len(data) <= BODY_MAX:
            rest = await r.read(BODY_MAX + 1 - len(data))
            data += rest
        if len(data) > BODY_MAX:
            raise HttpError("response body too large")
        return data
    except asyncio.IncompleteReadError:
        raise HttpError("connection closed in the response body") from None


async def _read_chunked(r: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        line = await r.readuntil(b"\r\n")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HttpError("malformed chunk size") from None
        if size == 0:
            while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                pass
            return bytes(out)
        if len(out) + size > BODY_MAX:
            raise HttpError("response body too large")
        out += await r.readexactly(size)
        await r.readexactly(2)
