"""Table-driven tests of the scheduler's pure decision (supernode/scheduling/policy.py)."""

from __future__ import annotations

import math
import random

import pytest

from supernode.scheduling.policy import (
    Bitmap, Candidate, ClientState, Decision, Limits, SourceState, allowance_ms, assign, assign_free,
    cdn_copy_limit, cdn_open_to, cdn_open_to_task, claim_copies, count_cdn_uploads, failure_blacklists,
    next_stale_s,
    piece_allowance_ms, piece_bounds, rank, rarest_sampled, rescue_in, source_first, starving, wanted,
)
from supernode.store.bitmaps import decode_counts

CDN = "c" * 32
A, B, C, ME = "a" * 32, "b" * 32, "d" * 32, "e" * 32


def rng() -> random.Random:
    return random.Random(7)


def test_bitmap_matches_redis_bit_order() -> None:
    bm = Bitmap(bytes([0b1000_0001, 0b0100_0000]))
    assert [n for n in range(16) if n in bm] == [0, 7, 9]
    assert Bitmap.of([0, 7, 9])._data == bm._data
    assert bm.count() == 3
    assert 100 not in bm and -1 not in bm


def test_decode_counts_big_endian_u16_with_missing_tail() -> None:
    assert decode_counts(b"\x00\x02\x01\x00", 4) == [2, 256, 0, 0]
    assert decode_counts(None, 2) == [0, 0]


@pytest.mark.parametrize(
    "count, cdn, counts, have, inflight, limit, expected",
    [
        # rarest first: piece 2 has no peer holder, piece 0 has 3, piece 1 has 1
        (3, [0, 1, 2], [3, 1, 0], [], [], 3, [2, 1, 0]),
        # pieces the client holds or has in flight are never candidates
        (4, [0, 1, 2, 3], [0, 0, 0, 0], [0, 1], [2], 4, [3]),
        # a piece nobody has (not on CDN, no peer holder) is not a candidate
        (3, [0], [0, 0, 2], [], [], 3, [0, 2]),
        # limit respected
        (5, list(range(5)), [0] * 5, [], [], 0, []),
    ],
)
def test_rank(count, cdn, counts, have, inflight, limit, expected) -> None:
    client = ClientState(ME, have=Bitmap.of(have), inflight=frozenset(inflight))
    got = rank(count, Bitmap.of(cdn), counts, client, limit, rng())
    assert got == expected


def test_rank_ties_go_to_the_pieces_nearest_the_inflight_mean() -> None:
    client = ClientState(ME, inflight=frozenset({10}))
    got = rank(20, Bitmap.of(range(20)), [1] * 20, client, 3, rng())
    assert set(got[:2]) == {9, 11} and got[2] in {8, 12}


def test_rank_random_tiebreak_is_seeded() -> None:
    client = ClientState(ME)
    a = rank(50, Bitmap.of(range(50)), [0] * 50, client, 5, random.Random(1))
    b = rank(50, Bitmap.of(range(50)), [0] * 50, client, 5, random.Random(1))
    c = rank(50, Bitmap.of(range(50)), [0] * 50, client, 5, random.Random(2))
    assert a == b and a != c


def src(sid: str, kind: str = "peer", load: int = 0, failures: int = 0, bad: bool = False) -> SourceState:
    return SourceState(sid, kind, load, failures, bad)  # type: ignore[arg-type]


LIM = Limits(max_inflight=4, peer_uploads=2, cdn_uploads=1, source_fail_limit=3, client_fail_limit=2)


@pytest.mark.parametrize(
    "name, cands, sources, client, want, expected",
    [
        ("peer preferred to the CDN",
         [Candidate(0, True, (A,))], [src(CDN, "cdn"), src(A)], ClientState(ME), 1, [Decision(0, A)]),
        ("least loaded peer",
         [Candidate(0, True, (A, B))], [src(A, load=1), src(B)], ClientState(ME), 1, [Decision(0, B)]),
        ("CDN when no peer holds it",
         [Candidate(0, True, ())], [src(CDN, "cdn")], ClientState(ME), 1, [Decision(0, CDN)]),
        ("peer at its upload cap is skipped, CDN used",
         [Candidate(0, True, (A,))], [src(A, load=2), src(CDN, "cdn")], ClientState(ME), 1, [Decision(0, CDN)]),
        ("CDN cap counts assignments made in the same call",
         [Candidate(0, True, ()), Candidate(1, True, ())], [src(CDN, "cdn")], ClientState(ME), 2,
         [Decision(0, CDN)]),
        ("peer cap counts assignments made in the same call",
         [Candidate(n, False, (A,)) for n in range(3)], [src(A)], ClientState(ME), 3,
         [Decision(0, A), Decision(1, A)]),
        ("blacklisted source avoided by this client",
         [Candidate(0, True, (A,))], [src(A), src(CDN, "cdn")], ClientState(ME, blacklist=frozenset({A})), 1,
         [Decision(0, CDN)]),
        ("source with too many failures dropped for everyone",
         [Candidate(0, False, (A, B))], [src(A, failures=3), src(B, load=1)], ClientState(ME), 1,
         [Decision(0, B)]),
        ("bad source never chosen",
         [Candidate(0, False, (A,))], [src(A, bad=True)], ClientState(ME), 1, []),
        ("client with too many failures served by the CDN only",
         [Candidate(0, True, (A,)), Candidate(1, False, (A,))], [src(A), src(CDN, "cdn")],
         ClientState(ME, failures=3), 2, [Decision(0, CDN)]),
        ("pattern cdn",
         [Candidate(0, True, (A,))], [src(A), src(CDN, "cdn")], ClientState(ME, cdn_only=True), 1,
         [Decision(0, CDN)]),
        ("never assigned to itself",
         [Candidate(0, False, (ME,))], [src(ME)], ClientState(ME), 1, []),
        ("unknown holder ignored",
         [Candidate(0, False, (C,))], [src(A)], ClientState(ME), 1, []),
        ("super-seeding: a piece with a copy in the swarm is not sent by the CDN again",
         [Candidate(0, True, (A,), copies=1)], [src(A, load=2), src(CDN, "cdn")],
         ClientState(ME, inflight=frozenset({7})), 1, []),
        ("super-seeding: a piece the CDN is already sending is not sent twice",
         [Candidate(0, True, (), copies=1), Candidate(1, True, (), copies=0)], [src(CDN, "cdn")],
         ClientState(ME, inflight=frozenset({7})), 1, [Decision(1, CDN)]),
        ("super-seeding: a client with nothing in flight for rescue_after is fed by the CDN all the same",
         [Candidate(0, True, (A,), copies=1)], [src(A, load=2), src(CDN, "cdn")], ClientState(ME, idle_for=10.0), 1,
         [Decision(0, CDN)]),
        ("super-seeding: a client idle for less than rescue_after waits for the peers",
         [Candidate(0, True, (A,), copies=1)], [src(A, load=2), src(CDN, "cdn")], ClientState(ME, idle_for=9.9), 1,
         []),
        ("super-seeding: a client that ended a piece a moment ago waits for the peers",
         [Candidate(0, True, (), copies=1)], [src(CDN, "cdn")], ClientState(ME, idle_for=0.0), 1, []),
        ("super-seeding: that rescue is one piece, not a licence for the whole pull",
         [Candidate(0, True, (A,), copies=1), Candidate(1, True, (A,), copies=1)],
         [src(A, load=2), src(CDN, "cdn")], ClientState(ME), 2, [Decision(0, CDN)]),
        ("super-seeding does not apply to a CDN-only client",
         [Candidate(0, True, (A,), copies=3)], [src(A), src(CDN, "cdn")],
         ClientState(ME, cdn_only=True, inflight=frozenset({7})), 1, [Decision(0, CDN)]),
        ("want bounds the result, order kept",
         [Candidate(5, False, (A,)), Candidate(3, False, (B,)), Candidate(1, False, (A,))], [src(A), src(B)],
         ClientState(ME), 2, [Decision(5, A), Decision(3, B)]),
    ],
)
def test_assign(name, cands, sources, client, want, expected) -> None:
    got = assign(cands, {s.sid: s for s in sources}, CDN, client, want, LIM)
    assert got == expected, name


@pytest.mark.parametrize(("inflight", "idle_for", "hungry", "wait"), [
    ((), 0.0, False, 2.0), ((), 1.5, False, 0.5), ((), 2.0, True, 0.0), ((), 60.0, True, 0.0),
    ((3,), 60.0, False, math.inf),
])
def test_starving_after_rescue_after_with_nothing_in_flight(inflight, idle_for, hungry, wait) -> None:
    client = ClientState(ME, inflight=frozenset(inflight), idle_for=idle_for)
    lim = Limits(rescue_after=2.0)
    assert starving(client, lim) is hungry and rescue_in(client, lim) == pytest.approx(wait)


@pytest.mark.parametrize(("inflight", "dead", "expected"), [
    ((), {0}, [Decision(0, CDN)]),  # its one copy is at a holder it cannot use
    ((), set(), []),  # a peer copy will reach it: wait
    ((7,), {0}, []),  # pieces in flight: not starving, no rescue
])
def test_a_dead_end_piece_is_a_rescue_at_once(inflight, dead, expected) -> None:
    cands = [Candidate(0, True, (), copies=1), Candidate(1, True, (), copies=1)]
    client = ClientState(ME, inflight=frozenset(inflight), idle_for=0.0)
    got = assign(cands, {CDN: src(CDN, "cdn")}, CDN, client, 2, LIM, dead_end=dead.__contains__)
    assert got == expected


def test_cdn_copies_sets_how_many_copies_the_cdn_sends() -> None:
    cands = [Candidate(0, True, (A,), copies=1), Candidate(1, True, (A, B), copies=2)]
    sources = {s.sid: s for s in (src(A, load=2), src(B, load=2), src(CDN, "cdn"))}
    client = ClientState(ME, inflight=frozenset({7}))
    two = Limits(max_inflight=4, peer_uploads=2, cdn_uploads=4, source_fail_limit=3,
                 client_fail_limit=2, cdn_copies=2)
    assert assign(cands, sources, CDN, client, 2, two) == [Decision(0, CDN)]
    assert assign(cands, sources, CDN, client, 2, LIM) == []


def test_rank_leaves_out_excluded_pieces() -> None:
    client = ClientState(ME)
    assert rank(4, Bitmap.of(range(4)), [0, 1, 0, 2], client, 4, rng(), exclude={0, 2}) == [1, 3]


def test_wanted_respects_inflight_cap() -> None:
    assert wanted(ClientState(ME, inflight=frozenset({1, 2, 3})), 4, LIM) == 1
    assert wanted(ClientState(ME, inflight=frozenset({1, 2, 3, 4})), 4, LIM) == 0
    assert wanted(ClientState(ME), 2, LIM) == 2


def test_rank_leaves_out_cdn_only_pieces_while_the_cdn_is_full() -> None:
    # piece 0 and 2 only on the CDN, 1 and 3 have peer holders
    client = ClientState(ME)
    assert rank(4, Bitmap.of(range(4)), [0, 1, 0, 2], client, 4, rng(), cdn_open=False) == [1, 3]
    assert rank(4, Bitmap.of(range(4)), [0, 1, 0, 2], client, 4, rng())[2:] == [1, 3]


def test_rank_picks_the_rarest_level_then_nearest_among_many_ties() -> None:
    client = ClientState(ME, have=Bitmap.of(range(0, 1000, 2)), inflight=frozenset({501}))
    counts = [1] * 1000
    counts[999] = 0
    got = rank(1000, Bitmap.of(range(1000)), counts, client, 3, rng())
    assert got[0] == 999 and set(got[1:]) == {499, 503}


@pytest.mark.parametrize("clients, base, step, expected", [
    (1, 1, 10, 1), (5, 1, 10, 1), (19, 1, 10, 1), (20, 1, 10, 2), (50, 1, 10, 5), (50, 3, 10, 5),
    (5, 3, 10, 3), (50, 1, 0, 50),
])
def test_cdn_copy_limit_grows_with_the_swarm(clients, base, step, expected) -> None:
    assert cdn_copy_limit(clients, Limits(cdn_copies=base, cdn_copies_step=step)) == expected


def test_assign_takes_the_copy_limit_of_the_swarm() -> None:
    cands = [Candidate(0, True, (A, B), copies=2)]
    sources = {s.sid: s for s in (src(A, load=2), src(B, load=2), src(CDN, "cdn"))}
    client = ClientState(ME, inflight=frozenset({7}))
    assert assign(cands, sources, CDN, client, 1, LIM, cdn_copies=3) == [Decision(0, CDN)]
    assert assign(cands, sources, CDN, client, 1, LIM, cdn_copies=2) == []


# --- rank over a prepared rarity order (what a pull uses) ---------------------------------
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from supernode.scheduling.policy import RarityOrder, rank_ordered  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(
    counts=st.lists(st.integers(0, 4), min_size=1, max_size=60),
    have=st.sets(st.integers(0, 59)), inflight=st.sets(st.integers(0, 59), max_size=4),
    cdn=st.sets(st.integers(0, 59)), exclude=st.sets(st.integers(0, 59), max_size=3),
    cdn_open=st.booleans(), limit=st.integers(1, 20), seed=st.integers(0, 1000),
)
def test_rank_ordered_picks_the_same_rarity_levels_as_rank(counts: list[int], have: set[int], inflight: set[int],
                                                          cdn: set[int], exclude: set[int], cdn_open: bool,
                                                          limit: int, seed: int) -> None:
    n = len(counts)
    client = ClientState("c", have=Bitmap.of(have), inflight=frozenset(p for p in inflight if p < n))
    a = rank(n, Bitmap.of(cdn), counts, client, limit, random.Random(seed), cdn_open=cdn_open, exclude=exclude)
    b = rank_ordered(RarityOrder(counts, n), Bitmap.of(cdn), client, limit, random.Random(seed),
                     cdn_open=cdn_open, exclude=exclude)
    assert len(a) == len(b) and len(set(b)) == len(b)
    assert sorted(counts[p] for p in a) == sorted(counts[p] for p in b)  # the rarest first, the same levels
    assert [counts[p] for p in b] == sorted(counts[p] for p in b)  # best first
    for p in b:  # and only pieces this client can be given
        assert p not in have and p not in client.inflight and p not in exclude
        assert counts[p] > 0 or (cdn_open and p in cdn)


def test_rank_ordered_takes_the_nearest_of_a_level_to_the_pieces_in_flight() -> None:
    counts = [1] * 100
    client = ClientState("c", inflight=frozenset({50, 52}))
    got = rank_ordered(RarityOrder(counts, 100), Bitmap(), client, 4, random.Random(1))
    assert got[0] == 51 and set(got[1:3]) == {49, 53} and got[3] in (48, 54)


def _mask(pieces: set[int], count: int = 16) -> int:
    """scheduler.assign_free's piece mask: one byte per piece, piece n is byte n."""
    return int.from_bytes(bytes(1 if n in pieces else 0 for n in range(count)), "little")


def _lowest(common: int) -> int:
    return common.to_bytes(16, "little").find(1)


@pytest.mark.parametrize(
    "name, free, held, sources, client, want, taken, expected",
    [
        ("one piece from each free source, in walk order",
         [A, B], {A: {1, 2}, B: {2, 3}}, [src(A), src(B)], ClientState(ME), 4, {},
         [Decision(1, A), Decision(2, B)]),
        ("a piece taken from one source is not asked of the next",
         [A, B], {A: {2}, B: {2}}, [src(A), src(B)], ClientState(ME), 4, {}, [Decision(2, A)]),
        ("pieces the client holds or has in flight are not missing",
         [A], {A: {1, 2, 3}}, [src(A)], ClientState(ME, have=Bitmap.of([1]), inflight=frozenset({2})), 4, {},
         [Decision(3, A)]),
        ("a source at its cap, counting this round's decisions, is passed over",
         [A, B], {A: {1}, B: {2}}, [src(A, load=1), src(B)], ClientState(ME), 4, {A: 1}, [Decision(2, B)]),
        ("blacklisted, dropped, failing and itself are passed over",
         [A, B, C, ME], {A: {1}, B: {2}, C: {3}, ME: {4}},
         [src(A), SourceState(B, "peer", bad=True), SourceState(C, "peer", failures=5), src(ME)],
         ClientState(ME, blacklist=frozenset({A})), 4, {}, []),
        ("a CDN-only client gets nothing from peers",
         [A], {A: {1}}, [src(A)], ClientState(ME, cdn_only=True), 4, {}, []),
        ("want bounds it",
         [A, B, C], {A: {1}, B: {2}, C: {3}}, [src(A), src(B), src(C)], ClientState(ME), 2, {},
         [Decision(1, A), Decision(2, B)]),
    ],
)
def test_assign_free(name, free, held, sources, client, want, taken, expected) -> None:
    missing = _mask(set(range(16))) & ~_mask(set(client.have.members(16)) | set(client.inflight))
    got = assign_free(free, 0, {s.sid: s for s in sources}, client, want, LIM, missing=missing,
                      holdings=lambda sid: _mask(held.get(sid, set())), pick=_lowest, taken=taken)
    assert got == expected, name


def test_assign_free_walks_round_from_its_start() -> None:
    srcs = {s: src(s) for s in (A, B, C)}
    got = assign_free([A, B, C], 2, srcs, ClientState(ME), 2, LIM, missing=_mask({1, 2, 3}),
                      holdings=lambda sid: _mask({1, 2, 3}), pick=_lowest)
    assert got == [Decision(1, C), Decision(2, A)]


# --- the shell's decisions: deadlines, stale CDN uploads, the CDN as a source, rescue ---------
GRACE = 10_000
ALLOW = 40_000  # every piece's allowance below: its deadline is its start + 40 s


@pytest.mark.parametrize("length, piece_size, n, expected", [
    (10, 4, 0, (0, 3)), (10, 4, 2, (8, 9)),  # the last piece is short
    (-1, 4, 2, (8, 11)),  # unknown length: every piece counts as full
])
def test_piece_bounds(length, piece_size, n, expected) -> None:
    assert piece_bounds(length, piece_size, n) == expected


@pytest.mark.parametrize("length, piece_size, n, min_rate, expected", [
    (8 << 20, 4 << 20, 0, 64 << 10, 94_000),  # 4 MiB at 64 KiB/s: 64 s, plus 30 s
    (5 << 20, 4 << 20, 1, 64 << 10, 46_000),  # the last piece, 1 MiB: 16 s + 30 s
    (-1, 4 << 20, 3, 1 << 20, 34_000),  # unknown length: a full piece
    (10, 10, 0, 3, 33_333),  # rounded down
])
def test_allowance_is_the_bytes_at_the_minimum_rate_plus_slack(length, piece_size, n, min_rate, expected) -> None:
    assert piece_allowance_ms(length, piece_size, n, min_rate) == expected
    start, end = piece_bounds(length, piece_size, n)
    assert allowance_ms(end - start + 1, min_rate) == expected


@pytest.mark.parametrize("name, counts, sending, now, expected_counts, pending", [
    ("nothing sent", [0, 1], [], 0, [0, 1], set()),
    ("a young upload hides a piece nobody holds", [0, 1], [(0, 40_000)], 0, [1, 1], {0}),
    ("...but counts only as a copy where a peer holds it", [0, 1], [(1, 40_000)], 0, [0, 2], set()),
    ("past the grace it hides nothing", [0, 0], [(0, 40_000)], 10_001, [1, 0], set()),
    ("just within the grace", [0, 0], [(0, 40_000)], 9_999, [1, 0], {0}),
    ("two uploads of one piece", [0, 0], [(0, 40_000), (0, 41_000)], 0, [2, 0], {0}),
    ("pieces past the count are ignored", [0], [(5, 40_000)], 0, [0, 0], set()),
    ("short counts are padded", [], [(1, 40_000)], 0, [0, 1], {1}),
])
def test_count_cdn_uploads(name, counts, sending, now, expected_counts, pending) -> None:
    got = count_cdn_uploads(counts, 2, sending, now, lambda n: ALLOW, GRACE)
    assert got == (expected_counts, pending), name


@pytest.mark.parametrize("name, sending, now, expected", [
    ("none", [], 0, float("inf")),
    ("stale in 10 s", [(0, 40_000)], 0, 10.0),
    ("the soonest", [(0, 40_000), (1, 35_000)], 0, 5.0),
    ("already stale ones do not count", [(0, 40_000), (1, 10_000)], 0, 10.0),
    ("at least 50 ms", [(0, 30_010)], 0, 0.05),
])
def test_next_stale(name, sending, now, expected) -> None:
    assert next_stale_s(sending, now, lambda n: ALLOW, GRACE) == expected, name


@pytest.mark.parametrize("cdn, bad, expected", [("", set(), False), (CDN, {CDN}, False), (CDN, {A}, True)])
def test_cdn_open_to_task(cdn, bad, expected) -> None:
    assert cdn_open_to_task(cdn, bad) is expected


@pytest.mark.parametrize("name, task_open, load, taken, blacklist, expected", [
    ("room", True, 2, 1, (), True),
    ("closed to the task", False, 0, 0, (), False),
    ("at its cap with this round's", True, 2, 2, (), False),
    ("on the client's blacklist", True, 0, 0, (CDN,), False),
])
def test_cdn_open_to_a_client(name, task_open, load, taken, blacklist, expected) -> None:
    client = ClientState(ME, blacklist=frozenset(blacklist))
    state = src(CDN, "cdn", load=load)
    assert cdn_open_to(client, task_open, state, {CDN: taken}, Limits(cdn_uploads=4)) is expected, name
    assert not cdn_open_to(client, task_open, None, {}, Limits())


@pytest.mark.parametrize("count, held, inflight, expected", [
    (100, 30, 5, True), (100, 30, 6, False), (64, 0, 0, False), (65, 0, 0, True),
])
def test_source_first_until_the_endgame(count, held, inflight, expected) -> None:
    have = Bitmap(bytes([0xFF] * (held // 8)) + bytes([(0xFF00 >> (held % 8)) & 0xFF]))
    client = ClientState(ME, have=have, inflight=frozenset(range(90, 90 + inflight)))
    assert client.have.count() == held
    assert source_first(count, client) is expected


@pytest.mark.parametrize("name, first, inflight, failures, cdn_only, copies, expected", [
    ("the limit", False, (), 0, False, 5, 2),
    ("rescue: the first piece of a client with nothing in flight", True, (), 0, False, 5, 6),
    ("...never below the limit", True, (), 0, False, 0, 2),
    ("no rescue with pieces in flight", True, (7,), 0, False, 5, 2),
    ("CDN-only clients are not limited", True, (), 0, True, 5, 0),
    ("nor clients past the failure limit", False, (), 6, False, 5, 0),
])
def test_claim_copies(name, first, inflight, failures, cdn_only, copies, expected) -> None:
    client = ClientState(ME, inflight=frozenset(inflight), failures=failures, cdn_only=cdn_only)
    assert claim_copies(first, client, copies, 2, Limits(client_fail_limit=5)) == expected, name


@pytest.mark.parametrize("name, held, counts, draws, expected", [
    ("the rarest of those found", [0, 1, 0, 1, 1], [9, 3, 9, 1, 2], [0, 2, 4], 3),
    ("found from each point on", [1, 0, 0, 1, 0], [5, 9, 9, 4, 9], [1, 1, 1], 3),
    ("wrapping round past the last", [1, 0, 0, 0, 0], [5, 9, 9, 9, 9], [3, 4, 9], 0),
    ("ties go to the first found", [0, 1, 0, 1, 0], [9, 2, 9, 2, 9], [2, 0, 2], 3),
])
def test_rarest_sampled(name, held, counts, draws, expected) -> None:
    it = iter(draws)
    assert rarest_sampled(bytes(held), counts, lambda bits: next(it), len(draws)) == expected, name


@pytest.mark.parametrize("source, reason, expected", [
    (A, "timeout", True), (A, "digest", True), (CDN, "refused", True), (CDN, "timeout", True),
    (CDN, "digest", False), (CDN, "not_found", False),
])
def test_failure_blacklists_but_bad_bytes_from_the_cdn(source, reason, expected) -> None:
    assert failure_blacklists(source, CDN, reason) is expected
