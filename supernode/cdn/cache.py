"""The CDN's piece cache on disk: one data file per task plus a JSON sidecar that says
which pieces were verified and against which origin validators (ETag/Last-Modified),
so a restarted supernode can revalidate a complete file or resume a partial one.

Complete files are also stored by content (`blobs/<hh>/<sha256>.data`): a task whose
fetch ends has its data file hard-linked with the blob of its bytes, so two tasks with
the same bytes (a URL task and the digest task of those bytes, two URLs of one file)
share one copy on disk. The blob's references (`<sha256>.refs`, the ids of the tasks
whose cache entries are that blob) are counted here; removing a task's entry drops its
reference, never the blob: the GC removes a blob only once nothing refers to it and
its TTL or the disk watermark says so (supernode/gc.py)."""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from common import digest
from common.taskid import is_task_id

_SAVING = threading.Lock()
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")


@dataclass
class CacheEntry:
    task_id: str
    length: int = -1
    piece_size: int = 0
    etag: str = ""
    last_modified: str = ""
    complete: bool = False
    digests: dict[int, str] = field(default_factory=dict)
    content: str = ""  # sha256 hex of the complete file: the blob it shares (see `share`)
    digest_algo: str = digest.LEGACY  # of `digests` (the task's, common/digest.py)

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
                content=str(raw.get("content", "")),
                digest_algo=digest.check(str(raw.get("digest_algo", digest.LEGACY))),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if not self.data_path(task_id).exists():
            return None
        return entry

    def create(self, task_id: str, digest_algo: str) -> CacheEntry:
        path = self.data_path(task_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        entry = CacheEntry(task_id=task_id, digest_algo=digest.check(digest_algo))
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
        """The task's entry goes, and with it its reference to a blob (not the blob)."""
        entry = self.entries.pop(task_id, None) or self.load(task_id)
        for p in (self.data_path(task_id), self._sidecar(task_id)):
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        if entry is not None and _HEX64.match(entry.content):
            self._refer(entry.content, task_id, add=False)

    # --- blobs: complete files by content, with their references -------------------
    def blob_path(self, content: str) -> Path:
        if not _HEX64.match(content):
            raise ValueError("bad content digest")
        return self.root / "blobs" / content[:2] / f"{content}.data"

    def refs(self, content: str) -> list[str]:
        """The tasks whose entries are this blob (those whose data file is still there)."""
        try:
            raw = json.loads(self.blob_path(content).with_suffix(".refs").read_text())
        except (OSError, ValueError):
            return []
        return [t for t in raw if isinstance(t, str) and is_task_id(t) and self.data_path(t).exists()]

    def _refer(self, content: str, task_id: str, *, add: bool) -> list[str]:
        refs = set(self.refs(content))
        if add:
            refs.add(task_id)
        else:
            refs.discard(task_id)
        path = self.blob_path(content).with_suffix(".refs")
        if not path.parent.exists():
            return sorted(refs)
        tmp = path.with_suffix(".refs.tmp")
        tmp.write_text(json.dumps(sorted(refs)))
        os.replace(tmp, path)  # its mtime: when the blob's references last changed
        return sorted(refs)

    def share(self, entry: CacheEntry, content: str) -> list[str]:
        """The complete file of `entry` (whose bytes hash to `content`) becomes a
        reference to the blob of those bytes: the blob is made from it, or, if one
        exists, its data file is replaced by a link to it (the duplicate's space is
        freed). Returns the blob's references."""
        blob = self.blob_path(content)
        data = self.data_path(entry.task_id)
        blob.parent.mkdir(parents=True, exist_ok=True)
        if blob.exists():
            if not os.path.samefile(blob, data):
                tmp = data.with_suffix(".link.tmp")
                tmp.unlink(missing_ok=True)
                os.link(blob, tmp)
                os.replace(tmp, data)
        else:
            os.link(data, blob)
        entry.content = content
        self.save(entry)
        return self._refer(content, entry.task_id, add=True)

    def blobs(self) -> list[tuple[str, list[str], float, int]]:
        """(content, references, when they last changed, bytes) for every blob."""
        out = []
        for path in (self.root / "blobs").glob("*/*.data"):
            content = path.stem
            if not _HEX64.match(content):
                continue
            refs_file = path.with_suffix(".refs")
            try:
                changed = refs_file.stat().st_mtime if refs_file.exists() else path.stat().st_mtime
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            out.append((content, self.refs(content), changed, size))
        return out

    def remove_blob(self, content: str) -> bool:
        """Delete an unreferenced blob; False (kept) if anything refers to it."""
        if self.refs(content):
            return False
        blob = self.blob_path(content)
        for p in (blob, blob.with_suffix(".refs")):
            p.unlink(missing_ok=True)
        return True

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
