"""The scheduler's decision, as pure functions: state in, assignments out.

No Redis, no clock, no unseeded randomness. `supernode/scheduling/dispatch.py` reads the state
from Redis, calls `rank` then `assign`, and claims the result atomically. The times the
shell's decisions depend on (an assignment's deadline, when a CDN upload counts as
stale) are computed here from the `now` it passes in.

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

import bisect
import math
import random
from collections.abc import Callable, Container, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import compress
from typing import Literal, NamedTuple

from common.pieces import piece_range
from supernode.store.bitmaps import Bitmap

SourceKind = Literal["peer", "cdn"]


@dataclass(frozen=True)
class Limits:
    max_inflight: int = 4  # per client (--down-limit)
    peer_uploads: int = 5  # per peer source (--up-limit)
    cdn_uploads: int = 4  # per supernode, per task
    source_fail_limit: int = 5
    client_fail_limit: int = 5
    # Super-seeding: the CDN sends a piece only while fewer than cdn_copy_limit() copies
    # of it exist in the swarm (peer holders plus the CDN's own transfers in flight). The
    # seed's upload is the scarce resource: spent on pieces the peers cannot trade yet,
    # it buys the most. A client with nothing in flight is fed regardless (liveness) when
    # no copy of the piece can reach it otherwise, or after waiting `rescue_after` s.
    cdn_copies: int = 1
    cdn_copies_step: int = 10  # one more allowed copy per this many clients of the task
    rescue_after: float = 10.0


@dataclass(frozen=True)
class ClientState:
    cid: str
    have: Bitmap = field(default_factory=Bitmap)
    inflight: frozenset[int] = frozenset()
    blacklist: frozenset[str] = frozenset()
    failures: int = 0
    cdn_only: bool = False  # pattern "cdn"
    # seconds since it was last given a piece or ended one (registered, at first)
    idle_for: float = math.inf


def starving(client: ClientState, limits: Limits) -> bool:
    """Whether the client may take one CDN piece past the super-seeding limit whatever
    the piece: it has had nothing in flight for `limits.rescue_after`. Until then only a
    `dead_end` piece (see `assign`) is a rescue: the pieces a client lacks are nearly
    always on their way to a peer it can fetch them from a moment later, and waiting for
    them is what keeps the seed at one copy per piece."""
    return not client.inflight and client.idle_for >= limits.rescue_after


def rescue_in(client: ClientState, limits: Limits) -> float:
    """Seconds until `starving` turns true for a client that stays idle (inf: it has
    pieces in flight)."""
    return math.inf if client.inflight else max(0.0, limits.rescue_after - client.idle_for)


# Built many times per pull: named tuples (a third of a frozen dataclass's cost).
class SourceState(NamedTuple):
    sid: str
    kind: SourceKind
    load: int = 0
    failures: int = 0
    bad: bool = False


class Candidate(NamedTuple):
    piece: int
    on_cdn: bool
    holders: Sequence[str] = ()
    copies: int = 0  # peer holders + CDN transfers in flight, swarm-wide


class Decision(NamedTuple):
    piece: int
    source: str


def cdn_copy_limit(clients: int, limits: Limits) -> int:
    """How many copies of a piece the CDN seeds into a swarm of `clients`: at least
    `cdn_copies` (1: each piece once, N-1 of N bytes from peers), one more per
    `cdn_copies_step` clients. Peers must otherwise upload (N - copies) / N of every
    byte, which at N = 20 with uplinks equal to downlinks leaves them no slack; a few
    more seeded copies keep the seed's share near 1/step while each piece starts out
    from several holders."""
    return max(limits.cdn_copies, clients // max(1, limits.cdn_copies_step))


def wanted(client: ClientState, requested: int, limits: Limits) -> int:
    return max(0, min(requested, limits.max_inflight - len(client.inflight)))


def failure_blacklists(source: str, cdn: str, reason: str | None) -> bool:
    """A failed piece puts its source on the client's blacklist, but for bad bytes from
    the CDN copy: its supernode mends the piece and it stays the source of last resort.
    (The pull script applies the same rule: supernode/store/scripts.py, apply_reports.)"""
    return not (source == cdn and reason not in ("refused", "timeout"))


def cdn_only(client: ClientState, limits: Limits) -> bool:
    """The client is served by the CDN only: it asked to be (pattern "cdn"), or it
    reported more than `client_fail_limit` failures."""
    return client.cdn_only or client.failures > limits.client_fail_limit


def rank(
    piece_count: int,
    cdn: Bitmap,
    counts: Sequence[int],
    client: ClientState,
    limit: int,
    rng: random.Random,
    *,
    cdn_open: bool = True,
    exclude: Iterable[int] = (),
) -> list[int]:
    """The `limit` best pieces for this client, best first: by (peer holders, distance to
    the mean of its in-flight pieces, random). With `cdn_open` False (the CDN has no free
    upload slot) pieces only the CDN has are left out: ranking them first would hand
    every client candidates nobody can serve now. `exclude` names pieces nobody can
    serve this client now for another reason (the CDN is already sending them and no
    peer holds them yet).

    Written for ~1000 pieces per pull: set and sort work runs in C, the per-piece
    Python work is bounded by `limit`."""
    if limit <= 0:
        return []
    counts = list(counts[:piece_count])
    counts.extend([0] * (piece_count - len(counts)))
    avail = set(compress(range(piece_count), counts))
    if cdn_open:
        avail.update(cdn.members(piece_count))
    avail.difference_update(client.have.members(piece_count))
    avail.difference_update(client.inflight)
    avail.difference_update(exclude)
    if not avail:
        return []
    center = sum(client.inflight) / len(client.inflight) if client.inflight else None
    cands = sorted(avail)
    if len(cands) > limit:
        cands.sort(key=counts.__getitem__)  # stable: ascending piece number within a level
        level = counts[cands[limit - 1]]
        levels = list(map(counts.__getitem__, cands))
        lo, hi = bisect.bisect_left(levels, level), bisect.bisect_right(levels, level)
        chosen = cands[:lo] + _nearest(cands[lo:hi], limit - lo, center, rng)
    else:
        chosen = cands

    def key(n: int) -> tuple[int, float, float]:
        return counts[n], abs(n - center) if center is not None else 0.0, rng.random()

    return sorted(chosen, key=key)


class RarityOrder:
    """Every piece by its number of peer holders: `levels` is [(count, pieces ascending)]
    in ascending count. Built from one moment's counts and shared by the pulls that
    follow (a view rebuilds it every few ms while counts change), so a decision walks
    only as far as it needs instead of sorting every piece."""

    __slots__ = ("levels", "piece_count")

    def __init__(self, counts: Sequence[int], piece_count: int) -> None:
        by: dict[int, list[int]] = {}
        for n, c in enumerate(counts[:piece_count]):
            by.setdefault(c, []).append(n)
        if len(counts) < piece_count:
            by.setdefault(0, []).extend(range(len(counts), piece_count))
        self.levels = sorted(by.items())
        self.piece_count = piece_count


def rank_ordered(
    order: RarityOrder,
    cdn: Bitmap,
    client: ClientState,
    limit: int,
    rng: random.Random,
    *,
    cdn_open: bool = True,
    exclude: Iterable[int] = (),
) -> list[int]:
    """rank() over a prepared RarityOrder: the `limit` best pieces for this client, best
    first, by (peer holders, distance to the mean of its in-flight pieces, random).
    Pieces no peer holds come only from the CDN: left out unless `cdn_open` and on it."""
    if limit <= 0:
        return []
    has = client.have.__contains__
    skip = set(client.inflight)
    skip.update(exclude)
    center = sum(client.inflight) / len(client.inflight) if client.inflight else None
    out: list[int] = []
    for level, group in order.levels:
        if level == 0 and not cdn_open:
            continue
        for n in _walk(group, center, rng):
            if n in skip or has(n) or (level == 0 and n not in cdn):
                continue
            out.append(n)
            if len(out) >= limit:
                return out
    return out


def _walk(group: list[int], center: float | None, rng: random.Random) -> Iterable[int]:
    """An ascending group nearest `center` first (ties at random), or from a random
    point round (no center)."""
    if center is None:
        start = rng.randrange(len(group))
        yield from group[start:]
        yield from group[:start]
        return
    right = bisect.bisect_left(group, center)
    left = right - 1
    while left >= 0 or right < len(group):
        dl = center - group[left] if left >= 0 else None
        dr = group[right] - center if right < len(group) else None
        if dr is None or (dl is not None and (dl < dr or (dl == dr and rng.random() < 0.5))):
            yield group[left]
            left -= 1
        else:
            yield group[right]
            right += 1


def _nearest(group: list[int], k: int, center: float | None, rng: random.Random) -> list[int]:
    """k pieces of an ascending group, nearest `center` first, ties at random."""
    if center is None:
        return rng.sample(group, k)
    out: list[int] = []
    right = bisect.bisect_left(group, center)
    left = right - 1
    while len(out) < k:
        dl = center - group[left] if left >= 0 else None
        dr = group[right] - center if right < len(group) else None
        if dr is None or (dl is not None and (dl < dr or (dl == dr and rng.random() < 0.5))):
            out.append(group[left])
            left -= 1
        else:
            out.append(group[right])
            right += 1
    return out


def _cap(kind: SourceKind, limits: Limits) -> int:
    return limits.cdn_uploads if kind == "cdn" else limits.peer_uploads


def _usable(src: SourceState | None, client: ClientState, limits: Limits, load: int) -> bool:
    if src is None or src.bad or src.sid == client.cid or src.sid in client.blacklist:
        return False
    if src.kind == "peer" and src.failures >= limits.source_fail_limit:
        return False
    return load < _cap(src.kind, limits)


def assign(
    candidates: Iterable[Candidate],
    sources: Mapping[str, SourceState],
    cdn_source: str | None,
    client: ClientState,
    want: int,
    limits: Limits,
    *,
    cdn_copies: int | None = None,
    taken: Mapping[str, int] | None = None,
    dead_end: Callable[[int], bool] | None = None,
) -> list[Decision]:
    """Pick a source for up to `want` of the ranked candidates (in their order).

    `taken` counts what decisions made before this one (in the same round, not yet in
    the sources' loads) already took of each source.

    A peer holder (the least loaded usable one) is preferred; the CDN serves a piece when
    no peer can and the piece has fewer than `cdn_copies` (default `limits.cdn_copies`)
    copies in the swarm; or as the first piece of a client with nothing in flight that is
    `starving` or for which the piece is a `dead_end` (no copy of it can reach this
    client but the seed's: its holders are all ones it cannot use, and the seed is not
    sending it to anyone), so that none waits for ever; or when the client is served by
    the CDN only.

    Reads lazily: candidates are consumed only until `want` are placed, and a source
    is looked up (`sources.get`) only when a candidate names it."""
    loads: dict[str, int] = {}  # loads as this decision adds to them
    before = taken or {}
    only_cdn = cdn_only(client, limits)
    copy_limit = limits.cdn_copies if cdn_copies is None else cdn_copies
    hungry = starving(client, limits)
    idle = not client.inflight
    out: list[Decision] = []
    for cand in candidates:
        if len(out) >= want:
            break
        choice: str | None = None
        if not only_cdn:
            best_load = None
            for h in cand.holders:
                src = sources.get(h)
                if src is None or src.kind != "peer":
                    continue
                load = loads.get(h)
                if load is None:
                    load = src.load + before.get(h, 0)
                if _usable(src, client, limits, load) and (best_load is None or load < best_load):
                    choice, best_load = h, load
        if (choice is None and cand.on_cdn and cdn_source is not None
                and (only_cdn or cand.copies < copy_limit
                     or (idle and not out and (hungry or (dead_end is not None and dead_end(cand.piece)))))):
            src = sources.get(cdn_source)
            if src is not None and _usable(src, client, limits,
                                          loads.get(cdn_source, src.load + before.get(cdn_source, 0))):
                choice = cdn_source
        if choice is not None:
            loads[choice] = loads.get(choice, sources[choice].load + before.get(choice, 0)) + 1
            out.append(Decision(cand.piece, choice))
    return out


def assign_free(
    free: Sequence[str],
    start: int,
    sources: Mapping[str, SourceState],
    client: ClientState,
    want: int,
    limits: Limits,
    *,
    missing: int,
    holdings: Callable[[str], int],
    pick: Callable[[int], int],
    taken: Mapping[str, int] | None = None,
) -> list[Decision]:
    """Source first, for when few sources can take an upload: walk the free peers (from
    position `start` round) and take from each the piece `pick` prefers (the rarest)
    among those it holds and the client is `missing`, one piece per source.

    Piece masks are ints with one byte per piece (piece n is byte n, little-endian: see
    view.Flags), so "held and missing" is one AND. Looking at every piece's holders, as
    `assign` does, finds nothing for long when nearly every holder is busy; this looks
    only at sources that can serve."""
    if cdn_only(client, limits):
        return []
    before = taken or {}
    out: list[Decision] = []
    k = len(free)
    for j in range(k):
        if len(out) >= want or not missing:
            break
        sid = free[(start + j) % k]
        src = sources.get(sid)
        if src is None or src.kind != "peer" or not _usable(src, client, limits, src.load + before.get(sid, 0)):
            continue
        common = missing & holdings(sid)
        if not common:
            continue
        n = pick(common)
        missing &= ~(1 << (8 * n))
        out.append(Decision(n, sid))
    return out


# --- times: deadlines and stale uploads ----------------------------------------------------
# Source first: a client missing more than ENDGAME pieces is given, from each of a few
# free sources, the rarest piece that source has and it lacks. Rarest first over the
# whole task sends every client to the same few holders of the rarest pieces, which are
# then always busy: in a closed loop of 2,000 clients 80 % of piece-first decisions found
# nothing while 1,700 sources had a free slot. Near its end a client looks at its few
# missing pieces' free holders instead (piece first).
ENDGAME = 64
DEADLINE_SLACK_S = 30  # an assignment's time on top of its bytes at the minimum rate


def piece_bounds(length: int, piece_size: int, n: int) -> tuple[int, int]:
    """First and last byte of piece n; of a file of unknown length (-1) every piece but
    the last is full, so n's bounds are those of a full piece."""
    if length >= 0:
        return piece_range(n, length, piece_size)
    return n * piece_size, (n + 1) * piece_size - 1


def allowance_ms(nbytes: int, min_rate: int) -> int:
    """How long a transfer of `nbytes` may take: at `min_rate`, plus DEADLINE_SLACK_S. An
    assignment's deadline is its start plus this."""
    return int((nbytes / min_rate + DEADLINE_SLACK_S) * 1000)


def piece_allowance_ms(length: int, piece_size: int, n: int, min_rate: int) -> int:
    """allowance_ms of piece n of a file of `length` bytes (-1: unknown)."""
    start, end = piece_bounds(length, piece_size, n)
    return allowance_ms(end - start + 1, min_rate)


def count_cdn_uploads(
    counts: Sequence[int], count: int, sending: Iterable[tuple[int, int]], now_ms: int,
    allowance: Callable[[int], int], grace_ms: int,
) -> tuple[list[int], set[int]]:
    """Copies per piece once the CDN's uploads in flight (`sending`: piece, deadline ms)
    land, and the pieces nobody else should be sent to now.

    A piece the CDN is sending will have a peer holder in a moment: it counts as a copy,
    so the seed sends distinct pieces instead of one piece twice; and while no peer holds
    it, it is left out of every ranking ("pending only"). But an upload running for over
    `grace_ms` (started at its deadline minus `allowance(piece)`) is likely to a client
    that died (it never reports; its slot lasts to the deadline): it must not hide its
    piece from everyone else until then."""
    out = list(counts[:count])
    out.extend([0] * (count - len(out)))
    pending_only: set[int] = set()
    for n, until in sending:
        if n < count:
            if out[n] == 0 and until - now_ms > allowance(n) - grace_ms:
                pending_only.add(n)
            out[n] += 1
    return out, pending_only


def next_stale_s(sending: Iterable[tuple[int, int]], now_ms: int, allowance: Callable[[int], int],
                 grace_ms: int) -> float:
    """Seconds until the next of the CDN's uploads in flight runs past `grace_ms` and stops
    hiding its piece (see count_cdn_uploads); inf when none will, at least 0.05."""
    left = [until - allowance(n) + grace_ms - now_ms for n, until in sending]
    return max(0.05, min((ms for ms in left if ms > 0), default=float("inf")) / 1000)


# --- the CDN as a source -------------------------------------------------------------------
def cdn_open_to_task(cdn: str, bad: Container[str]) -> bool:
    """The task has a CDN copy that is not dropped (the shell also checks that its
    supernode is alive)."""
    return bool(cdn) and cdn not in bad


def cdn_open_to(client: ClientState, task_open: bool, cdn: SourceState | None,
                taken: Mapping[str, int], limits: Limits) -> bool:
    """The CDN can take one more of this client's pieces in this round: open to the task,
    not on the client's blacklist, below its upload cap counting what the decisions
    before in the round took (`taken`)."""
    return (task_open and cdn is not None and cdn.sid not in client.blacklist
            and cdn.load + taken.get(cdn.sid, 0) < limits.cdn_uploads)


def rarest_sampled(held: bytes, counts: Sequence[int], rand: Callable[[int], int], sample: int) -> int:
    """The rarest (fewest copies in `counts`) of `sample` pieces picked among those `held`
    marks (one byte per piece, 1: a candidate; at least one), each the first candidate
    from a random point on (`rand(32)`), wrapping round: C-speed searches, where listing
    every candidate cost more than the rest of a pull. Ties go to the first found."""
    count = len(held)
    best, fewest = -1, 1 << 30
    for _ in range(sample):
        n = held.find(1, rand(32) % count)
        if n < 0:
            n = held.find(1)
        if counts[n] < fewest:
            best, fewest = n, counts[n]
    return best


def source_first(count: int, client: ClientState) -> bool:
    """Decide source first (assign_free) rather than piece first (rank + assign): while
    the client misses more than ENDGAME pieces besides those in flight."""
    return count - client.have.count() - len(client.inflight) > ENDGAME


def claim_copies(first: bool, client: ClientState, copies: int, copy_limit: int, limits: Limits, *,
                 dead_end: bool = False) -> int:
    """The super-seeding limit the claim re-checks for a decision (`max_copies` of the
    pull script; 0: none), `copies` being the copies of its piece this round saw.

    The claim re-checks super-seeding atomically (another supernode deciding from its own
    view must not seed the same piece). A rescue piece (the first decision for a client
    with nothing in flight that is `starving` or for which the piece is a `dead_end`, see
    assign) may exceed the limit, but only by the copy it adds; clients served by the CDN
    only are not limited."""
    if cdn_only(client, limits):
        return 0
    if first and not client.inflight and (dead_end or starving(client, limits)):
        return max(copy_limit, copies + 1)
    return copy_limit
