"""The Lua scripts (supernode/store/scripts.py), run one at a time through the Repo, on
the embedded store (fakeredis) and on the real Redis (the `redis` half, REDIS_URL).

Each test states one promise a script makes: what it claims, what it refuses, what a
repeat changes (nothing), and that every change is numbered and published once.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from redis.crc import key_slot

from common import wire
from common.taskid import new_id
from supernode.store import keys, scripts
from supernode.store.connection import Store, connect
from supernode.store.repo import PeerInfo, Repo, ReportRefused, now_ms

FAR = 2**42  # a deadline that never passes
CAPS = {"max_inflight": 8, "peer_cap": 8, "cdn_cap": 8}


@dataclass
class Env:
    """A task of 4 pieces of 1 KiB on store `repo`, every piece on the CDN `cdn`, with
    clients a, b and c (no pieces yet). `events` collects every change log the scripts
    returned, in order."""

    repo: Repo
    tid: str
    cdn: str
    a: str
    b: str
    c: str
    events: list[str] = field(default_factory=list)

    @property
    def r(self):  # type: ignore[no-untyped-def]
        return self.repo.r

    def seqs(self) -> list[int]:
        return [int(ev.partition("\n")[0]) for ev in self.events]

    async def claim(self, cid: str, *items: tuple[int, str, str, int, int], **caps: int) -> list[int]:
        return await self.repo.claim(self.tid, cid, list(items), **{**CAPS, **caps})

    async def give(self, cid: str, *pieces: int) -> None:
        """cid fetches `pieces` from the CDN and reports them done."""
        assert await self.claim(cid, *[(n, self.cdn, "cdn", FAR, 0) for n in pieces]) == list(pieces)
        status, _ = await self.repo.report(
            self.tid, cid, [wire.Report(n, "ok", self.cdn) for n in pieces], source_fail_limit=3)
        assert status == "ok"

    async def report(self, cid: str, *reports: wire.Report, limit: int = 3) -> tuple[str, str]:
        return await self.repo.report(self.tid, cid, list(reports), source_fail_limit=limit)

    async def fly(self, cid: str) -> dict[int, str]:
        raw = await self.r.hgetall(keys.inflight(self.tid, cid))
        return {int(p): e.decode().partition("|")[0] for p, e in raw.items()}

    async def uploads(self, source: str) -> list[str]:
        return sorted(m.decode() for m in await self.r.zrange(keys.uploads(self.tid, source), 0, -1))

    async def holders(self, piece: int) -> set[str]:
        return {m.decode() for m in await self.r.smembers(keys.holders(self.tid, piece))}

    async def count(self, piece: int) -> int:
        return int((await self.r.bitfield(keys.counts(self.tid)).get("u16", f"#{piece}").execute())[0])

    async def task_keys(self) -> set[str]:
        return {k.decode() for k in await self.r.keys(keys.task_prefix(self.tid).replace("{", "[{]") + "*")}


async def _registered(repo: Repo, tid: str) -> tuple[str, str]:
    return await repo.register_task(tid, url="http://o/f", url_key="http://o/f", md5="", identifier="",
                                    range_="", headers={}, fail_interval_ms=60_000)


@pytest.fixture
async def env(store_url: str | None) -> AsyncIterator[Env]:
    store = Store(connect(store_url))
    e = Env(Repo(store), new_id() * 2, new_id(), new_id(), new_id(), new_id())
    store.on_event = lambda _task, ev: e.events.append(ev)
    try:
        await _registered(e.repo, e.tid)
        await e.repo.set_meta(e.tid, status="fetching", length=4096, piece_size=1024, piece_count=4, cdn=e.cdn)
        await e.repo.publish_pieces(e.tid, e.cdn, [(n, f"{n:064x}") for n in range(4)])
        for i, cid in enumerate((e.a, e.b, e.c)):
            await e.repo.add_peer(e.tid, cid, PeerInfo(new_id(), f"127.0.0.{i + 2}", 1, "peer"))
        yield e
    finally:
        await store.close()


# --- where key names come from -------------------------------------------------------------
def test_no_key_name_is_spelt_in_the_lua() -> None:
    for name, src in scripts.ALL.items():
        body = src.split("local meta = KEYS[1]", 1)[-1]  # after the constants from keys.py
        assert "k('" not in body and "'df:" not in body, name
    assert f"local HAVE = '{keys.HAVE}'" in scripts.PULL


async def test_every_key_the_scripts_write_is_a_keys_py_name_in_the_task_slot(env: Env) -> None:
    await env.give(env.a, 0)
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0), (1, env.cdn, "cdn", FAR, 0)) == [0, 1]
    await env.report(env.c, wire.Report(3, "have"))
    await env.report(env.b, wire.Report(0, "failed", env.a, "refused"))
    t, named = env.tid, set()
    for cid in (env.a, env.b, env.c, env.cdn):
        named |= {keys.have(t, cid), keys.inflight(t, cid), keys.uploads(t, cid), keys.blacklist(t, cid)}
    named |= {keys.holders(t, n) for n in range(4)}
    named |= {keys.meta(t), keys.digests(t), keys.cdnmap(t), keys.counts(t), keys.peers(t), keys.fails(t),
              keys.client_fails(t), keys.bad(t), keys.sequence(t)}
    written = await env.task_keys()
    assert written <= named
    assert {keys.meta(t), keys.have(t, env.a), keys.inflight(t, env.b), keys.uploads(t, env.cdn),
            keys.blacklist(t, env.b), keys.sequence(t), keys.holders(t, 0)} <= written
    assert {key_slot(k.encode()) for k in written} == {key_slot(keys.events(t).encode())}


# --- sequence numbers and publication ------------------------------------------------------
async def test_every_change_has_the_next_number_and_is_published_as_returned(env: Env) -> None:
    pubsub = env.r.pubsub()
    await pubsub.subscribe(keys.events(env.tid))
    await pubsub.get_message(timeout=1.0)  # the subscription's confirmation
    first = len(env.events)
    await env.give(env.a, 0, 1)
    await env.repo.release(env.tid, env.b)  # nothing in flight: no change, no number
    await env.report(env.a, wire.Report(0, "ok", env.cdn))  # a repeat: no change either
    await env.repo.unpublish_pieces(env.tid, [3])
    got = []
    while (msg := await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)) is not None:
        got.append(msg["data"].decode())
    await pubsub.aclose()
    assert env.seqs() == list(range(1, len(env.events) + 1))
    assert got == env.events[first:] and len(got) == 3  # claim, report, unpublish
    assert got[-1].split("\n")[1:] == ["U 3"]
    assert int(await env.r.get(keys.sequence(env.tid))) == len(env.events)


# --- register_task -------------------------------------------------------------------------
async def test_register_tells_new_exists_and_conflict(env: Env) -> None:
    assert await _registered(env.repo, env.tid) == ("exists", "fetching")
    other = await env.repo.register_task(env.tid, url="http://o/f", url_key="http://o/g", md5="", identifier="",
                                         range_="", headers={}, fail_interval_ms=1)
    assert other == ("conflict", "fetching")
    assert await _registered(env.repo, new_id() * 2) == ("new", "pending")


async def test_a_failed_task_is_registered_afresh_only_after_the_interval(env: Env) -> None:
    await env.give(env.a, 0)
    await env.repo.set_meta(env.tid, status="failed", failed_ms=now_ms())
    assert await _registered(env.repo, env.tid) == ("exists", "failed")  # 60 s not over
    again = await env.repo.register_task(env.tid, url="http://o/f", url_key="http://o/f", md5="", identifier="",
                                         range_="", headers={}, fail_interval_ms=0)
    assert again == ("new", "pending")
    assert await env.task_keys() == {keys.meta(env.tid), keys.sequence(env.tid)}  # the old state is gone
    assert env.events[-1].split("\n")[1:] == ["Z", "M"]


async def test_scripts_on_a_task_that_is_gone_change_nothing(env: Env) -> None:
    gone = new_id() * 2
    assert not await env.repo.add_peer(gone, env.a, PeerInfo("p", "127.0.0.9", 1, "peer"))
    assert not await env.repo.set_meta(gone, status="success")
    assert not await env.repo.finish_task(gone, env.cdn, {"status": "success"}, [(0, "d")])
    assert not await env.repo.adopt_cdn(gone, env.cdn, [(0, "d")])
    assert await env.repo.report(gone, env.a, [wire.Report(0, "ok", env.cdn)], source_fail_limit=3) == (
        "unknown_task", "")
    assert await env.repo.claim(gone, env.a, [(0, env.cdn, "cdn", FAR, 0)], **CAPS) == []
    assert await env.r.keys(keys.task_prefix(gone).replace("{", "[{]") + "*") == []


# --- CDN pieces ----------------------------------------------------------------------------
async def test_unpublished_pieces_keep_their_digests_and_are_not_assigned(env: Env) -> None:
    await env.repo.unpublish_pieces(env.tid, [1])
    assert (await env.repo.cdn_bitmap(env.tid)).members(4) == [0, 2, 3]
    assert await env.claim(env.a, (1, env.cdn, "cdn", FAR, 0), (2, env.cdn, "cdn", FAR, 0)) == [2]
    await env.repo.unpublish_pieces(env.tid, [])
    assert (await env.repo.cdn_bitmap(env.tid)).members(4) == []
    assert sorted(await env.repo.digests(env.tid)) == [0, 1, 2, 3]


async def test_finish_sets_meta_and_every_digest_in_one_step(env: Env) -> None:
    tid = new_id() * 2
    await _registered(env.repo, tid)
    assert await env.repo.finish_task(tid, env.cdn, {"status": "success", "piece_count": 2, "cdn": env.cdn},
                                      [(0, "d0"), (1, "d1")])
    meta = await env.repo.get_meta(tid)
    assert meta is not None and (meta.status, meta.piece_count, meta.cdn) == ("success", 2, env.cdn)
    assert await env.repo.digests(tid) == {0: "d0", 1: "d1"}
    assert (await env.repo.cdn_bitmap(tid)).members(2) == [0, 1]


async def test_adopting_a_cdn_drops_the_old_copy(env: Env) -> None:
    new = new_id()
    assert await env.repo.adopt_cdn(env.tid, new, [(2, f"{2:064x}")])
    meta = await env.repo.get_meta(env.tid)
    assert meta is not None and (meta.cdn, meta.status) == (new, "fetching")
    assert (await env.repo.cdn_bitmap(env.tid)).members(4) == [2]
    assert env.events[-1].split("\n")[1:] == ["A"]  # views reload
    assert await env.claim(env.a, (0, env.cdn, "cdn", FAR, 0), (2, new, "cdn", FAR, 0)) == [2]
    await env.repo.set_meta(env.tid, status="success")
    assert await env.repo.adopt_cdn(env.tid, env.cdn, [])
    assert (await env.repo.get_meta(env.tid)).status == "success"  # type: ignore[union-attr]
    await env.repo.set_meta(env.tid, status="failed")
    assert not await env.repo.adopt_cdn(env.tid, new, [])


# --- claims --------------------------------------------------------------------------------
async def test_a_claim_needs_a_source_that_holds_the_piece(env: Env) -> None:
    await env.give(env.a, 0)
    b, cdn = env.b, env.cdn
    assert await env.claim(b, (1, env.a, "peer", FAR, 0)) == []  # a does not hold 1
    assert await env.claim(b, (1, env.c, "cdn", FAR, 0)) == []  # c is not the task's CDN
    assert await env.claim(b, (1, new_id(), "peer", FAR, 0)) == []  # not a client of the task
    assert await env.claim(env.a, (0, cdn, "cdn", FAR, 0)) == []  # a holds 0 already
    assert await env.claim(b, (0, b, "peer", FAR, 0)) == []  # never from itself
    assert await env.claim(b, (0, env.a, "peer", FAR, 0), (0, cdn, "cdn", FAR, 0)) == [0]  # once
    assert await env.claim(new_id(), (1, cdn, "cdn", FAR, 0)) == []  # unknown client
    assert await env.fly(b) == {0: env.a} and await env.uploads(env.a) == [f"{b}:0"]


async def test_blacklisted_and_dropped_sources_are_not_claimed(env: Env) -> None:
    await env.give(env.a, 0, 1)
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0)) == [0]
    assert await env.report(env.b, wire.Report(0, "failed", env.a, "refused"), limit=2) == ("ok", "0")
    assert await env.claim(env.b, (1, env.a, "peer", FAR, 0)) == []  # b's blacklist
    assert await env.claim(env.c, (1, env.a, "peer", FAR, 0)) == [1]  # not c's
    assert await env.report(env.c, wire.Report(1, "failed", env.a, "timeout"), limit=2) == ("ok", "0")
    assert await env.r.smembers(keys.bad(env.tid)) == {env.a.encode()}  # 2 failures: dropped
    d = new_id()
    await env.repo.add_peer(env.tid, d, PeerInfo("pd", "127.0.0.9", 1, "peer"))
    assert await env.claim(d, (0, env.a, "peer", FAR, 0)) == []  # for everyone


async def test_upload_slots_are_capped_per_source(env: Env) -> None:
    await env.give(env.a, 0, 1)
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0), peer_cap=1) == [0]
    assert await env.claim(env.c, (1, env.a, "peer", FAR, 0), peer_cap=1) == []
    assert await env.claim(env.c, (1, env.a, "peer", FAR, 0), peer_cap=2) == [1]
    assert await env.claim(env.b, (2, env.cdn, "cdn", FAR, 0), cdn_cap=1) == [2]
    assert await env.claim(env.c, (2, env.cdn, "cdn", FAR, 0), cdn_cap=1) == []
    assert await env.claim(env.c, (3, env.cdn, "cdn", FAR, 0), peer_cap=1, cdn_cap=2) == [3]


async def test_an_upload_past_its_deadline_frees_its_slot(env: Env) -> None:
    await env.give(env.a, 0, 1)
    assert await env.claim(env.b, (0, env.a, "peer", now_ms() - 1000, 0), peer_cap=1) == [0]
    assert await env.claim(env.c, (1, env.a, "peer", FAR, 0), peer_cap=1) == [1]
    assert await env.uploads(env.a) == [f"{env.c}:1"]


async def test_a_client_gets_no_more_than_its_room_and_expired_ones_make_room(env: Env) -> None:
    got = await env.claim(env.a, *[(n, env.cdn, "cdn", now_ms() - 1000, 0) for n in range(3)], max_inflight=2)
    assert got == [0, 1]
    assert await env.claim(env.a, (2, env.cdn, "cdn", FAR, 0), (3, env.cdn, "cdn", FAR, 0), max_inflight=2) == [2, 3]
    assert await env.fly(env.a) == {2: env.cdn, 3: env.cdn}  # 0 and 1 were over: released first
    assert await env.uploads(env.cdn) == [f"{env.a}:2", f"{env.a}:3"]
    assert f"R {env.a} 0" in env.events[-1] and f"T {env.a} 3 {env.cdn}" in env.events[-1]


async def test_super_seeding_counts_holders_and_the_cdn_transfers_in_flight(env: Env) -> None:
    cdn = env.cdn
    assert await env.claim(env.a, (0, cdn, "cdn", FAR, 1)) == [0]
    assert await env.claim(env.b, (0, cdn, "cdn", FAR, 1)) == []  # a's transfer is the one copy
    assert await env.report(env.a, wire.Report(0, "ok", cdn)) == ("ok", "1")
    assert await env.claim(env.b, (0, cdn, "cdn", FAR, 1)) == []  # a's piece is the one copy
    assert await env.claim(env.b, (0, cdn, "cdn", FAR, 2)) == [0]
    assert await env.claim(env.c, (0, cdn, "cdn", FAR, 2)) == []
    assert await env.claim(env.c, (0, cdn, "cdn", FAR, 0)) == [0]  # 0: no limit
    assert await env.claim(env.c, (0, env.a, "peer", FAR, 1)) == []  # in flight already


async def test_pulls_batched_in_one_call_each_see_the_ones_before(env: Env) -> None:
    before = len(env.events)
    res = await env.repo.pull_many(env.tid, [
        (env.a, [], [(1, env.cdn, "cdn", FAR, 1)]),
        (env.b, [wire.Report(2, "ok", env.cdn)], [(2, env.cdn, "cdn", FAR, 0)]),  # never assigned
        (env.c, [], [(1, env.cdn, "cdn", FAR, 1), (3, env.cdn, "cdn", FAR, 1)]),
    ], source_fail_limit=3, **CAPS)
    assert res[0] == [1] and res[2] == [3]
    assert isinstance(res[1], ReportRefused) and (res[1].status, res[1].value) == ("not_assigned", "2")
    assert await env.fly(env.b) == {}  # a refused pull changes nothing
    assert len(env.events) == before + 1  # one number for the whole batch


# --- reports -------------------------------------------------------------------------------
async def test_a_piece_done_makes_a_holder_and_frees_the_slot(env: Env) -> None:
    assert await env.claim(env.a, (0, env.cdn, "cdn", FAR, 0), (1, env.cdn, "cdn", FAR, 0)) == [0, 1]
    assert await env.report(env.a, wire.Report(0, "ok", env.cdn)) == ("ok", "1")
    assert await env.fly(env.a) == {1: env.cdn} and await env.uploads(env.cdn) == [f"{env.a}:1"]
    assert await env.holders(0) == {env.a} and await env.count(0) == 1
    assert env.events[-1].split("\n")[1:] == [f"R {env.a} 0", f"H {env.a} 0"]


async def test_a_repeated_report_changes_nothing(env: Env) -> None:
    await env.give(env.a, 0)
    before = list(env.events)
    assert await env.report(env.a, wire.Report(0, "ok", env.cdn)) == ("ok", "1")
    assert await env.report(env.a, wire.Report(0, "failed", env.cdn, "refused")) == ("ok", "1")
    assert env.events == before and await env.count(0) == 1
    assert await env.r.smembers(keys.blacklist(env.tid, env.a)) == set()


async def test_a_held_piece_reported_voids_its_assignment(env: Env) -> None:
    assert await env.claim(env.a, (2, env.cdn, "cdn", FAR, 0)) == [2]
    assert await env.report(env.a, wire.Report(2, "have")) == ("ok", "1")
    assert await env.fly(env.a) == {} and await env.uploads(env.cdn) == [] and await env.holders(2) == {env.a}


async def test_bad_bytes_from_the_cdn_count_against_it_but_do_not_blacklist_it(env: Env) -> None:
    assert await env.claim(env.a, (0, env.cdn, "cdn", FAR, 0), (1, env.cdn, "cdn", FAR, 0)) == [0, 1]
    assert await env.report(env.a, wire.Report(0, "failed", env.cdn, "digest"), limit=1) == ("ok", "0")
    assert await env.r.hget(keys.fails(env.tid), env.cdn) == b"1"
    assert await env.r.smembers(keys.bad(env.tid)) == set()
    assert await env.r.smembers(keys.blacklist(env.tid, env.a)) == set()
    assert await env.claim(env.a, (0, env.cdn, "cdn", FAR, 0)) == [0]  # still the source of last resort
    assert await env.report(env.a, wire.Report(1, "failed", env.cdn, "refused"), limit=9) == ("ok", "0")
    assert await env.r.smembers(keys.blacklist(env.tid, env.a)) == {env.cdn.encode()}  # unreachable
    assert await env.r.hget(keys.client_fails(env.tid), env.a) == b"1"


@pytest.mark.parametrize(("report", "who", "refusal"), [
    (wire.Report(0, "ok", "x" * 32), "a", ("not_assigned", "0")),  # nothing in flight
    (wire.Report(1, "ok", "x" * 32), "a", ("not_assigned", "1")),  # in flight from the CDN, not x
    (wire.Report(9, "ok", None), "a", ("out_of_range", "9")),
    (wire.Report(0, "ok", None), "new", ("unknown_client", "")),
])
async def test_reports_refused_change_nothing(env: Env, report: wire.Report, who: str,
                                              refusal: tuple[str, str]) -> None:
    assert await env.claim(env.a, (1, env.cdn, "cdn", FAR, 0)) == [1]
    before = len(env.events)
    cid = env.a if who == "a" else new_id()
    assert await env.report(cid, wire.Report(1, "ok", env.cdn), report) == refusal  # all or nothing
    assert await env.fly(env.a) == {1: env.cdn} and await env.holders(1) == set()
    assert len(env.events) == before


async def test_a_held_piece_needs_a_known_digest(env: Env) -> None:
    tid = new_id() * 2
    await _registered(env.repo, tid)
    await env.repo.add_peer(tid, env.a, PeerInfo("pa", "127.0.0.2", 1, "peer"))
    res = await env.repo.report(tid, env.a, [wire.Report(0, "have")], source_fail_limit=3)
    assert res == ("bad_piece", "0")
    with pytest.raises(ReportRefused):
        await env.repo.pull(tid, env.a, [wire.Report(0, "have")], [], source_fail_limit=3, **CAPS)


# --- leaving -------------------------------------------------------------------------------
async def test_release_frees_every_assignment_of_a_client(env: Env) -> None:
    await env.give(env.a, 0)
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0), (1, env.cdn, "cdn", FAR, 0)) == [0, 1]
    assert await env.repo.release(env.tid, env.b) == 2
    assert await env.fly(env.b) == {} and await env.uploads(env.a) == [] and await env.uploads(env.cdn) == []
    assert await env.repo.release(env.tid, env.b) == 0


async def test_a_client_removed_takes_its_pieces_slots_and_keys(env: Env) -> None:
    await env.give(env.a, 0, 1)
    assert await env.claim(env.a, (2, env.cdn, "cdn", FAR, 0)) == [2]
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0)) == [0]
    await env.repo.remove_clients(env.tid, [env.a])
    assert await env.holders(0) == set() and await env.count(0) == 0 and await env.count(1) == 0
    assert await env.uploads(env.cdn) == []  # a's download from the CDN
    left = await env.task_keys()
    assert not {keys.have(env.tid, env.a), keys.inflight(env.tid, env.a), keys.uploads(env.tid, env.a)} & left
    assert env.a not in await env.repo.all_clients(env.tid)
    assert env.events[-1].split("\n")[-1] == f"D {env.a}"
    assert await env.claim(env.c, (1, env.a, "peer", FAR, 0)) == []


async def test_deleting_a_task_leaves_only_its_sequence_number(env: Env) -> None:
    await env.give(env.a, 0)
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0)) == [0]
    await env.report(env.c, wire.Report(1, "failed", env.cdn, "refused"))  # not assigned: refused
    await env.repo.delete_task(env.tid)
    assert await env.task_keys() == {keys.sequence(env.tid)}  # numbers go on after a re-register
    assert env.events[-1].split("\n")[1:] == ["Z"]
    assert await _registered(env.repo, env.tid) == ("new", "pending")
    assert env.seqs() == list(range(1, len(env.events) + 1))


# --- reads ---------------------------------------------------------------------------------
async def test_detail_leaves_out_sources_at_their_cap(env: Env) -> None:
    await env.give(env.a, 0)
    await env.give(env.b, 0)
    assert await env.claim(env.c, (0, env.a, "peer", FAR, 0)) == [0]
    d = await env.repo.detail(env.tid, env.cdn, [0, 3], 8, peer_cap=1, cdn_cap=1)
    assert set(d.holders[0]) == {env.a, env.b} and d.holders[1] == ()
    assert d.digests == [f"{0:064x}", f"{3:064x}"]
    assert set(d.sources) == {env.cdn, env.b}  # a has its one upload going
    assert d.sources[env.b].load == 0 and d.addresses[env.b].ip == "127.0.0.3"
    d = await env.repo.detail(env.tid, env.cdn, [0], 8, peer_cap=2, cdn_cap=0)
    assert set(d.sources) == {env.a, env.b} and d.sources[env.a].load == 1


async def test_a_view_load_reads_everything_at_one_number(env: Env) -> None:
    await env.give(env.a, 0)
    assert await env.claim(env.b, (0, env.a, "peer", FAR, 0)) == [0]
    v = await env.repo.load_view(env.tid)
    assert v is not None and v["seq"] == len(env.events)
    clients = {c[0]: c for c in v["clients"]}
    assert set(clients) == {env.a, env.b, env.c} and clients[env.b][3] == {0: (env.a, FAR)}
    assert v["digests"][3] == f"{3:064x}" and v["meta"].cdn == env.cdn
    assert await env.repo.load_view(new_id() * 2) is None


# --- leases --------------------------------------------------------------------------------
async def test_only_the_lease_holder_renews_or_releases_it(env: Env) -> None:
    assert await env.repo.take_lease(env.tid, "sn1", 10_000)
    assert not await env.repo.take_lease(env.tid, "sn2", 10_000)
    assert not await env.repo.keep_lease(env.tid, "sn2", 60_000)
    assert not await env.repo.keep_lease(env.tid, "sn2", 0)
    assert await env.repo.keep_lease(env.tid, "sn1", 60_000)
    assert 10_000 < await env.repo.lease_ttl_ms(env.tid) <= 60_000
    assert await env.repo.keep_lease(env.tid, "sn1", 0)
    assert await env.repo.lease_holder(env.tid) is None
    assert not await env.repo.keep_lease(env.tid, "sn1", 60_000)


def test_key_parts_that_cannot_be_quoted_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(keys.SCRIPT_SUFFIXES, "HAVE", "ha've:")
    with pytest.raises(ValueError, match="HAVE"):
        scripts._lua_constants()
    assert re.search(r"local HAVE = 'have:'", scripts._PRELUDE)
