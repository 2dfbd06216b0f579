"""Scenario 5: a disk fills up (a small tmpfs; the suite runs as root in CI).

- on a dfget: exit 7 with one line, no output file, the part file kept hidden and not
  served; with room again the next run resumes it and finishes with the right bytes;
- on the supernode's cache: the task fails cleanly (cdn_storage, no traceback), the
  partial cache file is removed at once, dfget falls back to the origin (or exits 8 with
  --notbs); the GC evicts idle cached files so the same file is cached fine later.
"""

from __future__ import annotations

import asyncio

import pytest

from common.errors import EXIT_DISK, EXIT_P2P_FAILED

from . import checks
from .harness import MIB, World, await_for

pytestmark = pytest.mark.redis


async def test_disk_full_on_dfget(world: World) -> None:
    size = 12 * MIB
    origin = world.origin()
    data = origin.put_random("f.bin", size, seed=51)
    world.supernode()
    small = world.tmpfs("small", "8m")
    out = small.path / "f.bin"
    home = world.host()  # the host's home (peer server) is not on the small disk

    r = await world.dfget(origin.url("f.bin"), out, home)
    rep = checks.failed(r, EXIT_DISK, out)
    assert rep["back_to_source"] is None  # a full disk is not the network's fault
    assert "No space left" in r.stderr
    left = checks.parts(out)
    assert len(left) == 1 and left[0].name.startswith("."), left

    small.resize("32m")
    rep2 = checks.ok(await world.dfget(origin.url("f.bin"), out, home), out, data)
    assert rep2["back_to_source"] is None
    assert checks.transferred(rep2) + rep2["bytes_resumed"] == size
    assert origin.served("f.bin") == (size, 1)


@pytest.mark.regression
async def test_disk_full_on_supernode_cache_then_gc_frees_space(world: World) -> None:
    origin = world.origin()
    small_data = origin.put_random("small.bin", 5 * MIB, seed=52)
    big_data = origin.put_random("big.bin", 6 * MIB, seed=53)
    cache = world.tmpfs("sncache", "8m")
    sn = world.supernode("--fail-access-interval", "1s", home=cache.path)

    # 5 MiB cached; the 6 MiB file cannot fit beside it
    out = world.tmp / "small.out"
    tid_small = checks.ok(await world.dfget(origin.url("small.bin"), out), out, small_data)["task_id"]
    out_a, out_b = world.tmp / "a.out", world.tmp / "b.out"
    ra, rb = await asyncio.gather(world.dfget(origin.url("big.bin"), out_a),
                                  world.dfget(origin.url("big.bin"), out_b, None, "--notbs"))
    rep_a = checks.ok(ra, out_a, big_data)  # straight from the origin instead
    assert "cdn_storage" in str(rep_a["back_to_source"]), rep_a
    checks.failed(rb, EXIT_P2P_FAILED, out_b)
    log = sn.log_text()
    assert "Traceback" not in log and "No space left" in log
    assert cache.used() < 6 * MIB, "the partial cache file of the failed task was kept"

    # The GC (short expiry now) drops the idle small task and evicts its cached file
    # under disk pressure; then the big file is cached and served by the CDN.
    sn.stop()
    sn.extra += ["--task-expire-time", "1s", "--gc-initial-delay", "0.2s", "--gc-meta-interval", "0.3s",
                 "--disk-gc-threshold", "8MB"]
    await asyncio.to_thread(sn.start)
    await await_for(lambda: not sn.cache_file(str(tid_small)).exists(), 15,
                    "the GC to evict the idle cached file")
    out_c = world.tmp / "c.out"
    rep_c = checks.ok(await world.dfget(origin.url("big.bin"), out_c), out_c, big_data)
    assert rep_c["back_to_source"] is None
    assert cache.used() >= 6 * MIB
