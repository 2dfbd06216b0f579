"""The CDN's piece cache on disk: one data file per task plus a JSON sidecar that says
which pieces were verified and against which origin validators (ETag/Last-Modified),
so a restarted supernode can revalidate a complete file or resume a partial one."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common.taskid import is_task_id

_SAVING = threading.Lock()


@dataclass
class CacheEntry:
    task_id: str
    length: int = -1
    piece_size: int = 0
    etag: str = ""
    last_modified: str = ""
    complete: bool = False
    digests: dict[int, str] = field(default_factory=dict)

    def verified_prefix(self) -> int:
        """Number of leading pieces verified. A parallel fetch (--origin-parallel) leaves
        holes: what lies past the first one is trusted by a takeover (every piece
        re-hashed, takeover.trusted_pieces), a plain resume refetches it."""
        n = 0
        while n in self.digests:
            n += 1
        return n

    def has(self, piece: int) -> bool:
        return piece in self.digests


class PieceCache:
    def __init__(self, home: Path) -> None:
        self.root = home / "cdn"
        self.root.mkdir(parents=True, exist_ok=True)
        self.entries: dict[str, CacheEntry] = {}

    def data_path(self, task_id: str) -> Path:
        if not is_task_id(task_id):  # paths are never built from unchecked input
            raise ValueError("bad task id")
        return self.root / task_id[:2] / f"{task_id}.data"

    def _sidecar(self, task_id: str) -> Path:
        return self.data_path(task_id).with_suffix(".json")

    def load(self, task_id: str) -> CacheEntry | None:
        """The entry from memory or its sidecar; None if nothing usable is on disk."""
        if task_id in self.entries:
            return self.entries[task_id]
        try:
            raw = json.loads(self._sidecar(task_id).read_text())
            entry = CacheEntry(
                task_id=task_id,
                length=int(raw["length"]),
                piece_size=int(raw["piece_size"]),
                etag=str(raw.get("etag", "")),
                last_modified=str(raw.get("last_modified", "")),
                complete=bool(raw.get("complete", False)),
                digests={int(k): str(v) for k, v in raw.get("digests", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not self.data_path(task_id).exists():
            return None
        return entry

    def create(self, task_id: str) -> CacheEntry:
        path = self.data_path(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = CacheEntry(task_id=task_id)
        self.entries[task_id] = entry
        return entry

    def adopt(self, entry: CacheEntry) -> None:
        self.entries[entry.task_id] = entry

    def save(self, entry: CacheEntry) -> None:
        """Write the sidecar atomically (tmp + rename) so a crash leaves the old one."""
        path = self._sidecar(entry.task_id)
        tmp = path.with_suffix(".json.tmp")
        body = asdict(entry)
        body["digests"] = {str(k): v for k, v in entry.digests.items()}
        text = json.dumps(body)
        with _SAVING:  # parallel spans of one fetch save from several worker threads
            tmp.write_text(text)
            os.replace(tmp, path)

    def remove(self, task_id: str) -> None:
        self.entries.pop(task_id, None)
        for p in (self.data_path(task_id), self._sidecar(task_id)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def on_disk(self) -> list[tuple[float, str, int]]:
        """(last access, task id, bytes) for every cached data file, oldest first."""
        out = []
        for path in self.root.glob("*/*.data"):
            tid = path.stem
            if not is_task_id(tid):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            out.append((max(st.st_atime, st.st_mtime), tid, st.st_size))
        return sorted(out)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def touch(self, task_id: str) -> None:
        try:
            now = time.time()
            os.utime(self.data_path(task_id), (now, now))
        except OSError:
            pass


def write_at(path: str | os.PathLike[str], offset: int, data: bytes, *, sync: bool = False) -> None:
    """Write `data` into an existing cache file at `offset` (all of it: pwrite may be
    short), fsync'ed when `sync`."""
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
