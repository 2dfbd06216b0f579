"""The peer server's file table: which task lives in which local file, which of its
pieces are verified, and whether the file is still the one we registered.

Requests are resolved through this table only; a path never comes from the network.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.pieces import piece_count


@dataclass
class FileEntry:
    task_id: str
    path: Path
    length: int
    piece_size: int
    supernodes: list[str]
    owner_pid: int = 0
    piece_auth: bool = False  # piece requests need a supernode's token (RegisterFile: default on)
    clients: list[str] = field(default_factory=list)  # the client ids its download registered as
    complete: bool = False  # moved to its final path by its dfget
    verified: set[int] = field(default_factory=set)
    stamp: tuple[int, int] | None = None  # (size, mtime_ns) when it became complete
    content: str = ""  # sha256 hex of the complete file, when known: see FileTable.stand_in
    last_access: float = field(default_factory=time.monotonic)

    def holds(self, piece: int) -> bool:
        return piece in self.verified

    def in_progress(self) -> bool:
        """A download still running (its dfget is alive) keeps the server alive."""
        return not self.complete and self.owner_pid > 0 and _pid_alive(self.owner_pid)

    def still_valid(self) -> bool:
        """False once the file was deleted or, for a complete file, changed size/mtime
        (the user edited the output: its bytes no longer match the digests)."""
        try:
            st = self.path.stat()
        except OSError:
            return False
        if self.length >= 0 and st.st_size != self.length:
            return False
        return self.stamp is None or self.stamp == (st.st_size, st.st_mtime_ns)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileTable:
    def __init__(self) -> None:
        self.files: dict[str, FileEntry] = {}

    def get(self, task_id: str) -> FileEntry | None:
        return self.files.get(task_id)

    def register(self, entry: FileEntry) -> None:
        """A re-registration (resume, or a second dfget of the same task into another
        output) replaces the entry: the new file is the one being written now."""
        self.files[entry.task_id] = entry

    def mark(self, task_id: str, pieces: list[int], length: int | None) -> bool:
        entry = self.files.get(task_id)
        if entry is None:
            return False
        if length is not None and length >= 0:
            entry.length = length
        count = piece_count(entry.length, entry.piece_size)
        entry.verified.update(p for p in pieces if count < 0 or p < count)
        return True

    def moved(self, task_id: str, path: Path, content: str = "") -> bool:
        entry = self.files.get(task_id)
        if entry is None:
            return False
        entry.path = path
        entry.complete = True
        entry.content = content
        try:
            st = path.stat()
        except OSError:
            self.files.pop(task_id, None)
            return False
        entry.stamp = (st.st_size, st.st_mtime_ns)
        entry.last_access = time.monotonic()
        return True

    def remove(self, task_id: str) -> FileEntry | None:
        return self.files.pop(task_id, None)

    # --- references: complete files by content ------------------------------------
    def refs(self, content: str) -> list[FileEntry]:
        """The tasks (and through them the outputs) that refer to this content."""
        return [e for e in self.files.values() if e.complete and content and e.content == content]

    def stand_in(self, entry: FileEntry) -> FileEntry | None:
        """For a complete entry whose own output is gone or changed: another task's
        output with the same content, still as it was verified (its pieces are this
        task's pieces: same bytes, same length, same piece size)."""
        if not entry.complete or not entry.content:
            return None
        for other in self.refs(entry.content):
            if other is not entry and (other.length, other.piece_size) == (entry.length, entry.piece_size) \
                    and other.still_valid():
                return other
        return None

    def sweep(self, now: float, expiretime: float) -> list[FileEntry]:
        """Drop files that changed, vanished, or (complete ones) were not read for
        `expiretime`. Returns what was dropped so supernodes can be told.

        A complete file of known content is one entry with references: a read of any
        task of that content counts for all of them, and a task whose own output went is
        kept while another output of that content stands in for it. The content goes
        when nothing refers to it any more, or none of its tasks was read for
        `expiretime`."""
        gone: list[FileEntry] = []
        last_read: dict[str, float] = {}
        for e in self.files.values():
            if e.complete and e.content:
                last_read[e.content] = max(last_read.get(e.content, 0.0), e.last_access)
        for tid, entry in list(self.files.items()):
            read = last_read.get(entry.content, entry.last_access) if entry.complete else entry.last_access
            expired = entry.complete and now - read > expiretime
            orphan = not entry.complete and not entry.in_progress() and now - entry.last_access > expiretime
            if expired or orphan or not (entry.still_valid() or self.stand_in(entry) is not None):
                gone.append(self.files.pop(tid))
        return gone

    def busy(self) -> bool:
        return any(e.in_progress() for e in self.files.values())

    def supernodes(self) -> set[str]:
        return {url for e in self.files.values() for url in e.supernodes}
