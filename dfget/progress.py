"""Download statistics, the live progress bar (stderr) and the final --json report."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TextIO

from common.taskid import redact_url
from common.units import format_size


@dataclass
class Stats:
    url: str
    output: str
    started: float = field(default_factory=time.monotonic)
    task_id: str | None = None
    length: int = -1
    bytes_from_peers: int = 0
    bytes_from_supernode: int = 0
    bytes_from_origin: int = 0
    bytes_resumed: int = 0
    pieces: int = 0
    pieces_from_peers: int = 0
    pieces_from_supernode: int = 0
    pieces_resumed: int = 0
    back_to_source: str | None = None
    supernode: str | None = None
    failovers: int = 0
    peer_failures: Counter[str] = field(default_factory=Counter)

    @property
    def done_bytes(self) -> int:
        return self.bytes_from_peers + self.bytes_from_supernode + self.bytes_from_origin + self.bytes_resumed

    def add_piece(self, kind: str, nbytes: int) -> None:
        if kind == "cdn":
            self.bytes_from_supernode += nbytes
            self.pieces_from_supernode += 1
        else:
            self.bytes_from_peers += nbytes
            self.pieces_from_peers += 1

    def report(self) -> dict[str, object]:
        return {
            "task_id": self.task_id,
            "url": redact_url(self.url),
            "output": self.output,
            "length": self.length,
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "bytes_from_peers": self.bytes_from_peers,
            "bytes_from_supernode": self.bytes_from_supernode,
            "bytes_from_origin": self.bytes_from_origin,
            "bytes_resumed": self.bytes_resumed,
            "pieces": self.pieces,
            "pieces_from_peers": self.pieces_from_peers,
            "pieces_from_supernode": self.pieces_from_supernode,
            "pieces_resumed": self.pieces_resumed,
            "back_to_source": self.back_to_source,
            "supernode": self.supernode,
            "failovers": self.failovers,
            "peer_failures": dict(self.peer_failures),
        }


class ProgressBar:
    """Redraws one stderr line a few times a second; never touches stdout (--json)."""

    def __init__(self, stats: Stats, stream: TextIO = sys.stderr, interval: float = 0.25) -> None:
        self.stats = stats
        self.stream = stream
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._last = (time.monotonic(), 0)
        self._rate = 0.0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="progress-bar")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
            self.draw()
            self.stream.write("\n")
            self.stream.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.draw()

    def line(self) -> str:
        now, done = time.monotonic(), self.stats.done_bytes
        then, before = self._last
        if now > then:
            inst = (done - before) / (now - then)
            self._rate = inst if self._rate == 0 else 0.7 * self._rate + 0.3 * inst
        self._last = (now, done)
        total = self.stats.length
        rate = f"{format_size(self._rate)}/s"
        if total > 0:
            frac = min(done / total, 1.0)
            bar = "#" * int(frac * 30)
            eta = (total - done) / self._rate if self._rate > 0 else float("inf")
            eta_s = "--:--" if eta == float("inf") else f"{int(eta) // 60:02d}:{int(eta) % 60:02d}"
            return (f"[{bar:<30}] {frac * 100:5.1f}% {format_size(done)}/{format_size(total)} "
                    f"{rate} ETA {eta_s}")
        return f"{format_size(done)} {rate}"

    def draw(self) -> None:
        self.stream.write("\r" + self.line().ljust(79))
        self.stream.flush()
