"""The thin async shell around the scheduler: read Redis, decide, claim atomically,
and long-poll on task events when nothing can be assigned."""

from __future__ import annotations

import asyncio
import random
import time

from common import errors, wire
from common.pieces import piece_range

from .cdn import Cdn
from .events import EventHub
from .repo import PeerInfo, ReportRefused, Repo, Snapshot, now_ms
from .scheduler import Candidate, ClientState, Limits, SourceState, assign, decode_counts, rank, wanted

SOURCE_KINDS = ("peer", "peer-cdn")


class Dispatcher:
    def __init__(self, repo: Repo, hub: EventHub, cdn: Cdn, *, sn_id: str, address: tuple[str, int],
                 limits: Limits, min_rate: int = 64 << 10, rng: random.Random | None = None) -> None:
        self.repo = repo
        self.hub = hub
        self.cdn = cdn
        self.sn_id = sn_id
        self.address = address  # our advertised ip and download port
        self.limits = limits
        self.min_rate = min_rate
        self.rng = rng or random.Random()
        self._sn_addr: dict[str, tuple[str, int]] = {}
        self.assigned = 0
        self.draining = False
        self.latency: list[float] = []  # recent scheduling latencies (seconds), for metrics

    async def pull(self, task_id: str, req: wire.PullRequest) -> wire.PullReply:
        _check_reports(req.reports)
        reports = req.reports  # applied atomically with the first snapshot
        deadline = time.monotonic() + req.wait
        while True:
            gen = self.hub.generation(task_id)
            t0 = time.perf_counter()
            reply, snap = await self._try(task_id, req, reports)
            reports = []
            self.latency.append(time.perf_counter() - t0)
            if len(self.latency) > 4096:
                del self.latency[:2048]
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.draining:
                return wire.PullReply("wait", snap.meta.info(), done=snap.have.count())
            if snap.meta.status in ("pending", "fetching"):
                await self.cdn.ensure(snap.meta)  # take over an orphaned fetch
            await self.hub.wait(task_id, gen, remaining)

    async def _try(
        self, task_id: str, req: wire.PullRequest, reports: list[wire.Report]
    ) -> tuple[wire.PullReply | None, Snapshot]:
        try:
            snap = await self.repo.snapshot(task_id, req.cid, reports,
                                            source_fail_limit=self.limits.source_fail_limit)
        except ReportRefused as exc:
            raise _refusal(exc.status, exc.value) from None
        if snap is None:
            raise errors.NotFound("unknown task")
        if not snap.registered:
            raise errors.NotFound("unknown client for this task")
        meta = snap.meta
        info = meta.info()
        done = snap.have.count()
        if meta.status == "failed":
            return wire.PullReply("failed", info, done=done), snap
        count = meta.piece_count
        if meta.status == "success" and done >= count:
            return wire.PullReply("finished", info, done=done), snap
        if count < 0:
            count = len(snap.cdn._data) * 8  # length unknown yet: what the CDN has so far
        client = ClientState(
            cid=req.cid, have=snap.have, inflight=snap.inflight, blacklist=snap.blacklist,
            failures=snap.client_failures, cdn_only=snap.client is not None and snap.client.kind == "peer-cdn",
        )
        want = wanted(client, req.limit, self.limits)
        if want == 0 or meta.piece_size <= 0:
            return None, snap
        counts = decode_counts(snap.counts_raw, count)
        for n in snap.cdn_sending:
            # a piece the CDN is sending now will have a peer holder in a moment: rank it
            # as such, so the seed sends distinct pieces instead of one piece twice
            if n < count:
                counts[n] += 1
        cdn_open = bool(meta.cdn) and snap.cdn_uploads < self.limits.cdn_uploads and not (
            meta.cdn in snap.bad or meta.cdn in snap.blacklist)
        ranked = rank(count, snap.cdn, counts, client, max(16, 4 * want), self.rng, cdn_open=cdn_open)
        if not ranked:
            return None, snap
        detail = await self.repo.detail(task_id, meta.cdn, ranked, sample=8,
                                        peer_cap=self.limits.peer_uploads, cdn_cap=self.limits.cdn_uploads)
        sources = {
            sid: SourceState(s.sid, s.kind, s.load, s.failures, bad=sid in snap.bad)
            for sid, s in detail.sources.items()
            if s.kind == "cdn" or (detail.addresses.get(sid) and detail.addresses[sid].kind in SOURCE_KINDS)
        }
        cands = [Candidate(n, n in snap.cdn, detail.holders[i]) for i, n in enumerate(ranked)]
        decisions = assign(cands, sources, meta.cdn or None, client, want, self.limits)
        if not decisions:
            return None, snap
        now = now_ms()
        length = meta.length if meta.length >= 0 else count * meta.piece_size
        items = []
        for d in decisions:
            start, end = piece_range(d.piece, max(length, (d.piece + 1) * meta.piece_size), meta.piece_size)
            deadline = now + int(((end - start + 1) / self.min_rate + 30) * 1000)
            items.append((d.piece, d.source, sources[d.source].kind, deadline))
        claimed = set(await self.repo.claim(
            task_id, req.cid, items, max_inflight=self.limits.max_inflight,
            peer_cap=self.limits.peer_uploads, cdn_cap=self.limits.cdn_uploads,
        ))
        out = []
        digests = dict(zip(ranked, detail.digests))
        for d in decisions:
            if d.piece not in claimed:
                continue
            src = await self._source(d.source, sources[d.source].kind, detail.addresses.get(d.source))
            start, end = self._range(meta.length, meta.piece_size, d.piece)
            out.append(wire.Assignment(d.piece, start, end, digests[d.piece], src))
        if not out:
            return None, snap
        self.assigned += len(out)
        return wire.PullReply("continue", info, out, done=done), snap

    @staticmethod
    def _range(length: int, piece_size: int, n: int) -> tuple[int, int]:
        if length >= 0:
            return piece_range(n, length, piece_size)
        return n * piece_size, (n + 1) * piece_size - 1  # every piece but the last is full

    async def _source(self, sid: str, kind: str, info: PeerInfo | None) -> wire.Source:
        if kind == "cdn":
            ip, port = self.address if sid == self.sn_id else await self._supernode(sid)
            return wire.Source(sid, ip, port, "cdn")
        assert info is not None
        return wire.Source(sid, info.ip, info.port, "peer")

    async def _supernode(self, sid: str) -> tuple[str, int]:
        if sid not in self._sn_addr:
            addr = await self.repo.supernode_address(sid)
            if addr is None:
                raise errors.StoreError("the supernode holding this task's CDN copy is gone")
            self._sn_addr[sid] = addr
        return self._sn_addr[sid]

    async def report(self, task_id: str, cid: str, reports: list[wire.Report]) -> int:
        _check_reports(reports)
        status, value = await self.repo.report(
            task_id, cid, reports, source_fail_limit=self.limits.source_fail_limit
        )
        if status != "ok":
            raise _refusal(status, value)
        return int(value)

    async def wait_started(self, task_id: str, timeout: float) -> None:
        """Wait (event-driven) until the origin has answered for this task."""
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            gen = self.hub.generation(task_id)
            meta = await self.repo.get_meta(task_id)
            if meta is None or meta.status != "pending":
                return
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                return
            await self.hub.wait(task_id, gen, remaining)


def _check_reports(reports: list[wire.Report]) -> None:
    for r in reports:
        if r.result == "failed" and r.reason is None:
            raise errors.BadRequest("a failed report needs a reason")


def _refusal(status: str, value: str) -> errors.DfError:
    if status == "unknown_task":
        return errors.NotFound("unknown task")
    if status == "unknown_client":
        return errors.NotFound("unknown client for this task")
    if status == "not_assigned":
        return errors.Conflict(f"piece {value} was not assigned to this client (or from that source)")
    if status == "bad_piece":
        return errors.BadRequest(f"piece {value} is not known to the CDN")
    if status == "out_of_range":
        return errors.BadRequest(f"piece {value} is outside the task")
    return errors.StoreError(f"unexpected report status {status}")
