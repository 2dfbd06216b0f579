"""Piece digests: one strong hash per task, chosen when the task is registered.

- `blake3` (the default for new tasks): about 4x faster than SHA-256 on one core of the
  reference machine (bench/results/digest.md), and it releases the GIL, so worker
  threads hash in parallel;
- `sha256` (hashlib, SHA-NI): what tasks registered before the choice existed, and those
  of clients that know no other, use.

Both give 32 bytes, written as 64 lowercase hex characters, so a digest's format says
nothing of its algorithm: the task's `digest_algo` does (bench/results/digest.md).
Everything that hashes a piece asks this module, by the task's algorithm; whole-file
content digests (`sha256:<hex>`, a registry blob's name) are another matter and stay
SHA-256.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any

from .errors import Signal

SHA256 = "sha256"
BLAKE3 = "blake3"
ALGORITHMS = (BLAKE3, SHA256)  # what this build can hash, preferred first
LEGACY = SHA256  # a task or client that names no algorithm
HEX_LEN = 64
_HEX = re.compile(r"^[0-9a-f]{64}\Z")


class UnknownAlgorithm(Signal, ValueError):
    """A name that is no piece digest of this build (a bad sidecar, a bad setting)."""


def check(algo: str) -> str:
    if algo not in ALGORITHMS:
        raise UnknownAlgorithm(f"unknown piece digest algorithm {algo!r} (known: {', '.join(ALGORITHMS)})")
    return algo


def new(algo: str = LEGACY) -> Any:
    """A streaming hasher (`update`, `hexdigest`) of the algorithm."""
    if algo == BLAKE3:
        import blake3  # type: ignore[import-not-found]  # ~1 ms: only where a task uses it

        return blake3.blake3()
    if algo == SHA256:
        return hashlib.sha256()
    raise UnknownAlgorithm(f"unknown piece digest algorithm {algo!r}")


def of(data: bytes | bytearray | memoryview, algo: str = LEGACY) -> str:
    h = new(algo)
    h.update(data)
    return str(h.hexdigest())


def matches(expected: str | None, actual: str) -> bool:
    """An empty, missing or malformed expected digest is never a pass (not even against
    an equally malformed `actual`: only a real lowercase hex digest can match)."""
    if not expected or not _HEX.match(expected):
        return False
    return hmac.compare_digest(expected, actual)


def choose(offered: list[str] | tuple[str, ...], preferred: str) -> str:
    """The algorithm of a new task: the supernode's preference if the registering client
    can check it, else the legacy one (which every client can)."""
    return preferred if preferred in offered else LEGACY
