"""The listening socket's first look at each connection: CONNECT requests are tunnelled
here, byte for byte (no TLS interception); every other connection is handed, with the
bytes already read, to aiohttp's HTTP protocol. aiohttp's router cannot take CONNECT's
authority-form target, and its parser would read the tunnelled bytes as HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("dfdaemon")
MAX_HEAD = 16 << 10
HEAD_TIMEOUT = 20.0

# tunnel(target "host:port", head bytes) -> (reader, writer) of the far end, or an error
Opener = Callable[[str], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


class Front(asyncio.Protocol):
    def __init__(self, http_factory: Callable[[], asyncio.Protocol], opener: Opener,
                 on_tunnel: Callable[[str, int], None] | None = None) -> None:
        self.http_factory = http_factory
        self.opener = opener
        self.on_tunnel = on_tunnel
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.inner: asyncio.Protocol | None = None
        self.client_reader: asyncio.StreamReader | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.can_write = asyncio.Event()
        self.can_write.set()

    def pause_writing(self) -> None:  # the client reads slower than the far end sends
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        if self.inner is None and self.client_reader is None and self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.client_reader is not None:
            self.client_reader.feed_data(data)
            return
        self.buf += data
        if not self.buf.startswith(b"CONNECT "[:len(self.buf)]):
            self._hand_to_http()
            return
        if len(self.buf) < 8:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._reply(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n\r\n")
            return
        head, rest = bytes(self.buf[:end]), bytes(self.buf[end + 4:])
        self.buf.clear()
        parts = head.split(b"\r\n", 1)[0].split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            self._reply(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        target = parts[1].decode("latin-1")
        self.client_reader = asyncio.StreamReader(limit=1 << 20)
        if rest:
            self.client_reader.feed_data(rest)
        self.task = asyncio.get_running_loop().create_task(self._tunnel(target))

    def _hand_to_http(self) -> None:
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
        inner = self.http_factory()
        self.inner = inner
        self.transport.set_protocol(inner)
        inner.connection_made(self.transport)
        data, self.buf = bytes(self.buf), bytearray()
        inner.data_received(data)

    def _reply(self, raw: bytes) -> None:
        if self.transport is not None:
            self.transport.write(raw)
            self.transport.close()

    async def _tunnel(self, target: str) -> None:
        assert self.transport is not None and self.client_reader is not None
        if self.timer is not None:
            self.timer.cancel()
        try:
            far_r, far_w = await self.opener(target)
        except PermissionError as exc:
            log.warning("CONNECT %s refused: %s", target[:200], exc)
            self._reply(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\n\r\n")
            return
        except ValueError:
            self._reply(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")
            return
        except (OSError, TimeoutError) as exc:
            log.info("CONNECT %s: cannot connect: %s", target[:200], exc)
            self._reply(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\n\r\n")
            return
        self.transport.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        sent = [0, 0]

        async def up() -> None:
            assert self.client_reader is not None
            while data := await self.client_reader.read(1 << 16):
                far_w.write(data)
                sent[0] += len(data)
                await far_w.drain()
            with contextlib.suppress(OSError):
                far_w.write_eof()

        async def down() -> None:
            assert self.transport is not None
            while data := await far_r.read(1 << 16):
                self.transport.write(data)
                sent[1] += len(data)
                await self.can_write.wait()
            with contextlib.suppress(OSError, RuntimeError):
                self.transport.write_eof()

        try:
            await asyncio.gather(up(), down())
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            far_w.close()
            self.transport.close()
            if self.on_tunnel is not None:
                self.on_tunnel(*sent)

    def eof_received(self) -> bool | None:
        if self.client_reader is not None:
            self.client_reader.feed_eof()
            return True  # keep the write side open for the far end's answer
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()
        if self.timer is not None:
            self.timer.cancel()
        if self.client_reader is not None:
            self.client_reader.feed_eof()
        if self.task is not None and not self.task.done():
            self.task.cancel()
