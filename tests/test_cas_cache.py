"""The CDN cache by content (supernode/cdn/cache.py) and its GC (supernode/gc.py
collect_blobs): references counted per blob, a blob removed only when nothing refers to
it and its TTL or the disk watermark says so."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from supernode.cdn.cache import CacheEntry, PieceCache
from supernode.gc import collect_blobs


def _complete(cache: PieceCache, tid: str, data: bytes) -> CacheEntry:
    entry = cache.create(tid, "sha256")
    entry.length, entry.piece_size, entry.complete = len(data), 4 << 20, True
    cache.data_path(tid).write_bytes(data)
    cache.share(entry, hashlib.sha256(data).hexdigest())
    return entry


def test_share_refs_and_collection(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    data = os.urandom(100_000)
    content = hashlib.sha256(data).hexdigest()
    a, b = "a" * 64, "b" * 64
    _complete(cache, a, data)
    _complete(cache, b, data)
    blob = cache.blob_path(content)
    assert os.path.samefile(cache.data_path(a), blob) and os.path.samefile(cache.data_path(b), blob)
    assert cache.refs(content) == [a, b]
    later = time.time() + 7200
    # referenced: neither the TTL nor disk pressure removes it
    assert collect_blobs(cache, ttl=1, threshold=1 << 62, now=later) == 0
    assert cache.remove_blob(content) is False
    cache.remove(a)
    assert cache.refs(content) == [b] and blob.exists() and cache.data_path(b).read_bytes() == data
    assert collect_blobs(cache, ttl=1, threshold=0, now=later) == 0
    cache.remove(b)
    assert cache.refs(content) == []
    # unreferenced: kept within its TTL while there is room ...
    assert collect_blobs(cache, ttl=3600, threshold=0) == 0 and blob.exists()
    # ... removed once the TTL is over
    assert collect_blobs(cache, ttl=3600, threshold=0, now=later) == 1
    assert not blob.exists() and not list(tmp_path.rglob("*.data"))


def test_disk_watermark_removes_unreferenced_blobs_at_once(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    keep, drop = os.urandom(1000), os.urandom(1000)
    _complete(cache, "c" * 64, keep)
    _complete(cache, "d" * 64, drop)
    cache.remove("d" * 64)
    assert collect_blobs(cache, ttl=3600, threshold=1 << 62) == 1  # below the watermark
    assert cache.blob_path(hashlib.sha256(keep).hexdigest()).exists()
    assert not cache.blob_path(hashlib.sha256(drop).hexdigest()).exists()


def test_a_later_task_with_the_same_bytes_frees_its_duplicate(tmp_path: Path) -> None:
    cache = PieceCache(tmp_path)
    data = os.urandom(5000)
    _complete(cache, "e" * 64, data)
    entry = cache.create("f" * 64, "sha256")
    entry.length, entry.piece_size, entry.complete = len(data), 4 << 20, True
    cache.data_path("f" * 64).write_bytes(data)
    assert not os.path.samefile(cache.data_path("e" * 64), cache.data_path("f" * 64))
    cache.share(entry, hashlib.sha256(data).hexdigest())
    assert os.path.samefile(cache.data_path("e" * 64), cache.data_path("f" * 64))
    assert os.stat(cache.data_path("f" * 64)).st_nlink == 3
    assert cache.load("f" * 64) is not None and cache.load("f" * 64).content == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("bad", ["", "A" * 64, "a" * 63, "../" + "a" * 61])
def test_blob_paths_come_only_from_digests(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        PieceCache(tmp_path).blob_path(bad)
