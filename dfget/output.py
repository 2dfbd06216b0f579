"""The temporary download file: written piece by piece at offsets, re-checked on resume,
moved onto the output atomically only when complete and verified.

Every OSError from the local disk becomes `LocalDiskError` (exit code 7) here, so the
download loop never has to guess whether an error is about the disk or the network.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from common import digest
from common.errors import ContentDigestMismatch, IntegrityError, LocalDiskError
from common.taskid import is_short_id

READ_CHUNK = 1 << 20
T = TypeVar("T")


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None: Python does not wrap it."""
    try:
        import ctypes

        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (ImportError, OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


_SYNC_FILE_RANGE: list[Callable[[int, int, int, int], int] | None] = []
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing these bytes to disk now, without waiting for it.

    The download ends with an fsync before the atomic rename. Left to itself the kernel
    keeps up to 10 % of RAM dirty before writing any of it back, so that fsync would
    write the whole file at the end: about 0.5 s per GiB here, after the last byte
    arrived. Started as each block lands, the writes overlap the download and the
    final fsync waits only for the last few. Best effort: a failure changes nothing
    (the fsync still makes the file durable)."""
    if length <= 0:
        return
    if not _SYNC_FILE_RANGE:
        _SYNC_FILE_RANGE.append(_sync_file_range())
    fn = _SYNC_FILE_RANGE[0]
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def part_path(output: Path, task_id: str) -> Path:
    """Deterministic, so a re-run with the same URL and output finds the same file."""
    return output.parent / f".{output.name}.{task_id[:16]}.dfget-part"


@contextmanager
def disk_errors(what: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = errno.errorcode.get(exc.errno or 0, "") if exc.errno else ""
        raise LocalDiskError(f"{what}: {exc.strerror or exc} {f'({reason})' if reason else ''}".strip()) from exc


class PartFile:
    """Blocking methods: call them from a worker thread (they read/write megabytes)."""

    def __init__(self, output: Path, task_id: str) -> None:
        self.output = output
        self.path = part_path(output, task_id)
        self.fd: int | None = None

    @property
    def cid_path(self) -> Path:
        """Beside the part file: the client id it was downloaded under, so a run resuming
        it registers as the same client (the supernode then releases what the dead run
        still had assigned instead of holding it to its deadlines)."""
        return self.path.with_name(self.path.name + ".cid")

    def load_cid(self) -> str | None:
        try:
            cid = self.cid_path.read_text().strip()
        except OSError:
            return None
        return cid if is_short_id(cid) else None

    def save_cid(self, cid: str) -> None:
        """Best effort: without it a resume only registers as a new client."""
        try:
            self.cid_path.write_text(cid + "\n")
        except OSError:
            pass

    def _drop_cid(self) -> None:
        try:
            self.cid_path.unlink()
        except OSError:
            pass

    def existed(self) -> bool:
        try:
            return self.path.stat().st_size > 0
        except OSError:
            return False

    def open(self, length: int) -> None:
        """Open (creating) the file; pre-size it when the length is known so pieces can be
        written anywhere and peers can be served from it at once."""
        with disk_errors(f"cannot create {self.path}"):
            if self.fd is None:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if length >= 0 and os.fstat(self.fd).st_size != length:
                os.ftruncate(self.fd, length)

    def set_length(self, length: int) -> None:
        assert self.fd is not None
        with disk_errors(f"cannot resize {self.path}"):
            if os.fstat(self.fd).st_size != length:
                os.ftruncate(self.fd, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        assert self.fd is not None
        view = memoryview(data)
        start = offset
        with disk_errors(f"cannot write {self.path}"):
            while view:
                n = os.pwrite(self.fd, view, offset)
                view, offset = view[n:], offset + n
        start_writeback(self.fd, start, offset - start)

    def writev(self, offset: int, chunks: list[bytes]) -> None:
        """pwritev the chunks back to back from offset (one syscall, no joining)."""
        assert self.fd is not None
        total = sum(len(c) for c in chunks)
        with disk_errors(f"cannot write {self.path}"):
            n = os.pwritev(self.fd, chunks, offset)
        if n < total:  # short write (rare: signals, nearly full disk): finish plainly
            self.write(offset + n, b"".join(chunks)[n:])
        start_writeback(self.fd, offset, n)

    def piece_digest(self, start: int, end: int, algo: str) -> str | None:
        """The digest (by `algo`) of [start, end] as on disk, or None when the file is shorter."""
        assert self.fd is not None
        h = digest.new(algo)
        pos = start
        with disk_errors(f"cannot read {self.path}"):
            while pos <= end:
                chunk = os.pread(self.fd, min(READ_CHUNK, end - pos + 1), pos)
                if not chunk:
                    return None
                h.update(chunk)
                pos += len(chunk)
        return str(h.hexdigest())

    def file_md5(self) -> str:
        return self._file_hash(hashlib.md5(usedforsecurity=False))

    def file_sha256(self) -> str:
        return self._file_hash(hashlib.sha256())

    def _file_hash(self, h: Any) -> str:
        assert self.fd is not None
        pos = 0
        with disk_errors(f"cannot read {self.path}"):
            while chunk := os.pread(self.fd, READ_CHUNK, pos):
                h.update(chunk)
                pos += len(chunk)
        return h.hexdigest()

    def finish(self, length: int, md5: str | None, md5_actual: str | None = None, *,
               keep_part: bool = False, sha256: str | None = None) -> None:
        """fsync, check size and md5, then rename onto the output (`keep_part`: link it
        there, the part file's name stays until release()). On an integrity failure the
        temporary file is removed; the output is never touched."""
        assert self.fd is not None
        with disk_errors(f"cannot finish {self.path}"):
            os.fsync(self.fd)
            size = os.fstat(self.fd).st_size
        if size != length:
            self.discard()
            raise IntegrityError(f"downloaded {size} bytes, expected {length}")
        if md5 is not None:
            actual = md5_actual or self.file_md5()
            if actual.lower() != md5.lower():
                self.discard()
                raise IntegrityError(f"md5 mismatch: expected {md5}, got {actual}")
        if sha256 is not None:
            # --digest: every piece was checked against the supernode's digests, and this
            # pins the whole file to the digest the user gave, whoever published those
            actual = self.file_sha256()
            if actual != sha256:
                self.discard()
                raise ContentDigestMismatch(f"the downloaded file hashes to sha256:{actual}, not "
                                            f"sha256:{sha256}; nothing was written to {self.output}")
        with disk_errors(f"cannot move the download to {self.output}"):
            if keep_part:
                # The output appears under its name while the part file keeps its own, so
                # the peer server serving the part path never finds it gone: the caller
                # tells it the new path, then calls release(). A file system without
                # hard links gets the plain rename.
                staged = self.path.with_name(self.path.name + ".done")
                try:
                    os.link(self.path, staged)
                except OSError:
                    os.replace(self.path, self.output)
                else:
                    os.replace(staged, self.output)
            else:
                os.replace(self.path, self.output)
                _fsync_dir(self.output.parent)
        self._drop_cid()
        self.close()

    def release(self) -> None:
        """After finish(keep_part=True) and the peer server's news of the new path: the
        part file's name goes."""
        with disk_errors(f"cannot remove {self.path}"):
            self.path.unlink(missing_ok=True)
        with disk_errors(f"cannot sync {self.output.parent}"):
            _fsync_dir(self.output.parent)

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def discard(self) -> None:
        self.close()
        self._drop_cid()
        try:
            self.path.unlink()
        except OSError:
            pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def recheck(part: PartFile, ranges: list[tuple[int, int, int, str | None]], algo: str,
            stop: Callable[[], bool] = lambda: False) -> list[int]:
    """Pieces (number, start, end, expected digest) whose bytes on disk match: resume."""
    good: list[int] = []
    for number, start, end, expected in ranges:
        if stop():
            break
        if expected is None:
            continue
        actual = part.piece_digest(start, end, algo)
        if actual is not None and digest.matches(expected, actual):
            good.append(number)
    return good
