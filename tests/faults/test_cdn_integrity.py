"""Integrity of the CDN's own copy: bytes rotting in the supernode's cache file, or the
file removed under it. The client that gets the bad piece reports it; the supernode
re-hashes its piece, unpublishes it and fetches it again from the origin (one piece by
Range, or the whole file when the file is gone), never serving it meanwhile; the client
finishes from the CDN with the right bytes, without going back to the origin itself.
(A lost file is fetched again the usual way, which copies pieces from peers that hold
them since the takeover work, docs/ha.md.)"""

from __future__ import annotations

import hashlib

import pytest

from . import checks
from .harness import MIB, PIECE, World

pytestmark = pytest.mark.redis


@pytest.mark.regression
@pytest.mark.parametrize("damage", ["rot", "removed"])
async def test_damaged_cdn_copy_is_purged_and_fetched_again(world: World, damage: str) -> None:
    size = 12 * MIB
    origin = world.origin()
    data = origin.put_random("i.bin", size, seed=61)
    sn = world.supernode()
    url = origin.url("i.bin")
    out1 = world.tmp / "first.bin"
    tid = checks.ok(await world.dfget(url, out1), out1, data)["task_id"]
    assert origin.served("i.bin") == (size, 1)

    cached = sn.cache_file(tid)
    if damage == "rot":
        with open(cached, "r+b") as f:  # flip bytes inside piece 1, size unchanged
            f.seek(PIECE + 4096)
            f.write(bytes(b ^ 0x5A for b in data[PIECE + 4096:PIECE + 4096 + 64]))
    else:
        cached.unlink()

    # -p cdn: the damaged copy is the only source this client is sent to
    out2 = world.tmp / "second.bin"
    r = await world.dfget(url, out2, None, "-p", "cdn")
    rep = checks.ok(r, out2, data)
    assert rep["back_to_source"] is None and rep["bytes_from_supernode"] == size
    failures = rep["peer_failures"]
    sent, requests = origin.served("i.bin")
    if damage == "rot":
        assert failures == {"digest_mismatch": 1}, failures
        # one piece fetched again, by Range
        assert (sent, requests) == (size + PIECE, 2), (sent, requests)
        headers = origin.stats()["by_file"]["i.bin"]["last_headers"]
        assert headers["Range"] == f"bytes={PIECE}-{2 * PIECE - 1}", headers
    else:
        assert sum(failures.values()) >= 1 and set(failures) <= {"not_found", "short_body", "error"}
        # the whole file again, through the fetch (which copies pieces peers hold, see
        # docs/ha.md, and takes the rest from the origin): at most one more full fetch
        assert requests <= 2 and sent <= 2 * size, (sent, requests)
    # the cache holds the origin's bytes again, and nothing failed on the way
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest()
    assert sn.task(tid)["task"]["status"] == "success"
    log = sn.log_text()
    assert "fail verification" in log or "fetching" in log
    assert "Traceback" not in log

    # the next client is served the mended copy without further origin traffic
    out3 = world.tmp / "third.bin"
    checks.ok(await world.dfget(url, out3, None, "-p", "cdn"), out3, data)
    assert origin.served("i.bin")[1] == requests
