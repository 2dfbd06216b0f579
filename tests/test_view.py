"""The in-process view of a task (supernode/scheduling/view.py): replaying the change log the scripts
write, in order, whatever order it arrives in; and (against the store) that a view
replayed from events equals one loaded afresh."""

from __future__ import annotations

import pytest

from common import wire
from common.taskid import new_id
from supernode.store.repo import PeerInfo, Repo
from supernode.store.connection import Store, connect
from supernode.scheduling.view import GAP_TIMEOUT, ClientRec, Flags, TaskView, after_reports

A, B, CDN = "a" * 32, "b" * 32, "c" * 32


def _view() -> TaskView:
    v = TaskView("t" * 64)
    v.apply([f"P {A} pa|127.0.0.2|1|peer", f"P {B} pb|127.0.0.3|1|peer", "G 0 d0", "G 1 d1"])
    return v


def test_ops_build_holders_counts_and_loads() -> None:
    v = _view()
    assert v.cdn.members(2) == [0, 1] and v.digests == {0: "d0", 1: "d1"}
    v.apply([f"T {A} 0 {CDN} 5000", f"T {B} 1 {CDN} 5000"])
    assert v.load_of(CDN, 1000) == 2
    assert v.apply([f"R {A} 0", f"H {A} 0"]) == 2  # a free slot and a new holder
    assert v.counts[0] == 1 and v.holders_of(0, 8, 0) == [A]
    assert v.load_of(CDN, 1000) == 1 and v.clients[A].fly == {}
    v.apply([f"T {B} 0 {A} 5000"])
    assert v.load_of(A, 1000) == 1 and v.sending(CDN, 1000) == [(1, 5000)]
    assert v.load_of(CDN, 6000) == 0  # past its deadline an upload no longer counts
    v.apply([f"D {A}"])  # a client leaves: its pieces, assignments and uploads go with it
    assert v.counts[0] == 0 and v.holders_of(0, 8, 0) == [] and v.load_of(A, 1000) == 0
    assert v.apply(["M"]) == -1 and v.meta_stale


def test_failures_blacklist_and_drop() -> None:
    v = _view()
    v.apply([f"B {A} {B}", f"F {B}", f"C {A}", f"X {B}"])
    assert v.clients[A].bl == {B} and v.fails == {B: 1} and v.clients[A].fails == 1 and v.bad == {B}
    v.apply(["U 1"])
    assert v.cdn.members(2) == [0]
    v.apply(["U"])
    assert v.cdn.members(2) == []


def test_events_apply_in_sequence_order_whatever_the_arrival_order() -> None:
    v = _view()
    events = [(1, [f"H {A} 0"]), (2, [f"H {B} 0"]), (3, [f"H {A} 1"]), (4, [f"D {B}"])]
    for seq, ops in [events[2], events[0], events[3], events[1], events[0]]:  # shuffled, one repeated
        v.offer(seq, ops, now=0.0)
    assert v.seq == 4 and not v.pending and v.gap_since is None
    assert v.counts[:2] == [1, 1] and set(v.clients) == {A}


def test_a_gap_that_is_not_filled_expires() -> None:
    v = _view()
    v.offer(2, [f"H {A} 0"], now=10.0)
    assert v.seq == 0 and not v.gap_expired(10.0 + GAP_TIMEOUT / 2)
    assert v.gap_expired(10.0 + GAP_TIMEOUT * 2)


def test_flags_read_a_redis_bitmap() -> None:
    f = Flags.of_bitmap(bytes([0b1010_0000, 0b0000_0001]))
    assert f.members(16) == [0, 2, 15] and f.count() == 3 and 2 in f and 3 not in f
    assert f.add(3) and not f.add(3) and f.count() == 4


@pytest.mark.redis
async def test_a_view_replayed_from_events_equals_a_fresh_load(redis_url: str | None) -> None:
    store = Store(connect(redis_url))
    repo = Repo(store)
    tid = new_id() * 2
    live: TaskView | None = None

    def feed(task: str, ev: str) -> None:
        head, _, rest = ev.partition("\n")
        if live is not None:
            live.offer(int(head), rest.split("\n"), 0.0)

    store.on_event = feed
    try:
        await repo.register_task(tid, url="http://o/f", url_key="http://o/f", md5="", identifier="", range_="",
                                 headers={}, fail_interval_ms=1000)
        cdn, a, b = new_id(), new_id(), new_id()
        await repo.set_meta(tid, status="fetching", length=4096, piece_size=1024, piece_count=4, cdn=cdn)
        live = TaskView.load(**(await repo.load_view(tid)))  # type: ignore[arg-type]
        await repo.publish_pieces(tid, cdn, [(n, f"{n:064x}") for n in range(4)])
        await repo.add_peer(tid, a, PeerInfo(new_id(), "127.0.0.2", 1, "peer"))
        await repo.add_peer(tid, b, PeerInfo(new_id(), "127.0.0.3", 1, "peer"))
        far = 2**42
        assert await repo.claim(tid, a, [(0, cdn, "cdn", far, 0), (1, cdn, "cdn", far, 0)], max_inflight=4,
                                peer_cap=5, cdn_cap=4) == [0, 1]
        assert await repo.pull(tid, a, [wire.Report(0, "ok", cdn), wire.Report(1, "failed", cdn, "refused")],
                               [], max_inflight=4, peer_cap=5, cdn_cap=4, source_fail_limit=5) == []
        assert await repo.claim(tid, b, [(0, a, "peer", far, 0), (2, cdn, "cdn", far, 0)], max_inflight=4,
                                peer_cap=5, cdn_cap=4) == [0, 2]
        await repo.remove_clients(tid, [a])
        fresh = TaskView.load(**(await repo.load_view(tid)))  # type: ignore[arg-type]
        assert live.seq == fresh.seq
        pad = [0, 0, 0, 0]
        assert (live.counts + pad)[:4] == (fresh.counts + pad)[:4] and set(live.clients) == set(fresh.clients) == {b}
        assert live.clients[b].fly == fresh.clients[b].fly and live.cdn.members(4) == fresh.cdn.members(4)
        assert live.fails == fresh.fails and live.digests == fresh.digests
        assert {s: len(u) for s, u in live.uploads.items() if u} == {s: len(u) for s, u in fresh.uploads.items() if u}
        await repo.delete_task(tid)
        assert live.deleted
    finally:
        await store.close()


def test_holders_behind_a_run_of_clients_that_left_are_found() -> None:
    v = _view()
    leavers = [f"{k:032x}" for k in range(12)]
    v.apply([f"P {c} p|127.0.0.9|1|peer" for c in leavers] + [f"H {c} 0" for c in leavers])
    v.apply([f"H {A} 0"] + [f"D {c}" for c in leavers])  # A's entry sits behind 12 that left
    assert v.counts[0] == 1
    for start in range(20):
        assert v.holders_of(0, 4, start) == [A]


def test_free_sources_follow_holdings_uploads_and_departures() -> None:
    v = TaskView("t" * 64, peer_cap=2)
    v.apply([f"P {A} pa|127.0.0.2|1|peer", f"P {B} pb|127.0.0.3|1|peer", "G 0 d0", "G 1 d1"])
    assert v.free == set()  # nobody holds anything yet
    v.apply([f"H {A} 0", f"H {B} 1"])
    assert v.free == {A, B} and v.free_holders_of(0, 4, 0) == [A]
    v.apply([f"T {B} 0 {A} 5000", f"T {CDN} 0 {A} 5000"])  # A at its cap of 2
    assert v.free == {B} and v.free_holders_of(0, 4, 0) == []
    v.apply([f"R {B} 0"])
    assert v.free == {A, B}
    v.apply([f"T {B} 0 {A} 5000"])
    assert A not in v.free
    v.expire(6000)  # both uploads ran past their deadline: A serves again
    assert A in v.free
    v.apply([f"D {A}"])
    assert v.free == {B} and v.free_holders_of(0, 4, 0) == []


def test_expire_frees_each_source_when_its_first_upload_ends_and_not_before() -> None:
    v = TaskView("t" * 64, peer_cap=1)
    v.apply([f"P {A} pa|127.0.0.2|1|peer", f"P {B} pb|127.0.0.3|1|peer", "G 0 d0", "G 1 d1",
             f"H {A} 0", f"H {B} 1"])
    v.apply([f"T {B} 0 {A} 9000", f"T {A} 1 {B} 3000"])  # both at their cap of 1
    assert v.free == set()
    v.expire(2999)
    assert v.free == set()
    v.expire(3000)  # B's upload is due; A's is not
    assert v.free == {B} and v.load_of(B, 3000) == 0 and v.load_of(A, 3000) == 1
    v.apply([f"R {B} 0", f"T {B} 0 {A} 4000"])  # A's upload ended and a shorter one began
    v.expire(4000)
    assert v.free == {A, B} and v.earliest == {}  # nothing in flight, nothing left to expire
    v.apply([f"T {B} 0 {A} 5000", f"D {A}"])  # a source that left takes its uploads along
    v.expire(10_000)
    assert v.free == {B} and v.earliest == {}


def test_a_client_that_serves_nobody_is_never_free() -> None:
    v = TaskView("t" * 64, peer_cap=2)
    v.apply([f"P {A} pa|127.0.0.2|1|cdn", "G 0 d0", f"H {A} 0"])
    assert v.free == set()


def _rec() -> ClientRec:
    rec = ClientRec(A, PeerInfo("pa", "127.0.0.2", 1, "peer"))
    rec.have.add(0)
    rec.fly = {1: (CDN, 5000), 2: (B, 5000), 3: (B, 500)}
    return rec


@pytest.mark.parametrize("name, reports, have, inflight, blacklist, failures", [
    ("no reports: what is in flight and not past its deadline", [], [0], {1, 2}, set(), 0),
    ("a piece done", [wire.Report(1, "ok", CDN)], [0, 1], {2}, set(), 0),
    ("a piece done that was not assigned: nothing", [wire.Report(5, "ok", CDN)], [0], {1, 2}, set(), 0),
    ("a piece held", [wire.Report(5, "have")], [0, 5], {1, 2}, set(), 0),
    ("a peer failed", [wire.Report(2, "failed", B, "timeout")], [0], {1}, {B}, 1),
    ("bad bytes from the CDN: not blacklisted", [wire.Report(1, "failed", CDN, "digest")], [0], {2}, set(), 0),
    ("the CDN refused", [wire.Report(1, "failed", CDN, "refused")], [0], {2}, {CDN}, 1),
])
def test_a_client_after_its_reports(name, reports, have, inflight, blacklist, failures) -> None:
    rec = _rec()
    c = after_reports(rec, reports, CDN, 1000)
    assert c.have.members(8) == have and c.inflight == inflight, name
    assert c.blacklist == blacklist and c.failures == failures and not c.cdn_only, name
    assert rec.have.members(8) == [0] and rec.bl == set()  # the view itself is unchanged
