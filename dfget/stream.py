"""`dfget -o -` (the file on stdout, in order, while it downloads) and `dfget --range
bytes=A-B` (part of a file through the swarm).

Both keep the download itself unchanged: the whole-file task is fetched into a file
under `<home>/store` (there is no output path to put a part file beside; the peer server
serves it from there while the download runs and until it expires), and a pump copies
the verified bytes to the sink in order:

- P2P pieces count once their digest matched (`Stats.on_piece`); the pump follows the
  run of verified bytes contiguous from the first byte wanted, so pieces that arrive out
  of order wait in the part file.
- Bytes from the origin (back to source) have no piece digests: they are copied only
  once the whole download finished (size and --md5 checked).
- A failure stops the pump where it is: what was copied was verified, nothing after it
  is ever written, and the exit code is non-zero.

With `--range` only the pieces covering A..B are asked for (the pull carries a piece
window), verified whole, and cut to A..B.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path

from common.errors import BadRequest, DfError, LocalDiskError
from common.ranges import RangeSyntaxError, RangeUnsatisfiable, parse_range

from .config import ConfigError, DownloadConfig
from .output import disk_errors, part_path
from .progress import Stats

CHUNK = 1 << 20
STORE_DIR = "store"  # under --home: downloads that have no output file of their own
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer killed by it
_HUGE = 1 << 62


class RangeOutsideFile(BadRequest):
    """--range is well formed but the file has no such bytes (exit code 2)."""

    code = "range_outside_file"
    status = 416


class StreamClosed(DfError):
    """The reader of stdout went away (EPIPE): dfget stops quietly."""

    code = "stream_closed"
    exit_code = EXIT_BROKEN_PIPE


def check_range(text: str) -> str:
    """The --range value, checked for syntax now (the file's length is not known yet).
    Raises ConfigError (a usage error, exit code 2)."""
    try:
        parse_range(text, _HUGE)
    except (RangeSyntaxError, RangeUnsatisfiable) as exc:
        raise ConfigError(f"--range {text!r}: {exc} (use bytes=A-B, bytes=A- or bytes=-N)") from None
    return text.strip()


@dataclass
class Want:
    """The bytes asked for with --range, resolved once the task's length is known."""

    header: str
    lo: int = -1
    hi: int = -1  # inclusive
    first: int = -1  # the pieces that cover lo..hi
    last: int = -1
    partial: bool = False  # P2P ended with the window's pieces only (no whole file)

    @property
    def resolved(self) -> bool:
        return self.lo >= 0

    def resolve(self, length: int, piece_size: int) -> None:
        if self.resolved or length < 0 or piece_size <= 0:
            return
        try:
            rng = parse_range(self.header, length)
        except RangeUnsatisfiable as exc:
            raise RangeOutsideFile(f"--range {self.header}: {exc}") from None
        except RangeSyntaxError as exc:  # checked on the command line already
            raise RangeOutsideFile(f"--range {self.header}: {exc}") from None
        self.lo, self.hi = rng.start, rng.end
        self.first, self.last = self.lo // piece_size, self.hi // piece_size

    def covers(self, done: set[int]) -> bool:
        return self.resolved and all(n in done for n in range(self.first, self.last + 1))

    @property
    def window(self) -> tuple[int, int] | None:
        return (self.first, self.last) if self.resolved else None


class VerifiedRun:
    """Pure: the verified bytes contiguous from byte `lo`, given verified pieces
    (inclusive byte ranges) in any order. `reach` is the first byte past the run."""

    def __init__(self, lo: int = 0) -> None:
        self.lo = lo
        self.reach = -1  # -1: byte lo not verified yet
        self._ready: dict[int, int] = {}

    def add(self, start: int, end: int) -> int:
        if end < start:
            return self.reach
        if self.reach < 0:
            if start <= self.lo <= end:
                self.reach = end + 1
            else:
                self._ready[start] = end + 1
                return self.reach
        elif start == self.reach:
            self.reach = end + 1
        elif start > self.reach:
            self._ready[start] = end + 1
        while self.reach in self._ready:
            self.reach = self._ready.pop(self.reach)
        return self.reach

    def available(self) -> int:
        """Bytes verified from lo on."""
        return max(0, self.reach - self.lo)


def store_output(cfg: DownloadConfig, task_id: str) -> Path:
    return cfg.home / STORE_DIR / task_id


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            raise StreamClosed("the reader of stdout went away") from None
        except OSError as exc:
            if exc.errno == errno.EPIPE:
                raise StreamClosed("the reader of stdout went away") from None
            raise LocalDiskError(f"cannot write the output: {exc.strerror or exc}") from exc
        view = view[n:]


def _copy(src: int, dst: int, start: int, end: int) -> int:
    """Copy [start, end) of src to dst; returns end."""
    pos = start
    while pos < end:
        with disk_errors("cannot read the downloaded file"):
            chunk = os.pread(src, min(CHUNK, end - pos), pos)
        if not chunk:
            raise LocalDiskError(f"the downloaded file ends at {pos}, expected {end} bytes")
        _write_all(dst, chunk)
        pos += len(chunk)
    return pos


Downloader = Callable[[DownloadConfig, Stats, "Want | None"], Awaitable[None]]


class Pump:
    """Copies the verified bytes lo..hi of the download to `sink`, in order."""

    def __init__(self, sink: int) -> None:
        self.sink = sink
        self.seen: list[tuple[int, int]] = []  # verified pieces before the bounds were known
        self.run: VerifiedRun | None = None
        self.pos = 0  # next byte to copy
        self.hi = -1  # inclusive end, once known (-1: not yet)
        self.fd: int | None = None
        self.wake = asyncio.Event()

    def on_piece(self, piece: int, start: int, end: int) -> None:
        if self.run is None:
            self.seen.append((start, end))
        else:
            self.run.add(start, end)
        self.wake.set()

    def set_bounds(self, lo: int, hi: int) -> None:
        self.pos, self.hi = lo, hi
        self.run = VerifiedRun(lo)
        for start, end in self.seen:
            self.run.add(start, end)
        self.seen = []

    def open(self, path: Path) -> None:
        if self.fd is None:
            with contextlib.suppress(OSError):
                self.fd = os.open(path, os.O_RDONLY)

    async def step(self) -> None:
        """Copy what became verified since the last step."""
        if self.fd is None or self.run is None or self.run.reach < 0:
            return
        end = min(self.run.reach, self.hi + 1)
        if end > self.pos:
            self.pos = await asyncio.to_thread(_copy, self.fd, self.sink, self.pos, end)

    async def rest(self, path: Path) -> None:
        """After a successful download: everything left, from the finished file."""
        self.close()
        if self.pos > self.hi:
            return
        with disk_errors(f"cannot open {path}"):
            fd = os.open(path, os.O_RDONLY)
        try:
            self.pos = await asyncio.to_thread(_copy, fd, self.sink, self.pos, self.hi + 1)
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


async def run(cfg: DownloadConfig, stats: Stats, task_id: str, downloader: Downloader, *,
              range_header: str | None, sink: int) -> None:
    """The download into the store with its bytes pumped to `sink` as they are verified.
    `range_header`: only those bytes (else the whole file)."""
    store = store_output(cfg, task_id)
    with disk_errors(f"cannot create {store.parent}"):
        store.parent.mkdir(parents=True, exist_ok=True)
    inner = replace(cfg, output=store, create_dirs=True)
    want = Want(range_header) if range_header else None
    pump = Pump(sink)
    stats.on_piece = pump.on_piece
    part = part_path(store, task_id)
    dl = asyncio.create_task(downloader(inner, stats, want))
    dl.add_done_callback(lambda _: pump.wake.set())
    try:
        while not dl.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(pump.wake.wait(), 0.5)
            pump.wake.clear()
            _bounds(pump, want, stats)
            pump.open(part)
            if stats.back_to_source is None:
                # (the origin rewrites the part file from its start: from then on only
                # the finished, checked file is read)
                await pump.step()
        if dl.exception() is not None and stats.back_to_source is None:
            await pump.step()  # what was verified before the failure, and not a byte more
        dl.result()  # a failure: raise it, nothing more is written
        if want is not None and not want.resolved:  # the origin sent it all: cut it now
            want.resolve(stats.length, CHUNK)
        _bounds(pump, want, stats)
        if pump.run is None:
            if stats.length == 0 and want is None:
                return  # an empty file: nothing to write
            raise DfError("the download ended without a length")
        # the window's pieces only (still in the part file), or the whole file
        await pump.rest(part if want is not None and want.partial else store)
    except StreamClosed:
        # Nobody reads on: leave the swarm (the download's own cleanup), then drop what
        # it had written so far (no output file will ever resume it).
        await _stop(dl)
        for path in (part, part.with_name(part.name + ".cid")):
            with contextlib.suppress(OSError):
                path.unlink()
        raise
    finally:
        pump.close()
        stats.on_piece = None
        await _stop(dl)


async def _stop(dl: asyncio.Task[None]) -> None:
    if not dl.done():
        dl.cancel()
        with contextlib.suppress(BaseException):
            await dl


def _bounds(pump: Pump, want: Want | None, stats: Stats) -> None:
    """Where the copy starts and ends, once the length (and the range) are known."""
    if pump.run is not None:
        return
    if want is not None:
        if want.resolved:
            pump.set_bounds(want.lo, want.hi)
    elif stats.length > 0:
        pump.set_bounds(0, stats.length - 1)


async def main(cfg: DownloadConfig, stats: Stats) -> None:
    """`-o -` and/or `--range`: stream to stdout, or cut the range into -o OUT (a
    temporary file beside it, renamed over OUT only when every byte is in)."""
    from common import taskid

    from .download import _output_dir, download

    tid = taskid.task_id(cfg.url, filter_keys=cfg.filter_keys, md5=cfg.md5, identifier=cfg.identifier)
    stats.task_id = tid
    if cfg.to_stdout:
        await run(cfg, stats, tid, download, range_header=cfg.byte_range, sink=1)
        return
    await asyncio.to_thread(_output_dir, cfg)
    out = cfg.output
    tmp = out.with_name(f".{out.name}.{tid[:16]}.dfget-range")
    with disk_errors(f"cannot create {tmp}"):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    done = False
    try:
        await run(cfg, stats, tid, download, range_header=cfg.byte_range, sink=fd)
        with disk_errors(f"cannot move the range to {out}"):
            os.fsync(fd)
            os.replace(tmp, out)
        done = True
    finally:
        os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                tmp.unlink()
