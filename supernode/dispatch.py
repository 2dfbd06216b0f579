"""The thin async shell around the scheduler: read Redis, decide, claim atomically,
and long-poll on task events when nothing can be assigned."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable

from common import errors, wire
from common.pieces import piece_range
from common.tokens import Signer

from .cdn import Cdn
from .events import EventHub
from .repo import PeerInfo, ReportRefused, Repo, Snapshot, TaskMeta, now_ms
from .scheduler import (
    Candidate, ClientState, Limits, SourceState, assign, cdn_copy_limit, decode_counts, rank, wanted,
)

SOURCE_KINDS = ("peer", "peer-cdn")
PENDING_GRACE_MS = 10_000  # a CDN upload older than this no longer hides its piece


class Dispatcher:
    def __init__(self, repo: Repo, hub: EventHub, cdn: Cdn, *, sn_id: str, address: tuple[str, int],
                 limits: Limits, min_rate: int = 64 << 10, rng: random.Random | None = None,
                 signer: Signer | None = None, token_ttl: float = 300.0) -> None:
        self.repo = repo
        self.signer = signer  # piece tokens (None: --no-piece-auth)
        self.token_ttl = token_ttl
        self.hub = hub
        self.cdn = cdn
        self.sn_id = sn_id
        self.address = address  # our advertised ip and download port
        self.limits = limits
        self.min_rate = min_rate
        self.rng = rng or random.Random()
        self._sn_addr: dict[str, tuple[str, int]] = {}
        self._sn_seen: dict[str, tuple[float, bool]] = {}  # sid -> (checked at, alive)
        self.assigned = 0
        self.draining = False
        # metrics hooks: the time one scheduling attempt took (s); reports just applied
        self.on_schedule: Callable[[float], None] | None = None
        self.on_reports: Callable[[TaskMeta, str, list[wire.Report]], None] | None = None

    async def pull(self, task_id: str, req: wire.PullRequest,
                   alive: Callable[[], bool] = lambda: True) -> wire.PullReply:
        """`alive` says whether the client still waits for the answer: a long-poll of a
        client that died must not claim pieces (they would stay assigned to its cid,
        which the same client resuming re-uses, until their deadlines)."""
        _check_reports(req.reports)
        await self.cdn.repair.check_reports(task_id, req.reports)  # before they are applied
        reports = req.reports  # applied atomically with the first snapshot
        deadline = time.monotonic() + req.wait
        while True:
            gen = self.hub.generation(task_id)
            t0 = time.perf_counter()
            reply, snap = await self._try(task_id, req, reports)
            if reports and self.on_reports is not None:
                self.on_reports(snap.meta, req.cid, reports)
            reports = []
            if self.on_schedule is not None:
                self.on_schedule(time.perf_counter() - t0)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.draining:
                return wire.PullReply("wait", snap.meta.info(), done=snap.have.count())
            if snap.meta.status != "failed":
                await self.cdn.ensure(snap.meta)  # take over an orphaned fetch or a dead seed
            # no event marks a pending CDN upload going stale: look again by then
            await self.hub.wait(task_id, gen, min(remaining, self._next_stale(snap)))
            if not alive():
                return wire.PullReply("wait", snap.meta.info(), done=snap.have.count())

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
        pending_only = set()
        now = now_ms()
        for n, until in zip(snap.cdn_sending, snap.cdn_sending_until):
            # a piece the CDN is sending now will have a peer holder in a moment: count it
            # as a copy, so the seed sends distinct pieces instead of one piece twice
            if n < count:
                # ...but an upload running for over PENDING_GRACE is likely to a client
                # that died (it never reports; its slot lasts to the deadline): it must not
                # hide the piece from everyone else until then
                if counts[n] == 0 and until - now > self._allowance_ms(meta, n) - PENDING_GRACE_MS:
                    pending_only.add(n)
                counts[n] += 1
        cdn_open = bool(meta.cdn) and snap.cdn_uploads < self.limits.cdn_uploads and not (
            meta.cdn in snap.bad or meta.cdn in snap.blacklist) and await self._reachable(meta.cdn)
        ranked = rank(count, snap.cdn, counts, client, max(64, 8 * want), self.rng, cdn_open=cdn_open,
                      exclude=pending_only)
        if not ranked:
            return None, snap
        detail = await self.repo.detail(task_id, meta.cdn, ranked, sample=8,
                                        peer_cap=self.limits.peer_uploads, cdn_cap=self.limits.cdn_uploads)
        sources = {
            sid: SourceState(s.sid, s.kind, s.load, s.failures, bad=sid in snap.bad)
            for sid, s in detail.sources.items()
            if s.kind == "cdn" or (detail.addresses.get(sid) and detail.addresses[sid].kind in SOURCE_KINDS)
        }
        cands = [Candidate(n, n in snap.cdn, detail.holders[i], counts[n]) for i, n in enumerate(ranked)]
        copy_limit = cdn_copy_limit(snap.clients, self.limits)
        decisions = assign(cands, sources, meta.cdn if cdn_open else None, client, want, self.limits,
                           cdn_copies=copy_limit)
        if not decisions:
            return None, snap
        now = now_ms()
        length = meta.length if meta.length >= 0 else count * meta.piece_size
        items = []
        cdn_only = client.cdn_only or client.failures > self.limits.client_fail_limit
        for i, d in enumerate(decisions):
            start, end = piece_range(d.piece, max(length, (d.piece + 1) * meta.piece_size), meta.piece_size)
            deadline = now + int(((end - start + 1) / self.min_rate + 30) * 1000)
            # The claim re-checks super-seeding atomically (two pulls deciding from the
            # same snapshot must not both seed one piece). The starving client's one
            # rescue piece (see scheduler.assign) may exceed the limit, but only by the
            # copy it adds to what this snapshot saw; CDN-only clients are not limited.
            max_copies = copy_limit
            if i == 0 and not client.inflight:
                max_copies = max(max_copies, counts[d.piece] + 1)
            items.append((d.piece, d.source, sources[d.source].kind, deadline,
                          0 if cdn_only else max_copies))
        claimed = set(await self.repo.claim(
            task_id, req.cid, items, max_inflight=self.limits.max_inflight,
            peer_cap=self.limits.peer_uploads, cdn_cap=self.limits.cdn_uploads,
        ))
        out = []
        digests = dict(zip(ranked, detail.digests))
        expires = int(time.time() + self.token_ttl)
        for d in decisions:
            if d.piece not in claimed:
                continue
            addr = detail.addresses.get(d.source)
            src = await self._source(d.source, sources[d.source].kind, addr)
            start, end = self._range(meta.length, meta.piece_size, d.piece)
            token = None
            if self.signer is not None:
                # bound to the server that will check it: a peer server knows its peer id, a
                # seed its supernode id
                at = addr.peer_id if src.kind == "peer" and addr is not None else d.source
                token = self.signer.issue(task_id=task_id, piece=d.piece, start=start, end=end,
                                          client=req.cid, source=at, expires=expires)
            out.append(wire.Assignment(d.piece, start, end, digests[d.piece], src, token))
        if not out:
            return None, snap
        self.assigned += len(out)
        return wire.PullReply("continue", info, out, done=done), snap

    def _next_stale(self, snap: Snapshot) -> float:
        """Seconds until the next CDN upload of this task passes PENDING_GRACE (inf: none)."""
        now, meta = now_ms(), snap.meta
        if meta.piece_size <= 0:
            return float("inf")
        left = [until - self._allowance_ms(meta, n) + PENDING_GRACE_MS - now
                for n, until in zip(snap.cdn_sending, snap.cdn_sending_until)]
        return max(0.05, min((ms for ms in left if ms > 0), default=float("inf")) / 1000)

    def _allowance_ms(self, meta: TaskMeta, n: int) -> int:
        """An assignment's deadline is its start plus this (as claimed in _try)."""
        start, end = self._range(meta.length, meta.piece_size, n)
        return int(((end - start + 1) / self.min_rate + 30) * 1000)

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

    async def _reachable(self, sid: str) -> bool:
        """Whether the supernode holding the CDN copy is alive (its record not expired),
        looked up at most once a second: a dead one is no source (not a 503)."""
        if sid == self.sn_id:
            return True
        now = time.monotonic()
        known = self._sn_seen.get(sid)
        if known is None or now - known[0] > 1.0:
            addr = await self.repo.supernode_address(sid)
            if addr is not None:
                self._sn_addr[sid] = addr
            known = self._sn_seen[sid] = (now, addr is not None)
        return known[1]

    async def _supernode(self, sid: str) -> tuple[str, int]:
        if sid not in self._sn_addr:
            addr = await self.repo.supernode_address(sid)
            if addr is None:
                raise errors.StoreError("the supernode holding this task's CDN copy is gone")
            self._sn_addr[sid] = addr
        return self._sn_addr[sid]

    async def report(self, task_id: str, cid: str, reports: list[wire.Report]) -> int:
        _check_reports(reports)
        await self.cdn.repair.check_reports(task_id, reports)
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
    # detail.piece names the report that was refused (the batch was not applied), so a
    # client can send the others again without it
    piece = {"piece": int(value)} if value.isdigit() else None
    if status == "not_assigned":
        return errors.Conflict(f"piece {value} was not assigned to this client (or from that source)",
                               detail=piece)
    if status == "bad_piece":
        return errors.BadRequest(f"piece {value} is not known to the CDN", detail=piece)
    if status == "out_of_range":
        return errors.BadRequest(f"piece {value} is outside the task", detail=piece)
    return errors.StoreError(f"unexpected report status {status}")
