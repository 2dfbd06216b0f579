"""Jobs of this host's peer server, as local readers see them (pure: no I/O).

A task on this host is in one of five states:

- NotStarted: no download of it is known here (never started, or expired).
- Downloading: a dfget registered its file and is alive, the file is not complete.
- Completed: its dfget moved the whole verified file into place.
- Failed: its dfget gave up (removed its file: failure, back to source) or died.
- Invalid: someone invalidated it (POST /local/jobs/{id}/invalidate): its file is no
  longer served, its running dfget is told to stop at its next verified piece.

Failed and Invalid outlive the file table's entry (the entry is gone by then): `JobBook`
remembers them, bounded, until a new download of the task registers.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from common.errors import DfError

from .table import FileEntry

NOT_STARTED, DOWNLOADING, COMPLETED, FAILED, INVALID = "NotStarted", "Downloading", "Completed", "Failed", "Invalid"
MAX_RECORDS = 4096


class DownloadInvalidated(DfError):
    """dfget's job was invalidated on its peer server: the download stops (no back to
    source: whoever invalidated it does not want it)."""

    code = "invalidated"
    status = 410


@dataclass(frozen=True)
class JobRecord:
    state: str  # FAILED or INVALID
    reason: str


class JobBook:
    """The terminal states whose file table entry is gone."""

    def __init__(self, limit: int = MAX_RECORDS) -> None:
        self._records: OrderedDict[str, JobRecord] = OrderedDict()
        self.limit = limit

    def get(self, task_id: str) -> JobRecord | None:
        return self._records.get(task_id)

    def set(self, task_id: str, state: str, reason: str) -> None:
        self._records.pop(task_id, None)
        self._records[task_id] = JobRecord(state, reason)
        while len(self._records) > self.limit:
            self._records.popitem(last=False)

    def clear(self, task_id: str) -> None:
        """A new download of the task registered: a new job."""
        self._records.pop(task_id, None)

    def invalid(self, task_id: str) -> bool:
        r = self._records.get(task_id)
        return r is not None and r.state == INVALID

    def items(self) -> list[tuple[str, JobRecord]]:
        return list(self._records.items())


def job_state(entry: FileEntry | None, record: JobRecord | None, *, owner_alive: bool) -> str:
    """The state of one task on this host. `owner_alive`: the entry's dfget still runs
    (passed in: looking at a pid is I/O)."""
    if entry is None:
        return record.state if record is not None else NOT_STARTED
    if entry.complete:
        return COMPLETED
    return DOWNLOADING if owner_alive else FAILED


def verified_until(entry: FileEntry, pos: int) -> int:
    """The first byte at or after `pos` that is not verified, walking whole pieces from
    the one holding `pos` (a complete file: its length)."""
    if entry.length < 0 or entry.piece_size <= 0:
        return pos
    if entry.complete:
        return entry.length
    piece = pos // entry.piece_size
    end = pos
    while entry.holds(piece) and end < entry.length:
        end = min((piece + 1) * entry.piece_size, entry.length)
        piece += 1
    return max(end, pos)
