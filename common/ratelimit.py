"""Token-bucket rate limiting.

Pure: time is passed in, nothing here sleeps (`common` has no I/O and no asyncio). The
async shells that wait as a bucket says live with their users: `supernode/cdn/throttle.py`
(the CDN fetch and the seed's uploads) and `dfget/throttle.py` (downloads and the peer
servers' uploads). Debt is allowed so a
whole piece can be charged at once: the caller then waits for the debt to be repaid,
which keeps the long-run average at the rate without splitting sendfile calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    rate: float  # bytes per second; <= 0 means unlimited
    burst: float = 0.0
    tokens: float = field(default=0.0)
    stamp: float | None = field(default=None)

    def __post_init__(self) -> None:
        if self.burst <= 0:
            self.burst = max(self.rate * 0.25, 64 * 1024)
        self.tokens = self.burst

    def reserve(self, n: int, now: float) -> float:
        """Take n tokens; return seconds the caller must wait before using them."""
        if self.rate <= 0:
            return 0.0
        if self.stamp is None:
            self.stamp = now
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def take(self, n: float, now: float) -> float:
        """Take n tokens if the bucket has them and return 0; otherwise take nothing and
        return the seconds until it will (request limiting: a refusal runs up no debt)."""
        if self.rate <= 0:
            return 0.0
        if self.stamp is None:
            self.stamp = now
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate

    def full_at(self, now: float) -> bool:
        """Whether it has refilled to its burst by `now` (then it is as good as new)."""
        if self.rate <= 0 or self.stamp is None:
            return True
        return self.tokens + max(0.0, now - self.stamp) * self.rate >= self.burst


class KeyedLimiter:
    """A token bucket per key (client address, client id), `rate` requests per second
    with bursts of `burst`. At most `max_keys` buckets are kept: the least recently used
    is forgotten first, so a flood of made-up keys costs bounded memory (a forgotten key
    starts again with a full bucket, which errs on the side of serving). Each check also
    forgets the least recently used bucket if it has refilled (it is as good as new), so
    keys that come and go (a client id per download) do not pile up to `max_keys`."""

    def __init__(self, rate: float, burst: float, max_keys: int = 65536) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}  # insertion order = recency

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, now: float) -> float:
        """0 when the request may go on, else the seconds after which it may."""
        if self.rate <= 0:
            return 0.0
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst)
            while len(self._buckets) >= self.max_keys:
                del self._buckets[next(iter(self._buckets))]
        self._buckets[key] = bucket
        oldest = next(iter(self._buckets))
        if oldest != key and self._buckets[oldest].full_at(now):
            del self._buckets[oldest]
        return bucket.take(1, now)
