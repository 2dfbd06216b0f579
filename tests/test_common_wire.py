"""common/wire.py: strict decoding of the supernode API records, JSON and msgpack."""

from __future__ import annotations

import json

import msgpack
import pytest

from common import wire
from common.errors import BadRequest

CID, PEER, TID, DIG = "a" * 32, "b" * 32, "c" * 64, "d" * 64
NL_BUG = pytest.mark.regression  # was a bug, fixed

REGISTER = {"url": "http://origin/f", "peer": {"peer_id": PEER, "ip": "10.0.0.7", "port": 15001},
            "headers": {"Authorization": "Bearer x"}, "md5": "0" * 32, "filter": ["Signature"]}


def enc(obj: object, mp: bool) -> bytes:
    return msgpack.packb(obj, use_bin_type=True) if mp else json.dumps(obj).encode()


@pytest.fixture(params=[False, True], ids=["json", "msgpack"])
def mp(request) -> bool:
    return request.param


@pytest.mark.parametrize("obj", [
    wire.RegisterRequest(url="http://o/f", peer=wire.PeerAddr(PEER, "10.0.0.7", 15001),
                         headers={"X-A": "1"}, md5="F" * 32, filter=["s"], range="bytes=0-9"),
    wire.PullRequest(cid=CID, limit=16, wait=0, reports=[wire.Report(3, "failed", PEER, "timeout")]),
    wire.PullReply(state="continue",
                   task=wire.TaskInfo(TID, 10, 4, 3, "success", file_digest=DIG),
                   assignments=[wire.Assignment(0, 0, 3, DIG,
                                                wire.Source(CID, "127.0.0.1", 8001, "cdn"))]),
    wire.ReportRequest(cid=CID, reports=[wire.Report(0, "ok", CID)], event="finished"),
    wire.DigestsReply(task=wire.TaskInfo(TID, -1, 4, -1, "fetching"), digests=[DIG, None]),
    wire.PeerDownRequest(peer_id=PEER, tasks=[TID]),
    wire.HeartbeatRequest(peer_id=PEER),
])
def test_round_trip(obj, mp) -> None:
    assert wire.decode(wire.encode(obj, msgpack=mp), type(obj), msgpack=mp) == obj


def test_register_from_plain_dict(mp) -> None:
    r = wire.decode(enc(REGISTER, mp), wire.RegisterRequest, msgpack=mp)
    assert r.peer is not None and r.peer.port == 15001 and r.pattern == "p2p"


def bad(**changes: object) -> dict:
    body = json.loads(json.dumps(REGISTER))
    for k, v in changes.items():
        if v is KeyError:
            body.pop(k)
        else:
            body[k] = v
    return body


REJECTED = [
    (bad(url=5), wire.RegisterRequest),
    (bad(url=""), wire.RegisterRequest),
    (bad(url="x" * 8193), wire.RegisterRequest),
    (bad(peer={"peer_id": "XYZ", "ip": "1.2.3.4", "port": 1}), wire.RegisterRequest),
    (bad(peer={"peer_id": PEER, "ip": "1.2.3.4", "port": 0}), wire.RegisterRequest),
    (bad(peer={"peer_id": PEER, "ip": "1.2.3.4", "port": 65536}), wire.RegisterRequest),
    (bad(peer={"peer_id": PEER, "ip": "1.2.3.4", "port": "80"}), wire.RegisterRequest),
    (bad(headers={"X": "a\r\nInjected: 1"}), wire.RegisterRequest),
    (bad(headers={"X": "a\rb"}), wire.RegisterRequest),
    (bad(headers={"X": "a\x00"}), wire.RegisterRequest),
    (bad(headers={"Bad Name": "v"}), wire.RegisterRequest),
    (bad(headers={"X\r\nY": "v"}), wire.RegisterRequest),
    (bad(headers={"": "v"}), wire.RegisterRequest),
    (bad(headers={f"H{i}": "v" for i in range(65)}), wire.RegisterRequest),
    (bad(headers=["a", "b"]), wire.RegisterRequest),
    (bad(md5="xyz"), wire.RegisterRequest),
    (bad(filter=["k"] * 33), wire.RegisterRequest),
    (bad(filter=[""]), wire.RegisterRequest),
    (bad(pattern="torrent"), wire.RegisterRequest),
    (bad(cid="A" * 32), wire.RegisterRequest),
    ({"cid": CID, "limit": 0}, wire.PullRequest),
    ({"cid": CID, "limit": 17}, wire.PullRequest),
    ({"cid": CID, "wait": 31}, wire.PullRequest),
    ({"cid": CID, "wait": "1"}, wire.PullRequest),
    ({"cid": CID, "reports": [{"piece": 0, "result": "ok"}] * 65}, wire.PullRequest),
    ({"cid": CID, "reports": [{"piece": -1, "result": "ok"}]}, wire.ReportRequest),
    ({"cid": CID, "reports": [{"piece": 1 << 31, "result": "ok"}]}, wire.ReportRequest),
    ({"cid": CID, "reports": [{"piece": 1.5, "result": "ok"}]}, wire.ReportRequest),
    ({"cid": CID, "reports": [{"piece": "1", "result": "ok"}]}, wire.ReportRequest),
    ({"cid": CID, "reports": [{"piece": 1, "result": "great"}]}, wire.ReportRequest),
    ({"cid": CID, "reports": [{"piece": 1, "result": "failed", "reason": "x"}]}, wire.ReportRequest),
    ({"cid": CID, "event": "exploded"}, wire.ReportRequest),
    ({"reports": []}, wire.ReportRequest),
    ({"cid": "../../etc/passwd"}, wire.ReportRequest),
    ({"peer_id": PEER, "tasks": ["c" * 63]}, wire.PeerDownRequest),
    ({"peer_id": PEER, "tasks": [TID] * 4097}, wire.PeerDownRequest),
    ({"peer_id": None}, wire.HeartbeatRequest),
    ([PEER], wire.HeartbeatRequest),
    ("x", wire.HeartbeatRequest),
    pytest.param({"peer_id": PEER + "\n"}, wire.HeartbeatRequest, marks=NL_BUG),
    pytest.param({"peer_id": PEER, "tasks": [TID + "\n"]}, wire.PeerDownRequest, marks=NL_BUG),
    pytest.param(bad(headers={"X": "a\n"}), wire.RegisterRequest, marks=NL_BUG),
    pytest.param(bad(headers={"X\n": "v"}), wire.RegisterRequest, marks=NL_BUG),
    pytest.param(bad(md5="0" * 32 + "\n"), wire.RegisterRequest, marks=NL_BUG),
]


@pytest.mark.parametrize("body,typ", REJECTED)
def test_rejects(body, typ, mp) -> None:
    with pytest.raises(BadRequest):
        wire.decode(enc(body, mp), typ, msgpack=mp)


@pytest.mark.parametrize("data", [b"", b"{", b"null", b"\xff\xfe", b'{"peer_id": "' + b"a" * 32 + b'"} x',
                                  b"[" * 10000])
def test_malformed_json(data) -> None:
    with pytest.raises(BadRequest):
        wire.decode(data, wire.HeartbeatRequest)


@pytest.mark.parametrize("data", [
    b"", b"\xc1", msgpack.packb({1: PEER}), msgpack.packb({b"peer_id": PEER}),
    msgpack.packb({"peer_id": PEER.encode()}, use_bin_type=True),
    b"\xdd\xff\xff\xff\xff",  # array32 declaring 4 G items, no data
    b"\xdf\xff\xff\xff\xff",  # map32 declaring 4 G pairs
    msgpack.packb({"peer_id": PEER}) + b"\x00",
])
def test_malformed_msgpack(data) -> None:
    with pytest.raises(BadRequest):
        wire.decode(data, wire.HeartbeatRequest, msgpack=True)


def test_non_string_map_keys_in_nested_dict() -> None:
    body = {"url": "http://o/f", "headers": {1: "x"}}
    with pytest.raises(BadRequest):
        wire.decode(msgpack.packb(body), wire.RegisterRequest, msgpack=True)


def test_to_builtins() -> None:
    assert wire.to_builtins(wire.HeartbeatRequest(peer_id=PEER)) == {"peer_id": PEER}
