"""Scenario 4: the origin misbehaves while the CDN fetches from it.

- it dies mid-fetch and comes back: the CDN resumes with Range + If-Range, the download
  completes, and the origin never sends the file twice;
- it dies for good: every dfget fails with its documented code and no output; once it
  is back, the next download works and still resumes the CDN's partial copy;
- its content changes mid-fetch (new ETag): the two versions are never spliced; the
  task fails with origin_changed, dfget either gets one whole version straight from the
  origin or fails with its code (--notbs: 8, --md5 of the old version: 5);
- it sends fewer bytes than its Content-Length (once, or always), or more.
"""

from __future__ import annotations

import asyncio
import hashlib
import random

import pytest

from common.errors import EXIT_INTEGRITY, EXIT_ORIGIN, EXIT_P2P_FAILED

from . import checks
from .harness import MIB, PIECE, World, await_for

pytestmark = pytest.mark.redis


def _cdn_pieces(w: World) -> int:
    r = w.redis()
    try:
        tids = [t.decode() for t in r.zrange("df:tasks", 0, -1)]
        return max((r.bitcount(f"df:t:{{{t}}}:cdnmap") for t in tids), default=0)
    finally:
        r.close()


async def test_origin_dies_mid_fetch_and_comes_back(world: World, fault_rng: random.Random) -> None:
    size = 12 * MIB
    origin = world.origin(rate=6 * MIB)
    data = origin.put_random("d.bin", size, seed=41)
    # the default 3 retries span ~4 s: the origin's own restart (a Python start-up on a
    # loaded 2-core machine) may take most of that; this test is about resuming, not giving up
    world.supernode("--origin-retries", "6")
    out = world.tmp / "out.bin"
    d = await world.spawn(origin.url("d.bin"), out)
    await await_for(lambda: _cdn_pieces(world) >= 1, 20, "the CDN's first piece")
    origin.kill()
    await asyncio.sleep(fault_rng.uniform(0.1, 0.6))
    await asyncio.to_thread(origin.start)  # the counters start again at 0
    rep = checks.ok(await d.wait(), out, data)
    assert rep["back_to_source"] is None
    sent, requests = origin.served("d.bin")
    # only what was missing came again, in one Range request that names the version
    assert requests == 1 and 0 < sent <= size - PIECE, (sent, requests)
    headers = origin.stats()["by_file"]["d.bin"]["last_headers"]
    assert headers.get("Range", "").startswith("bytes=") and "If-Range" in headers, headers


async def test_origin_dies_for_good_then_comes_back(world: World) -> None:
    size = 12 * MIB
    origin = world.origin(rate=6 * MIB)
    data = origin.put_random("e.bin", size, seed=42)
    world.supernode("--origin-retries", "1", "--fail-access-interval", "1s")
    url = origin.url("e.bin")
    out_a, out_b = world.tmp / "a.bin", world.tmp / "b.bin"
    a = await world.spawn(url, out_a)
    b = await world.spawn(url, out_b, None, "--notbs")
    await await_for(lambda: _cdn_pieces(world) >= 1, 20, "the CDN's first piece")
    origin.kill()
    ra, rb = await asyncio.gather(a.wait(), b.wait())
    rep_a = checks.failed(ra, EXIT_ORIGIN, out_a)  # back to source, and the origin is gone
    assert rep_a["back_to_source"] and "origin" in ra.stderr
    checks.failed(rb, EXIT_P2P_FAILED, out_b)

    await asyncio.to_thread(origin.start)
    await asyncio.sleep(1.0)  # --fail-access-interval: the failure is not remembered longer
    out_c = world.tmp / "c.bin"
    rep_c = checks.ok(await world.dfget(url, out_c), out_c, data)
    assert rep_c["back_to_source"] is None
    sent, requests = origin.served("e.bin")
    assert requests == 1 and sent <= size - PIECE, "the CDN's partial copy was not resumed"


def _xor(data: bytes, version: int) -> bytes:
    key = (version - 1) % 255 + 1
    return data.translate(bytes(b ^ key for b in range(256)))


async def test_origin_content_changes_mid_fetch(world: World) -> None:
    size = 12 * MIB
    origin = world.origin()
    data = origin.put_random("c.bin", size, seed=43)
    world.supernode("--fail-access-interval", "1s")
    # The first answer breaks after 6 MiB; every later one is another version (new ETag).
    url = origin.url("c.bin", mode=f"changing,fail_after={6 * MIB}", times=1)
    versions = {hashlib.sha256(_xor(data, v)).hexdigest(): v for v in range(1, 8)}
    outs = [world.tmp / n for n in ("bts.bin", "notbs.bin", "md5.bin")]
    runs = await asyncio.gather(world.dfget(url, outs[0]), world.dfget(url, outs[1], None, "--notbs"))

    assert runs[0].code == 0, runs[0].stderr
    got = hashlib.sha256(outs[0].read_bytes()).hexdigest()
    assert got in versions, "the output is not one whole version of the file"
    assert runs[0].report["back_to_source"] and "origin_changed" in runs[0].report["back_to_source"]
    checks.failed(runs[1], EXIT_P2P_FAILED, outs[1])
    # --md5 names another task (the md5 is part of the task id): its own fetch gets some
    # later version whole, which is not the one the user asked for
    checks.failed(await world.dfget(url, outs[2], None, "--md5", hashlib.md5(data).hexdigest()),
                  EXIT_INTEGRITY, outs[2])

    await asyncio.sleep(1.0)
    out = world.tmp / "later.bin"
    r = await world.dfget(url, out)
    assert r.code == 0, r.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() in versions
    assert r.report["back_to_source"] is None  # a fresh task, fetched whole by the CDN


async def test_origin_body_shorter_or_longer_than_declared(world: World) -> None:
    size = 12 * MIB
    origin = world.origin()
    data = {n: origin.put_random(f"{n}.bin", size, seed=44 + i)
            for i, n in enumerate(("once", "always", "long"))}
    world.supernode("--origin-retries", "1")
    urls = {"once": origin.url("once.bin", mode="short", times=1),
            "always": origin.url("always.bin", mode="short"),
            "long": origin.url("long.bin", mode="long=65536")}
    outs = {n: world.tmp / f"{n}.out" for n in urls}
    runs = dict(zip(urls, await asyncio.gather(*(world.dfget(urls[n], outs[n]) for n in urls))))

    rep = checks.ok(runs["once"], outs["once"], data["once"])
    assert rep["back_to_source"] is None
    sent, requests = origin.served("once.bin")
    assert requests == 2 and sent <= size + PIECE, "a cut transfer was fetched whole again"
    checks.failed(runs["always"], EXIT_ORIGIN, outs["always"])
    checks.ok(runs["long"], outs["long"], data["long"])
    assert origin.served("long.bin")[1] == 1

    # nothing cached wrongly: the lying origin keeps failing, the others are served from the CDN
    again = world.tmp / "once2.out"
    checks.ok(await world.dfget(urls["once"], again), again, data["once"])
    assert origin.served("once.bin")[1] == 2
