"""High availability on one shared Redis (REDIS_URL, db flushed per test): several real
supernode processes, several real dfget processes each listing the supernodes in a
different order. The origin serves the file once, cluster-wide; every supernode
schedules; the CDN copy of one supernode is the source the others hand out."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from conftest import file_bytes
from dfget_support import stop_server
from ha_support import finish, metric, reap, start_dfget

MIB = 1 << 20
pytestmark = pytest.mark.redis


def _nodes(sns: list, first: int) -> list[str]:  # type: ignore[type-arg]
    order = sns[first:] + sns[:first]
    return [f"127.0.0.1:{s.port}" for s in order]


async def test_three_supernodes_one_origin_fetch_scheduled_everywhere(
    supernode, origin_factory, redis_url, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    size = 20 * MIB + 5  # 6 pieces, the last one short
    origin = origin_factory(rate=16 * MIB)  # slow enough that clients overlap the fetch
    origin.put_random("f.bin", size, seed=11)
    sns = [supernode(), supernode(), supernode()]
    homes = [tmp_path / f"h{i}" for i in range(5)]
    dls: list = []  # type: ignore[type-arg]
    t0 = time.monotonic()
    try:
        for i in range(5):
            dls.append(await start_dfget(origin.url("f.bin"), homes[i], tmp_path / f"out{i}", _nodes(sns, i % 3)))
        for d in dls:
            await finish(d, 90)
    finally:
        await reap(dls)
        await asyncio.gather(*(stop_server(h) for h in homes))
    elapsed = time.monotonic() - t0
    want = file_bytes(size, seed=11)
    for i, d in enumerate(dls):
        assert d.code == 0, d.stderr[-3000:]
        assert d.out.read_bytes() == want
        # each client stayed on the supernode it listed first
        assert d.report["supernode"] == sns[i % 3].url and d.report["failovers"] == 0
    st = origin.stats()
    assert st["by_file"]["f.bin"] == {**st["by_file"]["f.bin"], "requests": 1, "bytes": size}
    fetched = [metric(s.url, "supernode_cdn_origin_bytes") for s in sns]
    assert sorted(fetched) == [0, 0, size]  # one supernode fetched, the others did not
    cdn = sns[fetched.index(size)]
    # every supernode scheduled pieces for its own clients ...
    assert all(metric(s.url, "supernode_assignments_total") > 0 for s in sns)
    # ... and the CDN supernode's seed served every piece at least once, to whichever
    # clients (under super-seeding the clients of the other supernodes may well get all
    # of theirs from peers), each byte of each client coming once
    assert all(d.report["bytes_from_peers"] + d.report["bytes_from_supernode"] == size for d in dls)
    assert sum(d.report["bytes_from_supernode"] for d in dls) >= size
    served = metric(cdn.url, "supernode_seed_bytes")
    assert served == sum(d.report["bytes_from_supernode"] for d in dls)
    assert all(metric(s.url, "supernode_seed_bytes") == 0 for s in sns if s is not cdn)
    print(f"3 supernodes x 5 clients, {size} bytes: origin {st['bytes_sent']} bytes, "
          f"seed {served:.0f}, {elapsed:.1f}s")


def _log_once_it_has(sn, needle: str, timeout: float = 10.0) -> str:  # type: ignore[no-untyped-def]
    """The supernode's log once `needle` is in it: the end of a fetch is logged just after
    the clients may already have seen the task finished."""
    _wait_for(lambda: needle in (sn.home / "supernode.log").read_text(), f"{needle!r} logged", timeout)
    return (sn.home / "supernode.log").read_text()


def _wait_for(pred, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


@pytest.mark.regression
async def test_cdn_supernode_killed_mid_fetch_taker_resumes_without_refetching(
    supernode, origin_factory, redis_url, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """SIGKILL the supernode doing the origin fetch once peers hold its first pieces. Its
    clients move to the other supernode and keep their pieces; when the lease expires the
    other supernode takes the fetch over: it copies the pieces peers hold, and asks the
    origin only for the rest, with Range. (It used to refetch the whole file.)"""
    import redis

    from common.taskid import task_id
    from supernode.store import keys

    size = 32 * MIB  # 8 pieces
    ps = 4 * MIB
    origin = origin_factory()
    origin.put_random("k.bin", size, seed=12)
    # the first request (the first supernode's fetch) stalls after 3.5 pieces; later ones
    # (the taker's) are served normally
    url = origin.url("k.bin", mode=f"stall_after={3 * ps + ps // 2}", times=1)
    tid = task_id(url)
    a = supernode(extra_args=["--lease-ttl", "2s"])
    b = supernode(extra_args=["--lease-ttl", "2s"])
    r = redis.Redis.from_url(redis_url)
    dls: list = []  # type: ignore[type-arg]
    homes = [tmp_path / f"h{i}" for i in range(4)]
    t0 = time.monotonic()
    try:
        first = await start_dfget(url, homes[0], tmp_path / "out0", _nodes([a, b], 0))
        dls.append(first)
        await asyncio.to_thread(_wait_for, lambda: r.hget(keys.meta(tid), "cdn"), "the fetch started")
        assert r.get(keys.lease(tid)) == r.hget(keys.meta(tid), "cdn")
        for i in range(1, 4):
            dls.append(await start_dfget(url, homes[i], tmp_path / f"out{i}", _nodes([a, b], i % 2)))

        def ready_to_kill() -> bool:  # every client registered, peers hold pieces 0 and 1
            return (r.hlen(keys.peers(tid)) >= 4 and r.hlen(keys.digests(tid)) >= 3
                    and all(r.scard(keys.holders(tid, n)) for n in (0, 1)))

        await asyncio.to_thread(_wait_for, ready_to_kill, "clients registered, peers hold pieces 0 and 1")
        published = r.hlen(keys.digests(tid))
        assert r.hget(keys.meta(tid), "status") == b"fetching"
        a.runner.kill()  # SIGKILL: its lease is never released, it has to expire
        killed = time.monotonic() - t0
        for d in dls:
            await finish(d, 90)
    finally:
        await reap(dls)
        await asyncio.gather(*(stop_server(h) for h in homes))
        r.close()
    elapsed = time.monotonic() - t0
    want = file_bytes(size, seed=12)
    for d in dls:
        assert d.code == 0, d.stderr[-3000:]
        assert d.out.read_bytes() == want
        assert d.report["back_to_source"] is None and d.report["bytes_from_origin"] == 0
        # kept its pieces across the failover: every byte arrived exactly once
        assert d.report["bytes_from_peers"] + d.report["bytes_from_supernode"] == size, d.report
        assert d.report["supernode"] == b.url
    # the clients that listed the dead supernode first moved over and kept what they had
    # (bytes above). One of them may have registered with b from the start: a register
    # that a loaded supernode answers late goes on to the next one without a failover,
    # which a CI run showed (failovers 0, supernode b). At least one moved over.
    assert any(d.report["failovers"] >= 1 for d in dls[0::2]), [d.report for d in dls[0::2]]
    log = _log_once_it_has(b, "takeover done")
    assert "taking over the fetch" in log and "CDN has" in log, log[-3000:]
    line = next(x for x in log.splitlines() if "taking over the fetch" in x)
    copied = int(line.split(", ")[1].split()[0])  # "... N pieces here, P to copy from peers, ..."
    assert copied >= 2  # pieces 0 and 1, at least, came from peers, not from the origin
    done = next(x for x in log.splitlines() if "takeover done" in x)
    from_peers, from_origin = (int(w) for w in done.split(": ", 2)[2].split() if w.isdigit())
    st = origin.stats()["by_file"]["k.bin"]
    b_origin = metric(b.url, "supernode_cdn_origin_bytes")
    assert b_origin == from_origin
    assert from_peers + from_origin == size  # every piece came once into b's cache
    assert b_origin <= size - 2 * ps  # not a whole refetch
    assert "Range" in st["last_headers"] and "If-Range" in st["last_headers"]
    a_origin = st["bytes"] - b_origin
    assert published == 3 and a_origin == 3 * ps + ps // 2  # the dead one's bytes: up to its stall
    print(f"CDN supernode killed at {killed:.1f}s with {published} pieces published; origin total "
          f"{st['bytes']} bytes ({st['bytes'] / size:.2f}x): dead one {a_origin}, taker {b_origin} "
          f"(+{from_peers} copied from peers); all done in {elapsed:.1f}s")


@pytest.mark.regression
async def test_cdn_supernode_killed_after_its_fetch_peers_finish_and_only_lost_pieces_are_refetched(
    supernode, origin, redis_url, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The CDN supernode dies after its fetch finished, while a rate-limited client is
    mid-download and most pieces are on the CDN's disk only; two more clients come after.
    Once its liveness record expires another supernode seeds the task: pieces peers hold
    are copied from them, only the others come from the origin again. (Before, the dead
    seed stayed the task's CDN: clients waited for pieces nobody could serve, then got
    503 from every supernode once its record expired.)"""
    import redis

    from common.taskid import task_id
    from supernode.store import keys

    size = 24 * MIB  # 6 pieces
    origin.put_random("g.bin", size, seed=13)
    slow = ("-s", "4MB", "--pull-limit", "1")  # one piece at a time: most stay on the CDN only
    url = origin.url("g.bin")
    tid = task_id(url)
    a = supernode(extra_args=["--lease-ttl", "2s"])
    b = supernode(extra_args=["--lease-ttl", "2s"])
    r = redis.Redis.from_url(redis_url)
    dls: list = []  # type: ignore[type-arg]
    homes = [tmp_path / f"h{i}" for i in range(3)]
    t0 = time.monotonic()
    try:
        dls.append(await start_dfget(url, homes[0], tmp_path / "out0", _nodes([a, b], 0), *slow))
        await asyncio.to_thread(_wait_for, lambda: r.hget(keys.meta(tid), "status") == b"success", "fetched")
        assert r.hget(keys.meta(tid), "cdn") == (a.home / "supernode.id").read_text().strip().encode()
        # the first client holds a piece; the others are on the CDN's disk only
        await asyncio.to_thread(_wait_for, lambda: any(r.scard(keys.holders(tid, n)) for n in range(6)),
                                "a piece on a peer")
        a.runner.kill()
        killed = time.monotonic() - t0
        for i in (1, 2):  # latecomers: one lists the dead supernode first
            dls.append(await start_dfget(url, homes[i], tmp_path / f"out{i}", _nodes([a, b], i - 1), *slow))
        for d in dls:
            await finish(d, 90)
    finally:
        await reap(dls)
        await asyncio.gather(*(stop_server(h) for h in homes))
        r.close()
    elapsed = time.monotonic() - t0
    want = file_bytes(size, seed=13)
    for d in dls:
        assert d.code == 0, d.stderr[-3000:]
        assert d.out.read_bytes() == want
        assert d.report["back_to_source"] is None and d.report["supernode"] == b.url
        assert d.report["bytes_from_peers"] + d.report["bytes_from_supernode"] == size, d.report
    log = _log_once_it_has(b, "takeover done")
    assert "its CDN copy is gone" in log, log[-3000:]
    done = next(x for x in log.splitlines() if "takeover done" in x)
    from_peers, from_origin = (int(w) for w in done.split(": ", 2)[2].split() if w.isdigit())
    assert from_peers > 0 and from_origin > 0 and from_peers + from_origin == size
    st = origin.stats()["by_file"]["g.bin"]
    assert st["bytes"] == size + from_origin == size + metric(b.url, "supernode_cdn_origin_bytes")
    print(f"CDN supernode killed {killed:.1f}s in, after its fetch: re-seeded elsewhere with "
          f"{from_peers} bytes from peers and {from_origin} from the origin; origin total "
          f"{st['bytes'] / size:.2f}x; all done in {elapsed:.1f}s")
