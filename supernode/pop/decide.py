"""The pure decisions of proof of possession: no I/O, no clock, randomness only from
the `random.Random` the caller passes (tests seed it).

Why two modes (common/pop.py): with its own verified copy of the piece the supernode can
check sha256(nonce || a random range) and the peer sends 32 bytes; without one it knows
only sha256(piece), which cannot check a hash mixed with a nonce, so it asks for the
piece itself and checks it against that digest.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from common import pop
from common.digest import of as digest_of
from common.pieces import piece_range

RANGE_MAX = 64 << 10  # bytes a HASH challenge covers at most
SOURCE_KINDS = ("peer", "peer-cdn")  # clients whose peer server serves pieces to others


@dataclass(frozen=True)
class Target:
    cid: str
    piece: int
    start: int
    end: int
    mode: int


def pick_client(clients: Sequence[tuple[str, str]], bad: set[str], rng: random.Random) -> str | None:
    """One client (cid, kind) that serves pieces and is not dropped already, at random."""
    usable = sorted(cid for cid, kind in clients if kind in SOURCE_KINDS and cid not in bad)
    return rng.choice(usable) if usable else None


def pick_range(piece: int, length: int, piece_size: int, mode: int, rng: random.Random) -> tuple[int, int]:
    """The bytes to ask for: the whole piece (PIECE), or a random run of at most
    RANGE_MAX bytes inside it (HASH)."""
    start, end = piece_range(piece, length, piece_size)
    if mode == pop.PIECE:
        return start, end
    size = end - start + 1
    run = rng.randint(1, min(size, RANGE_MAX))
    first = start + rng.randint(0, size - run)
    return first, first + run - 1


def target(cid: str, held: Sequence[int], length: int, piece_size: int, own_copy: set[int],
           rng: random.Random) -> Target | None:
    """A random piece of those `cid` is recorded as holding, and its range; HASH when the
    supernode has a verified copy of that piece, PIECE otherwise."""
    if not held or length <= 0 or piece_size <= 0:
        return None
    piece = rng.choice(sorted(held))
    mode = pop.HASH if piece in own_copy else pop.PIECE
    start, end = pick_range(piece, length, piece_size, mode, rng)
    return Target(cid, piece, start, end, mode)


class Outstanding:
    """Challenges sent and not yet judged, by nonce: each nonce is judged once; an answer
    for a nonce never issued, or already judged, is refused."""

    def __init__(self) -> None:
        self._open: dict[bytes, Target] = {}

    def open(self, nonce: bytes, t: Target) -> None:
        if nonce in self._open:
            raise ValueError("nonce reused")
        self._open[nonce] = t

    def settle(self, nonce: bytes) -> Target | None:
        return self._open.pop(nonce, None)

    def __len__(self) -> int:
        return len(self._open)


def judge_hash(nonce: bytes, own_bytes: bytes, answer: object) -> bool:
    """A HASH answer is right when it is sha256(nonce || our copy of the range)."""
    return isinstance(answer, str) and pop.matches(pop.answer(nonce, own_bytes), answer)


def judge_piece(data: bytes, size: int, digest: str, algo: str) -> bool:
    """A PIECE answer is right when it is the whole piece and hashes to its digest (by
    the task's algorithm)."""
    return len(data) == size and digest_of(data, algo) == digest


def consequence(failures: int, max_failures: int) -> str:
    """What a failed challenge costs the client: "piece" (no holder of that piece any
    more) or, from the max_failures-th failure of the task on, "task" (no source of it
    for anyone)."""
    return "task" if failures >= max_failures else "piece"
