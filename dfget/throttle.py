"""Bandwidth limits of dfget (`--locallimit`, `--totallimit`) and of the peer server's
uploads: the async shell over `common.ratelimit.TokenBucket`."""

from __future__ import annotations

import asyncio
import time

from common.ratelimit import TokenBucket


class Throttle:
    """Async shell over a bucket. Several tasks may share one (a host-wide limit)."""

    def __init__(self, rate: float) -> None:
        self.bucket = TokenBucket(rate)

    @property
    def unlimited(self) -> bool:
        return self.bucket.rate <= 0

    async def consume(self, n: int) -> None:
        delay = self.bucket.reserve(n, time.monotonic())
        if delay > 0:
            await asyncio.sleep(delay)
