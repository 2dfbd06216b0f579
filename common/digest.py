"""The piece digest: SHA-256 (hashlib uses SHA-NI where the CPU has it; measured
1.49 GB/s on one core of the reference machine, bench/results/digest.md). Kept in one
place so the algorithm can change without touching callers."""

from __future__ import annotations

import hashlib
import hmac
import re

ALGORITHM = "sha256"
HEX_LEN = 64
_HEX = re.compile(r"^[0-9a-f]{64}\Z")


def new():  # type: ignore[no-untyped-def]
    return hashlib.sha256()


def of(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def matches(expected: str | None, actual: str) -> bool:
    """An empty, missing or malformed expected digest is never a pass (not even against
    an equally malformed `actual`: only a real lowercase hex digest can match)."""
    if not expected or not _HEX.match(expected):
        return False
    return hmac.compare_digest(expected, actual)
