"""Scenario 7: two hostile peers registered with the supernode through its real API,
each claiming every piece of the task: one serves corrupted bytes, one advertises
pieces it does not have (404). The scheduler prefers peers to the CDN, so downloaders
are sent to them; each downloader reports them, avoids them itself after the first
failures, and gets the pieces elsewhere; after a few bad pieces (source_fail_limit,
5) the supernode drops them for everyone. Every file is right."""

from __future__ import annotations

import pytest

from . import checks
from .harness import MIB, World

pytestmark = pytest.mark.redis


def _bad(w: World, tid: str) -> set[str]:
    r = w.redis()
    try:
        return {m.decode() for m in r.smembers(f"df:t:{{{tid}}}:bad")}
    finally:
        r.close()


def _blacklists(w: World, tid: str) -> dict[str, set[str]]:
    r = w.redis()
    try:
        cids = [c.decode() for c in r.hkeys(f"df:t:{{{tid}}}:peers")]
        return {c: {m.decode() for m in r.smembers(f"df:t:{{{tid}}}:bl:{c}")} for c in cids
                if r.exists(f"df:t:{{{tid}}}:bl:{c}")}
    finally:
        r.close()


async def test_corrupting_and_lying_peers_are_reported_avoided_and_dropped(world: World) -> None:
    size = 16 * MIB  # 4 pieces
    origin = world.origin()
    data = origin.put_random("h.bin", size, seed=71)
    sn = world.supernode()
    url = origin.url("h.bin")
    corrupt = world.fake_peer("corrupt", sn, url, origin.dir / "h.bin")
    liar = world.fake_peer("liar", sn, url, origin.dir / "h.bin")
    tid = corrupt.task_id
    fakes = {corrupt.cid, liar.cid}

    reports = []
    for i in range(4):  # --no-serve: the fakes and the CDN are the only sources
        out = world.tmp / f"d{i}.bin"
        rep = checks.ok(await world.dfget(url, out, None, "--no-serve"), out, data)
        assert rep["back_to_source"] is None and rep["bytes_from_origin"] == 0
        reports.append(rep)
        if _bad(world, tid) >= fakes:
            break
    assert _bad(world, tid) >= fakes, "the supernode did not drop the hostile peers"

    first = reports[0]["peer_failures"]
    assert first.get("digest_mismatch", 0) >= 1 and first.get("not_found", 0) >= 1, first
    assert len(reports) <= 3, "more than a few bad pieces before the peers were dropped"
    # Every client that met one avoids it from its first report on (its own blacklist),
    # and nothing else is blacklisted (not the CDN, not an honest peer).
    lists = [seen for cid, seen in _blacklists(world, tid).items() if cid not in fakes]
    assert all(seen <= fakes for seen in lists), lists
    met_corrupt = sum(1 for rep in reports if rep["peer_failures"].get("digest_mismatch"))
    met_liar = sum(1 for rep in reports if rep["peer_failures"].get("not_found"))
    assert sum(1 for seen in lists if corrupt.cid in seen) == met_corrupt, (lists, reports)
    assert sum(1 for seen in lists if liar.cid in seen) == met_liar, (lists, reports)

    # dropped for everyone: the next client is never sent to them
    before = corrupt.requests() + liar.requests()
    out = world.tmp / "after.bin"
    rep = checks.ok(await world.dfget(url, out, None, "--no-serve"), out, data)
    assert rep["peer_failures"] == {}
    assert corrupt.requests() + liar.requests() == before
    assert origin.served("h.bin") == (size, 1)
