"""Proof of possession, the parts without processes: the signed challenge
(common/pop.py), the pure decisions (supernode/pop/decide.py), the store script that
drops a holder (scripts.POP_FAILED) and its replay in the view, and the peer server's
answer (dfget/server/pop.py) to honest and hostile challenges."""

from __future__ import annotations

import base64
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import pop
from common.taskid import new_id
from common.tokens import Signer
from common.wire import PieceKey
from dfget.server.app import build_peer_app
from dfget.server.pop import Nonces
from dfget.server.state import ServerConfig, ServerState
from dfget.server.table import FileEntry
from supernode.pop import decide
from supernode.scheduling.view import TaskView
from supernode.store.connection import Store, connect
from supernode.store.repo import PeerInfo, Repo

TID = "ab" * 32
PEER = "cd" * 16
NONCE = bytes(range(16))


def _signer() -> Signer:
    return Signer(Ed25519PrivateKey.generate())


def _issue(s: Signer, **over: object) -> str:
    f: dict[str, object] = dict(task_id=TID, peer_id=PEER, piece=1, start=1000, end=1099, mode=pop.HASH,
                                nonce=NONCE, expires=int(time.time()) + 60)
    f.update(over)
    return pop.issue(s, **f)  # type: ignore[arg-type]


# --- the challenge ------------------------------------------------------------------------
def test_a_signed_challenge_verifies_and_says_what_it_asks() -> None:
    s = _signer()
    keys = {s.kid: s.key.public_key()}
    ch = pop.verify(_issue(s), keys.get, task_id=TID, peer_id=PEER, now=time.time())
    assert (ch.piece, ch.start, ch.end, ch.mode, ch.nonce, ch.length) == (1, 1000, 1099, pop.HASH, NONCE, 100)


@pytest.mark.parametrize("case, reason", [
    ("missing", "missing"), ("garbage", "malformed"), ("short", "malformed"), ("not_base64", "malformed"),
    ("bad_mode", "malformed"), ("reversed_range", "malformed"), ("unknown_key", "unknown_key"),
    ("tampered", "bad_signature"), ("expired", "expired"), ("other_task", "wrong_task"),
    ("other_peer", "wrong_peer"), ("piece_token_key_context", "bad_signature"),
])
def test_hostile_challenges_are_refused(case: str, reason: str) -> None:
    s = _signer()
    keys = {s.kid: s.key.public_key()}
    text: str | None = _issue(s)
    task, peer = TID, PEER
    assert text is not None
    raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    if case == "missing":
        text = None
    elif case == "garbage":
        text = "x" * len(text)
    elif case == "short":
        text = text[:-4]
    elif case == "not_base64":
        text = "!" * len(text)
    elif case in ("bad_mode", "reversed_range"):
        if case == "bad_mode":
            raw[81] = 7
        else:
            raw[65:73], raw[73:81] = raw[73:81], raw[65:73]
        text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    elif case == "unknown_key":
        keys = {}
    elif case == "tampered":
        raw[72] ^= 1  # the range moved: the signature no longer covers it
        text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
    elif case == "expired":
        text = _issue(s, expires=int(time.time()) - 3600)
    elif case == "other_task":
        task = "ef" * 32
    elif case == "other_peer":
        peer = "01" * 16
    elif case == "piece_token_key_context":  # the same key signing the body without our context
        body = bytes(raw[:-64])
        text = base64.urlsafe_b64encode(body + s.key.sign(body)).rstrip(b"=").decode()
    with pytest.raises(pop.ChallengeError) as info:
        pop.verify(text, keys.get, task_id=task, peer_id=peer, now=time.time())
    assert info.value.reason == reason
    assert info.value.status in (400, 401, 403)


def test_issue_refuses_bad_fields() -> None:
    with pytest.raises(ValueError):
        _issue(_signer(), nonce=b"short")
    with pytest.raises(ValueError):
        _issue(_signer(), start=10, end=9)


def test_an_answer_to_an_old_nonce_does_not_pass_a_new_challenge() -> None:
    data = os.urandom(100)
    old = pop.answer(NONCE, data)
    assert decide.judge_hash(NONCE, data, old)
    assert not decide.judge_hash(bytes(16), data, old)  # replayed: the nonce differs
    assert not decide.judge_hash(NONCE, data[:-1] + bytes([data[-1] ^ 1]), old)  # one bit differs
    assert not decide.judge_hash(NONCE, data, None) and not decide.judge_hash(NONCE, data, 5)


# --- the decisions --------------------------------------------------------------------------
def test_pick_client_skips_non_serving_and_dropped_clients() -> None:
    rng = random.Random(1)
    clients = [("a", "peer"), ("b", "cdn"), ("c", "peer-cdn"), ("d", "peer"), ("e", "local")]
    seen = {decide.pick_client(clients, {"d"}, rng) for _ in range(200)}
    assert seen == {"a", "c"}
    assert decide.pick_client([("b", "cdn")], set(), rng) is None


@pytest.mark.parametrize("length, piece_size", [(10_000_000, 4 << 20), (3500, 1000), (1, 1), (200_000, 100_000)])
def test_ranges_stay_inside_the_piece(length: int, piece_size: int) -> None:
    rng = random.Random(7)
    count = -(-length // piece_size)
    for _ in range(300):
        n = rng.randrange(count)
        p_start, p_end = n * piece_size, min(length, (n + 1) * piece_size) - 1
        a, b = decide.pick_range(n, length, piece_size, pop.HASH, rng)
        assert p_start <= a <= b <= p_end and b - a + 1 <= decide.RANGE_MAX
        assert decide.pick_range(n, length, piece_size, pop.PIECE, rng) == (p_start, p_end)


def test_target_asks_for_a_range_only_of_pieces_we_have_a_copy_of() -> None:
    rng = random.Random(3)
    modes = {}
    for _ in range(100):
        t = decide.target("a", [0, 2], 3500, 1000, {2}, rng)
        assert t is not None and t.piece in (0, 2)
        modes[t.piece] = t.mode
    assert modes == {0: pop.PIECE, 2: pop.HASH}
    assert decide.target("a", [], 3500, 1000, set(), rng) is None
    assert decide.target("a", [0], -1, 1000, set(), rng) is None


def test_outstanding_nonces_are_judged_once() -> None:
    o = decide.Outstanding()
    t = decide.Target("a", 0, 0, 9, pop.HASH)
    o.open(NONCE, t)
    with pytest.raises(ValueError):
        o.open(NONCE, t)
    assert o.settle(NONCE) == t
    assert o.settle(NONCE) is None and o.settle(bytes(16)) is None and len(o) == 0


def test_piece_answers_and_consequences() -> None:
    data = os.urandom(1000)
    d = hashlib.sha256(data).hexdigest()
    assert decide.judge_piece(data, 1000, d, "sha256")
    assert not decide.judge_piece(data[:999], 1000, d, "sha256")
    assert not decide.judge_piece(data + b"x", 1000, d, "sha256")
    assert not decide.judge_piece(bytes(1000), 1000, d, "sha256")
    assert [decide.consequence(n, 3) for n in (1, 2, 3, 4)] == ["piece", "piece", "task", "task"]
    assert decide.consequence(1, 1) == "task"


def test_peer_nonces_refuse_replays_and_stay_bounded() -> None:
    n = Nonces(cap=2)
    assert n.take(b"1" * 16, 100, now=0) == "ok"
    assert n.take(b"1" * 16, 100, now=0) == "replayed"
    assert n.take(b"2" * 16, 100, now=0) == "ok"
    assert n.take(b"3" * 16, 100, now=0) == "full"  # both still live
    assert n.take(b"3" * 16, 100, now=1000) == "ok"  # the old ones expired


# --- the view replays a lost holding --------------------------------------------------------
def test_view_forgets_a_holding_on_L() -> None:
    a, b = "a" * 32, "b" * 32
    v = TaskView("t" * 64)
    v.apply([f"P {a} pa|127.0.0.2|1|peer", f"P {b} pb|127.0.0.3|1|peer", "G 0 d0", "G 1 d1",
             f"H {a} 0", f"H {b} 0", f"H {a} 1"])
    assert sorted(v.holders_of(0, 8, 0)) == [a, b] and v.counts[0] == 2
    v.apply([f"L {a} 0"])
    assert v.holders_of(0, 8, 0) == [b] and v.counts[0] == 1 and 0 not in v.clients[a].have
    assert v.holders_of(1, 8, 0) == [a] and a in v.free
    v.apply([f"L {a} 1", f"L {a} 1"])  # a repeat changes nothing
    assert v.counts[1] == 0 and a not in v.free


# --- the store script ----------------------------------------------------------------------
@pytest.fixture
async def repo_task(store_url: str | None) -> AsyncIterator[tuple[Repo, str, str, str, list[str]]]:
    store = Store(connect(store_url))
    events: list[str] = []
    store.on_event = lambda _t, ev: events.append(ev)
    repo = Repo(store)
    tid, cdn, a = new_id() * 2, new_id(), new_id()
    try:
        await repo.register_task(tid, url="http://o/f", url_key="http://o/f", md5="", identifier="", range_="",
                                 headers={}, fail_interval_ms=60_000)
        await repo.set_meta(tid, status="success", length=4096, piece_size=1024, piece_count=4, cdn=cdn)
        await repo.publish_pieces(tid, cdn, [(n, f"{n:064x}") for n in range(4)])
        await repo.add_peer(tid, a, PeerInfo(new_id(), "127.0.0.2", 1, "peer"))
        from common import wire

        assert (await repo.report(tid, a, [wire.Report(n, "have") for n in range(4)], source_fail_limit=3))[0] == "ok"
        yield repo, tid, cdn, a, events
    finally:
        await store.close()


async def test_a_failed_challenge_drops_the_piece_then_the_task(repo_task) -> None:  # type: ignore[no-untyped-def]
    repo, tid, _cdn, a, events = repo_task
    assert await repo.pop_failed(tid, a, 2, 2) == ("ok", 1)
    assert (await repo.held_by(tid, a)).members(4) == [0, 1, 3]
    assert a not in {m.decode() for m in await repo.r.smembers(f"df:t:{{{tid}}}:h:2")}
    assert await repo.bad_sources(tid) == set()
    assert events[-1].split("\n")[1:] == [f"L {a} 2"]
    assert await repo.pop_failed(tid, a, 2, 2) == ("ok", 2)  # the piece is gone already; the count goes on
    assert await repo.bad_sources(tid) == {a}
    assert (await repo.held_by(tid, a)).members(4) == []  # a holder of nothing now
    assert events[-1].split("\n")[1:] == [f"L {a} 0", f"L {a} 1", f"L {a} 3", f"X {a}"]
    count = await repo.r.bitfield(f"df:t:{{{tid}}}:cnt").get("u16", "#0").get("u16", "#3").execute()
    assert count == [0, 0]
    assert await repo.pop_failed(tid, "f" * 32, 0, 2) == ("unknown_client", 0)
    assert await repo.pop_failed("0" * 64, a, 0, 2) == ("unknown_task", 0)
    await repo.delete_task(tid)
    assert not await repo.r.exists(f"df:t:{{{tid}}}:popf")


# --- the peer server's answer --------------------------------------------------------------
PIECE, LENGTH = 1000, 3500


@pytest.fixture
async def peer(tmp_path: Path):  # type: ignore[no-untyped-def]
    data = os.urandom(LENGTH)
    path = tmp_path / "f"
    path.write_bytes(data)
    s = _signer()
    state = ServerState(ServerConfig(home=tmp_path), peer_id=PEER)
    state.keys.add([PieceKey(kid=s.kid.hex(), key=s.public.hex())])
    state.table.register(FileEntry(task_id=TID, path=path, length=LENGTH, piece_size=PIECE, supernodes=[],
                                   verified={0, 1, 3}))
    async with TestClient(TestServer(build_peer_app(state, lambda e: None), host="127.0.0.1")) as client:
        yield client, s, data, path


async def _ask(client: TestClient, text: str | None, task: str = TID) -> tuple[int, bytes]:
    headers = {pop.HEADER: text} if text is not None else {}
    async with client.post(f"/peer/pop/{task}", headers=headers) as resp:
        return resp.status, await resp.read()


async def test_an_honest_peer_answers_from_its_bytes(peer) -> None:  # type: ignore[no-untyped-def]
    client, s, data, _ = peer
    nonce = os.urandom(16)
    status, body = await _ask(client, _issue(s, piece=3, start=3100, end=3499, nonce=nonce))
    assert status == 200
    import json

    assert json.loads(body)["answer"] == pop.answer(nonce, data[3100:3500])
    status, body = await _ask(client, _issue(s, piece=1, start=1000, end=1999, mode=pop.PIECE,
                                             nonce=os.urandom(16)))
    assert status == 200 and body == data[1000:2000]


@pytest.mark.parametrize("case, status", [
    ("replay", 409), ("past_piece_end", 416), ("past_file_end", 416), ("piece_past_count", 416),
    ("range_in_other_piece", 416), ("partial_piece_mode", 400), ("not_held", 404), ("unknown_task", 404),
    ("bad_task_id", 404), ("malformed", 400), ("missing", 400), ("other_peer", 403), ("unknown_key", 401),
    ("truncated_file", 404),
])
async def test_hostile_challenges_get_a_clean_4xx(peer, case: str, status: int) -> None:  # type: ignore[no-untyped-def]
    client, s, _data, path = peer
    task = TID
    text: str | None = _issue(s, nonce=os.urandom(16))
    if case == "replay":
        assert (await _ask(client, text))[0] == 200
    elif case == "past_piece_end":
        text = _issue(s, piece=1, start=1900, end=2000, nonce=os.urandom(16))
    elif case == "past_file_end":
        text = _issue(s, piece=3, start=3400, end=3500, nonce=os.urandom(16))
    elif case == "piece_past_count":
        text = _issue(s, piece=4, start=4000, end=4001, nonce=os.urandom(16))
    elif case == "range_in_other_piece":
        text = _issue(s, piece=0, start=1000, end=1001, nonce=os.urandom(16))
    elif case == "partial_piece_mode":
        text = _issue(s, piece=1, start=1000, end=1500, mode=pop.PIECE, nonce=os.urandom(16))
    elif case == "not_held":
        text = _issue(s, piece=2, start=2000, end=2001, nonce=os.urandom(16))
    elif case == "unknown_task":
        task = "ef" * 32
        text = _issue(s, task_id=task, nonce=os.urandom(16))
    elif case == "bad_task_id":
        task = "..%2f..%2fetc"
    elif case == "malformed":
        text = "A" * 10
    elif case == "missing":
        text = None
    elif case == "other_peer":
        text = _issue(s, peer_id="01" * 16, nonce=os.urandom(16))
    elif case == "unknown_key":
        text = _issue(_signer(), nonce=os.urandom(16))
    elif case == "truncated_file":
        with path.open("r+b") as f:
            f.truncate(1500)
    got, body = await _ask(client, text, task)
    assert got == status, body
    assert b"\"answer\"" not in body


# --- the flags -----------------------------------------------------------------------------
def test_pop_flags_are_validated() -> None:
    from supernode.cli import build_settings

    s = build_settings({"pop_interval": "30s", "pop_timeout": "500ms", "pop_max_failures": 2})
    assert (s.pop_interval, s.pop_timeout, s.pop_max_failures) == (30.0, 0.5, 2)
    assert build_settings({"pop_interval": "0"}).pop_interval == 0  # off
    for bad in ({"pop_interval": "10ms"}, {"pop_timeout": "0"}, {"pop_timeout": "1h"},
                {"pop_max_failures": 0}):
        with pytest.raises(ValueError, match="--pop-"):
            build_settings(bad)


def _expected(ch: dict[str, object], held: set[int]) -> int:
    """The status the protocol (docs/api.md, POST /peer/pop) gives a well-signed challenge."""
    if int(ch["expires"]) < time.time() - pop.LEEWAY:  # type: ignore[call-overload]
        return 401
    if ch["task_id"] != TID or ch["peer_id"] != PEER:
        return 403
    piece, start, end = int(ch["piece"]), int(ch["start"]), int(ch["end"])  # type: ignore[call-overload]
    if not 0 <= piece < 4:
        return 416
    p_start, p_end = piece * PIECE, min(LENGTH, (piece + 1) * PIECE) - 1
    if not p_start <= start <= end <= p_end:
        return 416
    if ch["mode"] == pop.PIECE and (start, end) != (p_start, p_end):
        return 400
    return 200 if piece in held else 404


async def test_random_challenges_get_what_the_protocol_says(peer) -> None:  # type: ignore[no-untyped-def]
    """600 random challenges (fields near and past every edge, some with a byte flipped):
    never a 5xx, a 200 only for a range inside a held piece, and then the right answer."""
    client, s, data, _ = peer
    rng = random.Random(13)
    edges = [0, 1, 999, 1000, 1001, 1999, 2000, 2999, 3000, 3499, 3500, 3501, 2**32 - 1, 2**63]
    statuses: dict[int, int] = {}
    for i in range(600):
        start = rng.choice(edges + [rng.randrange(0, 4000)])
        f: dict[str, object] = dict(
            task_id=TID if rng.random() < 0.9 else "ef" * 32, peer_id=PEER if rng.random() < 0.9 else "01" * 16,
            piece=rng.choice([0, 1, 2, 3, 4, 2**32 - 1, min(start // PIECE, 2**32 - 1)]), start=start,
            end=min(start + rng.choice([0, 1, 99, 499, 500, 999, 1000, 2**40]), 2**64 - 1),
            mode=rng.choice([pop.HASH, pop.PIECE]), nonce=os.urandom(16),
            expires=int(time.time()) + rng.choice([60, -3600]))
        text = _issue(s, **f)
        flip = rng.random() < 0.15
        if flip:
            raw = bytearray(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
            text = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()
        status, body = await _ask(client, text)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, body
        if flip:
            assert status in (400, 401), (i, status, body)
            continue
        assert status == _expected(f, {0, 1, 3}), (i, f, status, body)
        if status == 200:
            a, b = int(f["start"]), int(f["end"])  # type: ignore[call-overload]
            if f["mode"] == pop.PIECE:
                assert body == data[a:b + 1]
            else:
                import json

                assert json.loads(body)["answer"] == pop.answer(f["nonce"], data[a:b + 1])  # type: ignore[arg-type]
    assert {200, 400, 401, 403, 404, 416} <= set(statuses), statuses
