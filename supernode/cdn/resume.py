"""What a fetch resumes from, and when it must not: the pieces of a partial or cached
file that still hash to their recorded digests, and the origin's answer to a resuming
Range checked against the version the file started with (two versions are never
spliced).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from common import errors
from common.errors import Signal
from common.ranges import RangeSyntaxError, parse_content_range

from .cache import CacheEntry
from .origin import validators
from .pipe import hash_range

log = logging.getLogger("supernode.cdn")


class NoResume(Signal):
    """The origin would not continue the same version with a Range."""


def check_resume(resp: Any, entry: CacheEntry | None, start: int) -> CacheEntry:
    """The origin's 206 to a resuming Range continues `entry` at piece `start`: the same
    offset, total length and ETag, else OriginChanged."""
    assert entry is not None
    try:
        a, _b, total = parse_content_range(resp.headers.get("Content-Range", ""))
    except RangeSyntaxError as exc:
        raise errors.OriginChanged(f"origin sent a bad Content-Range on resume: {exc}") from None
    etag, _lm = validators(resp)
    if a != start * entry.piece_size or (total is not None and total != entry.length) or (
        entry.etag and etag and etag != entry.etag
    ):
        raise errors.OriginChanged("origin content changed while resuming")
    log.info("task %s: resuming at piece %d", entry.task_id[:12], start)
    return entry


def trusted_prefix(path: Path, entry: CacheEntry) -> int:
    """Re-hash the recorded prefix of a partial file; keep only what still matches
    (the sidecar may be ahead of what reached the disk before a crash)."""
    n = entry.verified_prefix()
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        entry.digests.clear()
        return 0
    try:
        good = 0
        ps, algo = entry.piece_size, entry.digest_algo
        while good < n and hash_range(fd, good * ps, ps, algo) == entry.digests[good]:
            good += 1
    finally:
        os.close(fd)
    entry.digests = {k: v for k, v in entry.digests.items() if k < good}
    return good


def verify_file(path: Path, entry: CacheEntry, count: int) -> bool:
    """Every piece of a whole cached file still hashes to its recorded digest."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        for n in range(count):
            size = min(entry.piece_size, entry.length - n * entry.piece_size)
            if entry.digests.get(n) != hash_range(fd, n * entry.piece_size, size, entry.digest_algo):
                return False
        return True
    finally:
        os.close(fd)
