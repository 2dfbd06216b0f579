"""`supernode --origin-parallel K`: the CDN fetches a file with K parallel Range requests
from a counting origin (bench.origin), and still takes exactly the file's bytes from it;
dfget gets the file byte-exact; origins without ranges or validators still work."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from conftest import OriginProc, SupernodeProc
from dfget_support import run_dfget, stop_server

from common.pieces import DEFAULT_PIECE_SIZE
from supernode.cdn.parallel import spans

MIB = 1 << 20


def test_spans_cover_every_piece_once() -> None:
    assert spans(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert spans(2, 4) == [(0, 1), (1, 2)]
    assert spans(1, 1) == [(0, 1)]
    for count in range(1, 40):
        for k in range(1, 9):
            got = spans(count, k)
            assert got[0][0] == 0 and got[-1][1] == count
            assert all(a < b for a, b in got)
            assert all(x[1] == y[0] for x, y in zip(got, got[1:]))


@pytest.fixture
async def homes(tmp_path: Path) -> AsyncIterator[list[Path]]:
    out: list[Path] = []
    yield out
    for h in out:
        await stop_server(h)


async def _get(sn: SupernodeProc, url: str, tmp: Path, homes: list[Path], name: str) -> dict[str, object]:
    home = tmp / f"home-{name}"
    homes.append(home)
    out = tmp / name
    r = await run_dfget("-u", url, "-o", str(out), "-n", f"127.0.0.1:{sn.port}", "--home", str(home),
                        "--ip", "127.0.0.1", "--json", "--notbs", timeout=120)
    assert r.code == 0, r.stderr
    return r.report


@pytest.mark.parametrize("mode,requests", [
    (None, 5),  # the probe (piece 0), the rest of span 0, three more spans
    ("norange", 1),  # 200 to the probe: that answer is the whole file
    ("novalidators", 2),  # no version to pin spans to: the probe, then the rest
])
async def test_parallel_fetch_takes_exactly_the_file(
        origin: OriginProc, supernode: Callable[..., SupernodeProc], tmp_path: Path, homes: list[Path],
        mode: str | None, requests: int) -> None:
    sn = supernode(redis_url=None, extra_args=["--origin-parallel", "4"])
    size = 10 * DEFAULT_PIECE_SIZE - 12345  # 10 pieces, the last one short
    src = origin.put_random("big.bin", size, seed=7)
    url = origin.url("big.bin", mode=mode) if mode else origin.url("big.bin")
    origin.reset()
    report = await _get(sn, url, tmp_path, homes, "out")
    assert (tmp_path / "out").read_bytes() == src.read_bytes()
    assert report["back_to_source"] is None and report["bytes_from_origin"] == 0
    stats = origin.stats()
    assert stats["bytes_sent"] == size  # exactly F bytes, however many requests
    assert stats["requests"] == requests
    # a second host: from the CDN cache and the first peer, the origin is not asked again
    await _get(sn, url, tmp_path, homes, "again")
    assert (tmp_path / "again").read_bytes() == src.read_bytes()
    assert origin.stats()["bytes_sent"] == size


async def test_small_file_is_the_probe_alone(
        origin: OriginProc, supernode: Callable[..., SupernodeProc], tmp_path: Path, homes: list[Path]) -> None:
    sn = supernode(redis_url=None, extra_args=["--origin-parallel", "4"])
    src = origin.put_random("small.bin", 3 * MIB + 1, seed=3)
    origin.reset()
    await _get(sn, origin.url("small.bin"), tmp_path, homes, "small")
    assert (tmp_path / "small").read_bytes() == src.read_bytes()
    assert origin.stats()["bytes_sent"] == 3 * MIB + 1
    assert origin.stats()["requests"] == 1


async def test_broken_span_resumes_inside_it(
        origin: OriginProc, supernode: Callable[..., SupernodeProc], tmp_path: Path, homes: list[Path]) -> None:
    sn = supernode(redis_url=None, extra_args=["--origin-parallel", "3"])
    size = 9 * DEFAULT_PIECE_SIZE
    src = origin.put_random("flaky.bin", size, seed=5)
    # the first two requests for it break after 5 MiB: one span resumes at its first missing piece
    url = origin.url("flaky.bin", mode=f"fail_after={5 * MIB}", times=2)
    await _get(sn, url, tmp_path, homes, "flaky")
    assert (tmp_path / "flaky").read_bytes() == src.read_bytes()


def test_origin_parallel_flag_is_checked(supernode: Callable[..., SupernodeProc]) -> None:
    with pytest.raises(RuntimeError):
        supernode(redis_url=None, extra_args=["--origin-parallel", "0"], ready_timeout=5)


@pytest.mark.redis
async def test_restart_mid_parallel_fetch_keeps_the_pieces_out_of_order(
        origin_factory: Callable[..., OriginProc], supernode: Callable[..., SupernodeProc], tmp_path: Path,
        homes: list[Path], redis_url: str | None) -> None:
    """SIGKILL the supernode while its four spans have left holes in the cache; the
    restarted one resumes through the takeover (every recorded piece re-hashed, not only
    the leading run): the download is byte-exact and published pieces are not fetched
    again."""
    import asyncio
    import contextlib
    import json

    import redis
    from conftest import http_get

    from common.taskid import task_id
    from supernode.store import keys

    assert redis_url is not None
    origin = origin_factory(rate=8 * MIB)
    sn = supernode(extra_args=["--origin-parallel", "4"])
    size = 12 * DEFAULT_PIECE_SIZE
    src = origin.put_random("holes.bin", size, seed=9)
    url = origin.url("holes.bin")
    tid = task_id(url)
    # a registration without a peer starts the fetch (no download meanwhile: this is
    # about the CDN's fetch, not about a client riding out the restart)
    status, _ = await asyncio.to_thread(http_get, f"{sn.url}/api/v1/tasks", 30.0,
                                        json.dumps({"url": url}).encode())
    assert status == 200
    r = redis.Redis.from_url(redis_url)
    try:
        # wait for the cache's record (saved about every second) to show pieces out of order
        sidecar = sn.home / "cdn" / tid[:2] / f"{tid}.json"
        recorded: set[int] = set()
        for _ in range(600):
            with contextlib.suppress(OSError, ValueError):
                recorded = {int(k) for k in json.loads(sidecar.read_text())["digests"]}
            if len(recorded) >= 2 and recorded != set(range(len(recorded))):
                break
            await asyncio.sleep(0.02)
        else:
            pytest.fail(f"no out-of-order pieces recorded: {sorted(recorded)}")
        assert {int(k) for k in r.hkeys(keys.digests(tid))} >= recorded
        sn.runner.kill()
        await asyncio.to_thread(sn.runner.start)
        await _get(sn, url, tmp_path, homes, "holes")  # its registration resumes the fetch
    finally:
        r.close()
    assert (tmp_path / "holes").read_bytes() == src.read_bytes()
    # fetched twice at most: the pieces in flight when it died (one per span) and those
    # that ended after the last record (about a second at 8 MB/s)
    assert origin.stats()["bytes_sent"] <= size + 7 * DEFAULT_PIECE_SIZE
    assert "taking over the fetch: 0 pieces here" not in sn.runner.log_tail(200)
