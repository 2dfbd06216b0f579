"""dfget's verification: a piece counts only if its bytes hash to the digest the
supernode gave (or, for the whole file, to the user's --md5); never to a digest the
sender offers, and an empty, missing or malformed expected digest is never a pass."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import msgspec
import pytest
from aiohttp import web
from dfget_support import start_app

from common import digest, wire
from common.errors import BadRequest, IntegrityError
from dfget.output import PartFile, recheck
from dfget.piecefetch import FetchLimits, PieceFailed, fetch_piece

TID = "ab" * 32
DATA = os.urandom(200_000)
START, END = 50_000, 149_999
GOOD = DATA[START:END + 1]
BAD = GOOD[:1000] + bytes([GOOD[1000] ^ 1]) + GOOD[1001:]


@pytest.mark.parametrize("expected", [None, "", "0" * 63, "0" * 65, digest.of(GOOD).upper(),
                                      " " + digest.of(GOOD)[1:]])
def test_missing_empty_or_malformed_expected_digest_never_passes(expected: str | None) -> None:
    assert not digest.matches(expected, digest.of(GOOD))
    assert not digest.matches(expected, expected or "")  # not even against itself


def test_only_the_exact_digest_passes() -> None:
    assert digest.matches(digest.of(GOOD), digest.of(GOOD))
    assert not digest.matches(digest.of(GOOD), digest.of(BAD))


def _sender(body: bytes) -> web.Application:
    """A source that sends `body` and vouches for it every way HTTP allows."""
    async def piece(request: web.Request) -> web.Response:
        return web.Response(status=206, body=body, headers={
            "Content-Range": f"bytes {START}-{END}/{len(DATA)}",
            "Digest": "sha-256=" + hashlib.sha256(body).hexdigest(),
            "X-Digest": hashlib.sha256(body).hexdigest(),
            "ETag": '"' + hashlib.sha256(body).hexdigest() + '"',
            "Content-MD5": hashlib.md5(body).hexdigest()})

    app = web.Application()
    app.router.add_get("/peer/file/{tid}", piece)
    return app


def _assignment(port: int, expected: str) -> wire.Assignment:
    # built directly (no wire validation) so an empty digest reaches the fetch itself
    src = wire.Source(cid="22" * 16, ip="127.0.0.1", port=port, kind="peer")
    return wire.Assignment(piece=1, start=START, end=END, digest=expected, source=src)


@pytest.mark.parametrize("body,expected,ok", [
    (GOOD, digest.of(GOOD), True),
    (BAD, digest.of(GOOD), False),  # the sender's own headers vouch for BAD: ignored
    (GOOD, "", False),  # no expected digest: never a pass, even for the right bytes
    (BAD, digest.of(BAD).upper(), False),
])
async def test_piece_is_judged_by_the_supernodes_digest_only(tmp_path: Path, body: bytes,
                                                             expected: str, ok: bool) -> None:
    runner, port = await start_app(_sender(body))
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    try:
        if ok:
            assert await fetch_piece(None, TID, _assignment(port, expected), part, FetchLimits(1)) == len(body)  # type: ignore[arg-type]
        else:
            with pytest.raises(PieceFailed) as info:
                await fetch_piece(None, TID, _assignment(port, expected), part, FetchLimits(1))  # type: ignore[arg-type]
            assert info.value.reason == "digest_mismatch"
    finally:
        part.close()
        await runner.cleanup()


@pytest.mark.parametrize("bad", ["", None, "xyz", "0" * 64 + "0"])
def test_an_assignment_without_a_proper_digest_is_refused_on_the_wire(bad: str | None) -> None:
    a = {"piece": 0, "start": 0, "end": 9, "source": {"cid": "1" * 32, "ip": "127.0.0.1",
                                                       "port": 1, "kind": "peer"}}
    if bad is not None:
        a["digest"] = bad
    body = msgspec.json.encode({"state": "continue", "task": {
        "task_id": TID, "length": 10, "piece_size": 10, "piece_count": 1, "status": "success"},
        "assignments": [a]})
    with pytest.raises(BadRequest):  # dfget's supernode client treats this as a bad answer
        wire.decode(body, wire.PullReply)


def test_resume_keeps_only_pieces_matching_a_known_digest(tmp_path: Path) -> None:
    part = PartFile(tmp_path / "out", TID)
    part.open(len(DATA))
    part.write(0, DATA)
    good = digest.of(DATA[:100_000])
    try:
        ranges = [(0, 0, 99_999, good), (1, 100_000, 199_999, None), (2, 0, 99_999, ""),
                  (3, 0, 99_999, digest.of(b"other")), (4, 100_000, 250_000, good)]
        assert recheck(part, ranges, "sha256") == [0]
    finally:
        part.close()


@pytest.mark.parametrize("md5", ["", "0" * 32])
def test_whole_file_md5_empty_or_wrong_fails_and_leaves_the_output(tmp_path: Path, md5: str) -> None:
    out = tmp_path / "out"
    out.write_bytes(b"previous")
    part = PartFile(out, TID)
    part.open(len(DATA))
    part.write(0, DATA)
    with pytest.raises(IntegrityError):
        part.finish(len(DATA), md5)
    assert out.read_bytes() == b"previous" and not part.path.exists()
    part2 = PartFile(out, TID)
    part2.open(len(DATA))
    part2.write(0, DATA)
    part2.finish(len(DATA), hashlib.md5(DATA).hexdigest())
    assert out.read_bytes() == DATA
