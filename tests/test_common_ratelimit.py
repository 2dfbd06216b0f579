"""common/ratelimit.py: token bucket maths with explicit times."""

from __future__ import annotations

import pytest

from common.ratelimit import TokenBucket
from dfget.throttle import Throttle as DfgetThrottle
from supernode.cdn.throttle import Throttle as SupernodeThrottle


def test_unlimited_never_waits() -> None:
    for rate in (0, -5):
        b = TokenBucket(rate)
        assert b.reserve(10**12, 1.0) == 0.0 and b.reserve(10**12, 1.0) == 0.0


def test_default_burst() -> None:
    assert TokenBucket(1_000_000).burst == 250_000
    assert TokenBucket(1000).burst == 64 * 1024
    assert TokenBucket(1000, burst=10).burst == 10


@pytest.mark.parametrize("steps", [
    # (n, now, expected wait) with rate 100 B/s, burst 100
    [(100, 10.0, 0.0), (50, 10.0, 0.5)],
    [(100, 10.0, 0.0), (100, 10.0, 1.0), (100, 10.0, 2.0)],  # debt accumulates
    [(100, 10.0, 0.0), (50, 10.5, 0.0), (1, 10.5, 0.01)],  # refill at the rate
    [(100, 10.0, 0.0), (100, 100.0, 0.0), (100, 100.0, 1.0)],  # refill capped at burst
    [(300, 10.0, 2.0), (0, 12.0, 0.0), (1, 12.0, 0.01)],  # a big charge at once
    [(0, 10.0, 0.0)],
])
def test_reserve(steps) -> None:
    b = TokenBucket(100, burst=100)
    for n, now, want in steps:
        assert b.reserve(n, now) == pytest.approx(want)


def test_long_run_average_is_the_rate() -> None:
    b = TokenBucket(1000, burst=1000)
    now, sent = 1.0, 0
    for _ in range(1000):
        now += b.reserve(100, now)  # wait as told, then send
        sent += 100
    # 100 kB at 1 kB/s with a 1 kB burst: ~99 s
    assert now - 1.0 == pytest.approx((sent - 1000) / 1000, rel=1e-6)


def test_first_call_at_time_zero_is_not_special() -> None:
    # a monotonic clock can read 0.0-ish; the bucket must still refill afterwards
    b = TokenBucket(100, burst=100)
    b.reserve(100, 0.0)
    assert b.reserve(100, 1.0) == pytest.approx(0.0)


@pytest.mark.parametrize("Throttle", [SupernodeThrottle, DfgetThrottle])
async def test_throttle_shell(Throttle: type[SupernodeThrottle]) -> None:
    t = Throttle(0)
    assert t.unlimited
    await t.consume(10**9)
    t = Throttle(1e9)
    assert not t.unlimited
    await t.consume(1000)


def test_keyed_limiter_forgets_buckets_that_refilled() -> None:
    from common.ratelimit import KeyedLimiter

    lim = KeyedLimiter(rate=10.0, burst=2.0)
    for i in range(1000):  # a new key every 0.2 s: each bucket has refilled when the next comes
        assert lim.check(f"k{i}", i * 0.2) == 0.0
    assert len(lim) <= 2
    # a key still owed tokens is kept, and still limited
    lim2 = KeyedLimiter(rate=1.0, burst=2.0)
    assert lim2.check("a", 0.0) == 0.0 and lim2.check("a", 0.0) == 0.0
    assert lim2.check("a", 0.0) > 0  # its burst is spent
    for i in range(50):
        lim2.check(f"k{i}", 0.01 * i)
    assert lim2.check("a", 0.5) > 0  # not forgotten (it would have come back with a full bucket)
