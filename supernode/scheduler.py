"""The scheduler's decision, as pure functions: state in, assignments out.

No Redis, no clock, no unseeded randomness. `supernode/dispatch.py` reads the state
from Redis, calls `rank` then `assign`, and claims the result atomically.

Policy (Dragonfly v1, kept):
- candidates are pieces some source has (the CDN or a peer) minus those the client
  holds or has in flight;
- rarest first (fewest peer holders), ties broken by distance to the mean of the
  client's in-flight pieces (near-sequential disk I/O), then at random;
- a peer holder is preferred to the CDN (offload the seed); among peers the least
  loaded; each source capped at its concurrent-upload limit;
- a source that failed for this client is avoided by it; a source with
  `source_fail_limit` failures is dropped for everyone; a client with more than
  `client_fail_limit` failures is served by the supernode only.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

SourceKind = Literal["peer", "cdn"]


class Bitmap:
    """A Redis bitmap (bit n is the MSB-first bit n of the string), read-only."""

    __slots__ = ("_data",)

    def __init__(self, data: bytes | None = None) -> None:
        self._data = data or b""

    def __contains__(self, n: int) -> bool:
        i = n >> 3
        return 0 <= i < len(self._data) and bool(self._data[i] & (0x80 >> (n & 7)))

    def count(self) -> int:
        return sum(bin(b).count("1") for b in self._data)

    @classmethod
    def of(cls, pieces: Iterable[int]) -> Bitmap:
        buf = bytearray()
        for n in pieces:
            i = n >> 3
            if i >= len(buf):
                buf.extend(b"\x00" * (i + 1 - len(buf)))
            buf[i] |= 0x80 >> (n & 7)
        return cls(bytes(buf))


def decode_counts(raw: bytes | None, n: int) -> list[int]:
    """BITFIELD u16 array (big-endian) -> list of n counts (missing tail = 0)."""
    raw = raw or b""
    out = [int.from_bytes(raw[2 * i : 2 * i + 2], "big") for i in range(min(n, len(raw) // 2))]
    out.extend([0] * (n - len(out)))
    return out


@dataclass(frozen=True)
class Limits:
    max_inflight: int = 4  # per client (--down-limit)
    peer_uploads: int = 5  # per peer source (--up-limit)
    cdn_uploads: int = 4  # per supernode, per task
    source_fail_limit: int = 5
    client_fail_limit: int = 5


@dataclass(frozen=True)
class ClientState:
    cid: str
    have: Bitmap = field(default_factory=Bitmap)
    inflight: frozenset[int] = frozenset()
    blacklist: frozenset[str] = frozenset()
    failures: int = 0
    cdn_only: bool = False  # pattern "cdn"


@dataclass(frozen=True)
class SourceState:
    sid: str
    kind: SourceKind
    load: int = 0
    failures: int = 0
    bad: bool = False


@dataclass(frozen=True)
class Candidate:
    piece: int
    on_cdn: bool
    holders: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    piece: int
    source: str


def wanted(client: ClientState, requested: int, limits: Limits) -> int:
    return max(0, min(requested, limits.max_inflight - len(client.inflight)))


def rank(
    piece_count: int,
    cdn: Bitmap,
    counts: Sequence[int],
    client: ClientState,
    limit: int,
    rng: random.Random,
) -> list[int]:
    """The `limit` best pieces for this client, best first."""
    if limit <= 0:
        return []
    center = sum(client.inflight) / len(client.inflight) if client.inflight else None
    keyed = []
    for n in range(piece_count):
        if n in client.have or n in client.inflight:
            continue
        c = counts[n] if n < len(counts) else 0
        if c == 0 and n not in cdn:
            continue
        distance = abs(n - center) if center is not None else 0.0
        keyed.append((c, distance, rng.random(), n))
    return [k[3] for k in heapq.nsmallest(limit, keyed)]


def _cap(kind: SourceKind, limits: Limits) -> int:
    return limits.cdn_uploads if kind == "cdn" else limits.peer_uploads


def _usable(src: SourceState | None, client: ClientState, limits: Limits, load: int) -> bool:
    if src is None or src.bad or src.sid == client.cid or src.sid in client.blacklist:
        return False
    if src.kind == "peer" and src.failures >= limits.source_fail_limit:
        return False
    return load < _cap(src.kind, limits)


def assign(
    candidates: Sequence[Candidate],
    sources: Mapping[str, SourceState],
    cdn_source: str | None,
    client: ClientState,
    want: int,
    limits: Limits,
) -> list[Decision]:
    """Pick a source for up to `want` of the ranked candidates (in their order)."""
    loads = {sid: s.load for sid, s in sources.items()}
    cdn_only = client.cdn_only or client.failures > limits.client_fail_limit
    out: list[Decision] = []
    for cand in candidates:
        if len(out) >= want:
            break
        choice: str | None = None
        if not cdn_only:
            best_load = None
            for h in cand.holders:
                src = sources.get(h)
                if src is None or src.kind != "peer":
                    continue
                load = loads.get(h, 0)
                if _usable(src, client, limits, load) and (best_load is None or load < best_load):
                    choice, best_load = h, load
        if choice is None and cand.on_cdn and cdn_source is not None:
            src = sources.get(cdn_source)
            if _usable(src, client, limits, loads.get(cdn_source, 0)):
                choice = cdn_source
        if choice is not None:
            loads[choice] = loads.get(choice, 0) + 1
            out.append(Decision(cand.piece, choice))
    return out
