"""Prometheus metrics of one supernode (a registry per app, so tests can run several).

Names and meanings are listed in docs/api.md ("Metrics"). Counters fed by the request
path are cheap (no Redis); the gauges that need Redis (task counts) are read once per
scrape, and a store failure then leaves their last value instead of failing /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from common import wire
from common.errors import StoreError
from common.pieces import piece_range

from .store import keys

if TYPE_CHECKING:
    from .cdn.fetch import Cdn
    from .cdn.seed import Seed
    from .store.repo import Repo, TaskMeta

log = logging.getLogger("supernode.metrics")
ACTIVE_TASK_MS = 60_000  # a task accessed within this is active
SHAPE_TTL = 5.0  # seconds a task's piece layout and CDN id are reused for counting bytes
# (task, client, piece) remembered to skip repeated reports, as a 64-bit hash: a tuple
# of the request's own strings cost ~300 B an entry (20 MiB of the soak's RSS growth)
COUNTED_WINDOW = 1 << 15
REQUEST_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5, 30)
SCHEDULE_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1)
LAG_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 5)
LAG_PROBE = 0.05  # seconds between two loop-lag samples


@dataclass(frozen=True)
class _Shape:
    length: int
    piece_size: int
    cdn: str
    until: float

    def piece_bytes(self, n: int) -> int:
        if self.length < 0:
            return self.piece_size
        try:
            start, end = piece_range(n, self.length, self.piece_size)
        except ValueError:
            return 0
        return end - start + 1


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, registry=r)

        self.requests = counter("supernode_requests", "API requests",
                                ["endpoint", "method", "status"])
        self.latency = Histogram("supernode_request_seconds", "API request latency", ["endpoint"],
                                 registry=r, buckets=REQUEST_BUCKETS)
        self.schedule = Histogram(
            "supernode_schedule_seconds",
            "Time to schedule one pull (read, rank, claim), long-poll waits excluded",
            registry=r, buckets=SCHEDULE_BUCKETS)
        self.loop_lag = Histogram(
            "supernode_loop_lag_seconds",
            f"How late the event loop ran a timer due every {LAG_PROBE:g} s: every request waits this long "
            "before its handler starts", registry=r, buckets=LAG_BUCKETS)
        self.store_op = Histogram(
            "supernode_store_script_seconds",
            "Round trip of one store script as this process sees it: connection, Redis, and the wait for "
            "the event loop to read the reply", registry=r, buckets=LAG_BUCKETS)
        self.assignments = counter("supernode_assignments", "Piece assignments handed out")
        self.reports = counter("supernode_piece_reports", "Piece reports (on pulls and reports)",
                               ["result", "reason"])
        self.failures = counter("supernode_piece_failures",
                                "Failed piece transfers reported by clients", ["reason"])
        self.bytes = counter(
            "supernode_bytes", "Bytes by source class: origin = fetched by this supernode's CDN; "
            "cdn and peer = verified pieces clients reported here, by where they came from",
            ["source"])
        self.cdn_bytes = gauge("supernode_cdn_origin_bytes", "Bytes fetched from origins")
        self.cdn_rate = gauge("supernode_cdn_fetch_bytes_per_second",
                              "Origin fetch throughput of this supernode since the previous scrape")
        self.seed_bytes = gauge("supernode_seed_bytes", "Bytes served by the CDN seed")
        self.fetches = gauge("supernode_cdn_fetches_active", "Origin fetches running here")
        self.seed_uploads = gauge("supernode_seed_uploads_active", "CDN uploads in progress")
        self.view_loads = gauge("supernode_view_loads", "Full loads of a task's view from the store so far: "
                                "first use, or a gap in the change log (a reload means lost events)")
        self.pull_rounds = gauge("supernode_pull_rounds", "Scheduling rounds so far (the pulls of a task "
                                 "decided and claimed together)")
        self.pull_round_pulls = gauge("supernode_pull_round_pulls", "Pulls decided in those rounds so far")
        self.auth_refused = counter("supernode_auth_refused", "Requests refused for a missing or bad token",
                                    ["kind", "reason"])
        self.back_to_source = counter(
            "supernode_back_to_source",
            "Clients registered here that went to the origin themselves, by reason", ["reason"])
        self.tasks = gauge("supernode_tasks", "Tasks in the store (all supernodes)")
        self.tasks_active = gauge("supernode_tasks_active", "Tasks accessed within the last minute")
        self.peers = gauge("supernode_peers_active",
                           "Peer servers that registered or sent a heartbeat here recently")
        # proof of possession (supernode/pop/): challenges sent, and how each ended
        self.pop_sent = counter("supernode_pop_challenges_sent", "Possession challenges sent to peers",
                                ["mode"])
        self.pop_results = counter("supernode_pop_challenges", "Possession challenges judged, by result "
                                   "(passed, failed: a wrong or refused answer, timeout: none in time, "
                                   "unreachable)", ["result"])
        self.pop_dropped = counter("supernode_pop_dropped", "Holders dropped after a failed challenge: of "
                                   "one piece, or of the whole task (max failures reached)", ["scope"])
        for result in ("passed", "failed", "timeout", "unreachable"):
            self.pop_results.labels(result)
        for source in ("origin", "cdn", "peer"):
            self.bytes.labels(source)
        for reason in wire.BACK_TO_SOURCE_REASONS:
            self.back_to_source.labels(reason)
        self._shapes: dict[str, _Shape] = {}
        # two generations: the current one and the one before it (an OrderedDict of the
        # same window cost 175 B an entry, 5.6 MiB full: most of the soak's RSS growth)
        self._counted: set[int] = set()
        self._counted_old: set[int] = set()
        self._peers_seen: dict[str, float] = {}
        self._origin_seen = 0
        self._rate_mark: tuple[float, int] | None = None

    def observe_request(self, endpoint: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, method, str(status)).inc()
        if not endpoint.endswith("/pull"):  # pulls long-poll; their wait is not latency
            self.latency.labels(endpoint).observe(seconds)

    async def probe_loop_lag(self) -> None:
        """Forever: sleep LAG_PROBE and record how late the wake-up came (the loop's own queueing)."""
        while True:  # time.monotonic, not loop.time: uvloop's clock stands still within an iteration
            due = time.monotonic() + LAG_PROBE
            await asyncio.sleep(LAG_PROBE)
            self.loop_lag.observe(max(0.0, time.monotonic() - due))

    def seen_peer(self, peer_id: str) -> None:
        if len(self._peers_seen) >= 100_000:
            self._prune_peers(time.monotonic())
        self._peers_seen[peer_id] = time.monotonic()

    def peer_gone(self, peer_id: str) -> None:
        self._peers_seen.pop(peer_id, None)

    def _prune_peers(self, now: float) -> None:
        horizon = now - keys.PEER_ALIVE_TTL_MS / 1000
        self._peers_seen = {p: t for p, t in self._peers_seen.items() if t >= horizon}

    def observe_applied(self, meta: TaskMeta, cid: str, reports: Sequence[wire.Report]) -> None:
        """Reports the store just applied (piggy-backed on a pull, whose snapshot read the
        task's meta in the same script): count them, bytes by source class."""
        self._count(meta.task_id, cid, reports, self._remember(meta, time.monotonic()))

    async def observe_reports(self, repo: Repo, task_id: str, cid: str,
                              reports: Sequence[wire.Report]) -> None:
        """Reports applied by `POST .../report`: the task's layout from the last pull, or
        read once (at most every SHAPE_TTL seconds per task)."""
        shape = None
        if any(r.result == "ok" for r in reports):
            now = time.monotonic()
            shape = self._shapes.get(task_id)
            if shape is None or shape.until <= now:
                try:
                    meta = await repo.get_meta(task_id)
                except StoreError:
                    meta = None  # metrics are best effort: the reports were applied
                shape = self._remember(meta, now) if meta is not None else shape
        self._count(task_id, cid, reports, shape)

    def _count(self, task_id: str, cid: str, reports: Sequence[wire.Report],
               shape: _Shape | None) -> None:
        for r in reports:
            self.reports.labels(r.result, r.reason or "").inc()
            if r.result == "failed":
                self.failures.labels(r.reason or "error").inc()
            elif r.result == "ok" and r.source is not None and shape is not None:
                # a client re-sends reports it is not sure arrived (the store takes the
                # repeat as a no-op): count each piece of a client once
                key = hash((task_id, cid, r.piece))
                if key in self._counted or key in self._counted_old:
                    continue
                self._counted.add(key)
                if len(self._counted) >= COUNTED_WINDOW // 2:
                    self._counted_old, self._counted = self._counted, set()
                kind = "cdn" if r.source == shape.cdn else "peer"
                self.bytes.labels(kind).inc(shape.piece_bytes(r.piece))

    def _remember(self, meta: TaskMeta, now: float) -> _Shape | None:
        if meta.piece_size <= 0:
            return None
        if len(self._shapes) >= 1024 and meta.task_id not in self._shapes:
            self._shapes = {t: s for t, s in self._shapes.items() if s.until > now}
            if len(self._shapes) >= 1024:
                self._shapes.clear()
        # an unknown length (still streaming) is looked up again at once next time
        until = now + SHAPE_TTL if meta.length >= 0 else now
        shape = self._shapes[meta.task_id] = _Shape(meta.length, meta.piece_size, meta.cdn, until)
        return shape

    async def render(self, cdn: Cdn, seed: Seed, repo: Repo) -> tuple[bytes, str]:
        now = time.monotonic()
        fetched = cdn.bytes_fetched
        self.bytes.labels("origin").inc(max(0, fetched - self._origin_seen))
        self._origin_seen = fetched
        if self._rate_mark is not None and now > self._rate_mark[0]:
            self.cdn_rate.set(max(0, fetched - self._rate_mark[1]) / (now - self._rate_mark[0]))
        self._rate_mark = (now, fetched)
        self.cdn_bytes.set(fetched)
        self.seed_bytes.set(seed.bytes_served)
        self.fetches.set(len(cdn.running))
        self.seed_uploads.set(seed.active)
        self._prune_peers(now)
        self.peers.set(len(self._peers_seen))
        try:
            total, active = await repo.task_counts(ACTIVE_TASK_MS)
            self.tasks.set(total)
            self.tasks_active.set(active)
        except StoreError as exc:
            log.info("metrics: task counts unavailable: %s", exc.message)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
