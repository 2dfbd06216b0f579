"""The thin async shell around the scheduler: decide from this process's view of the
task (supernode/view.py), claim in one atomic script, and long-poll on task events when
nothing can be assigned."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable

from common import errors, wire
from common.pieces import piece_range
from common.tokens import Signer

from .cdn import Cdn
from .events import EventHub
from .repo import PeerInfo, ReportRefused, Repo, TaskMeta, now_ms
from .scheduler import Candidate, ClientState, Limits, SourceState, assign, cdn_copy_limit, rank_ordered, wanted
from .view import ClientRec, Flags, TaskView
from .views import Views

SOURCE_KINDS = ("peer", "peer-cdn")
PENDING_GRACE_MS = 10_000  # a CDN upload older than this no longer hides its piece
HOLDER_SAMPLE = 4  # holders looked at per candidate piece (the least loaded of a few random ones)
WIDE_WINDOW = 64  # candidates ranked when the narrow window (4 per wanted piece) is not enough


class Dispatcher:
    def __init__(self, repo: Repo, hub: EventHub, cdn: Cdn, *, sn_id: str, address: tuple[str, int],
                 limits: Limits, min_rate: int = 64 << 10, rng: random.Random | None = None,
                 signer: Signer | None = None, token_ttl: float = 300.0, views: Views | None = None) -> None:
        self.repo = repo
        self.views = views or Views(repo, hub)
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

    async def pull(self, task_id: str, req: wire.PullRequest, alive: Callable[[], bool] = lambda: True,
                   idle: Callable[[], contextlib.AbstractAsyncContextManager[None]] | None = None,
                   ) -> wire.PullReply:
        """`alive` says whether the client still waits for the answer: a long-poll of a
        client that died must not claim pieces (they would stay assigned to its cid,
        which the same client resuming re-uses, until their deadlines). `idle` marks the
        time spent waiting for events (the guard does not count it as work)."""
        _check_reports(req.reports)
        await self.cdn.repair.check_reports(task_id, req.reports)  # before they are applied
        reports = list(req.reports)  # applied atomically with the first claim
        deadline = time.monotonic() + req.wait
        while True:
            gen = self.hub.generation(task_id)
            t0 = time.perf_counter()
            reply, view, done = await self._try(task_id, req, reports)
            meta = view.meta
            assert meta is not None
            if reports and self.on_reports is not None:
                self.on_reports(meta, req.cid, reports)
            reports = []
            if self.on_schedule is not None:
                self.on_schedule(time.perf_counter() - t0)
            if reply is not None:
                return reply
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.draining:
                return wire.PullReply("wait", meta.info(), done=done)
            if meta.status != "failed":
                await self.cdn.ensure(meta)  # take over an orphaned fetch or a dead seed
            # no event marks a pending CDN upload going stale: look again by then
            async with idle() if idle is not None else contextlib.nullcontext():
                await self.hub.wait(task_id, gen, min(remaining, self._next_stale(view, meta)))
            if not alive():
                return wire.PullReply("wait", meta.info(), done=done)

    async def _client(self, task_id: str, cid: str) -> tuple[TaskView, ClientRec]:
        view = await self.views.get(task_id)
        if view is None:
            raise errors.NotFound("unknown task")
        rec = view.clients.get(cid)
        if rec is None:
            # registered through another supernode a moment ago (its event on the way)?
            # One cheap look before the costly reload: a made-up id costs one HGET.
            if await self.repo.peer_of(task_id, cid) is None:
                raise errors.NotFound("unknown client for this task")
            view = await self.views.reload(task_id)
            rec = view.clients.get(cid) if view is not None else None
            if view is None or rec is None:
                raise errors.NotFound("unknown client for this task")
        return view, rec

    async def _try(
        self, task_id: str, req: wire.PullRequest, reports: list[wire.Report]
    ) -> tuple[wire.PullReply | None, TaskView, int]:
        view, rec = await self._client(task_id, req.cid)
        meta = view.meta
        assert meta is not None
        now = now_ms()
        client = _after_reports(rec, reports, meta.cdn, now, self.limits)
        done = client.have.count()
        count = view.piece_count()
        state = None
        if meta.status == "failed":
            state = "failed"
        elif meta.status == "success" and done >= count:
            state = "finished"
        decisions: list[tuple[int, str, str]] = []
        items: list[tuple[int, str, str, int, int]] = []
        if state is None:
            decisions, items = await self._decide(view, meta, client, count, req.limit, now)
        claimed: set[int] = set()
        if reports or items:
            view.reserve(decisions, 1)
            try:
                claimed = set(await self.repo.pull(
                    task_id, req.cid, reports, items, max_inflight=self.limits.max_inflight,
                    peer_cap=self.limits.peer_uploads, cdn_cap=self.limits.cdn_uploads,
                    source_fail_limit=self.limits.source_fail_limit))
            except ReportRefused as exc:
                raise _refusal(exc.status, exc.value) from None
            finally:
                view.reserve(decisions, -1)
        info = meta.info()
        if state is not None:
            return wire.PullReply(state, info, done=done), view, done
        out = []
        expires = int(time.time() + self.token_ttl)
        for piece, sid, kind in decisions:
            if piece not in claimed:
                continue
            peer = view.clients.get(sid)
            addr = peer.info if peer is not None else None
            if kind != "cdn" and addr is None:
                continue  # left between the claim and now: its assignment expires unused
            src = await self._source(sid, kind, addr)
            start, end = self._range(meta.length, meta.piece_size, piece)
            token = None
            if self.signer is not None:
                # bound to the server that will check it: a peer server knows its peer id, a
                # seed its supernode id
                at = addr.peer_id if src.kind == "peer" and addr is not None else sid
                token = self.signer.issue(task_id=task_id, piece=piece, start=start, end=end,
                                          client=req.cid, source=at, expires=expires)
            out.append(wire.Assignment(piece, start, end, view.digests.get(piece, ""), src, token))
        if not out:
            return None, view, done
        self.assigned += len(out)
        return wire.PullReply("continue", info, out, done=done), view, done

    async def _decide(
        self, view: TaskView, meta: TaskMeta, client: ClientState, count: int, limit: int, now: int,
    ) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str, int, int]]]:
        """The scheduler's choice for this client, from the view: (piece, source, kind)
        decisions and the claim items that go with them."""
        want = wanted(client, limit, self.limits)
        if want == 0 or meta.piece_size <= 0:
            return [], []
        counts = view.counts[:count]
        counts.extend([0] * (count - len(counts)))
        pending_only = set()
        sending = view.sending(meta.cdn, now) if meta.cdn else []
        for n, until in sending:
            # a piece the CDN is sending now will have a peer holder in a moment: count it
            # as a copy, so the seed sends distinct pieces instead of one piece twice
            if n < count:
                # ...but an upload running for over PENDING_GRACE is likely to a client
                # that died (it never reports; its slot lasts to the deadline): it must not
                # hide the piece from everyone else until then
                if counts[n] == 0 and until - now > self._allowance_ms(meta, n) - PENDING_GRACE_MS:
                    pending_only.add(n)
                counts[n] += 1
        cdn_open = bool(meta.cdn) and len(sending) < self.limits.cdn_uploads and not (
            meta.cdn in view.bad or meta.cdn in client.blacklist) and await self._reachable(meta.cdn)
        sources = _Sources(view, now)
        if meta.cdn:
            sources[meta.cdn] = SourceState(meta.cdn, "cdn", len(sending), view.fails.get(meta.cdn, 0),
                                            bad=meta.cdn in view.bad)
        copy_limit = cdn_copy_limit(len(view.clients), self.limits)
        order = view.rarity(count, time.monotonic())
        rand = self.rng.getrandbits
        chosen = []
        for window in (4 * want, WIDE_WINDOW):
            ranked = rank_ordered(order, view.cdn, client, max(window, want), self.rng, cdn_open=cdn_open,
                                  exclude=pending_only)
            cands = (Candidate(n, n in view.cdn, view.holders_of(n, HOLDER_SAMPLE, rand(20)), counts[n])
                     for n in ranked)
            chosen = assign(cands, sources, meta.cdn if cdn_open else None, client, want, self.limits,
                            cdn_copies=copy_limit)
            if len(chosen) >= want or len(ranked) < window:
                break
        decisions, items = [], []
        length = meta.length if meta.length >= 0 else count * meta.piece_size
        cdn_only = client.cdn_only or client.failures > self.limits.client_fail_limit
        for i, d in enumerate(chosen):
            start, end = piece_range(d.piece, max(length, (d.piece + 1) * meta.piece_size), meta.piece_size)
            deadline = now + int(((end - start + 1) / self.min_rate + 30) * 1000)
            # The claim re-checks super-seeding atomically (two pulls deciding from the
            # same view must not both seed one piece). The starving client's one rescue
            # piece (see scheduler.assign) may exceed the limit, but only by the copy it
            # adds to what this view saw; CDN-only clients are not limited.
            max_copies = copy_limit
            if i == 0 and not client.inflight:
                max_copies = max(max_copies, counts[d.piece] + 1)
            kind = sources[d.source].kind
            decisions.append((d.piece, d.source, kind))
            items.append((d.piece, d.source, kind, deadline, 0 if cdn_only else max_copies))
        return decisions, items

    def _next_stale(self, view: TaskView, meta: TaskMeta) -> float:
        """Seconds until the next CDN upload of this task passes PENDING_GRACE (inf: none)."""
        now = now_ms()
        if meta.piece_size <= 0 or not meta.cdn:
            return float("inf")
        left = [until - self._allowance_ms(meta, n) + PENDING_GRACE_MS - now
                for n, until in view.sending(meta.cdn, now)]
        return max(0.05, min((ms for ms in left if ms > 0), default=float("inf")) / 1000)

    def _allowance_ms(self, meta: TaskMeta, n: int) -> int:
        """An assignment's deadline is its start plus this (as claimed in _decide)."""
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


class _Sources(dict[str, SourceState]):
    """The state of each source a decision looks at, read from the view on first use."""

    def __init__(self, view: TaskView, now: int) -> None:
        super().__init__()
        self.view = view
        self.now = now

    def get(self, sid: str, default: SourceState | None = None) -> SourceState | None:  # type: ignore[override]
        src = dict.get(self, sid)
        if src is None:
            peer = self.view.clients.get(sid)
            if peer is None or peer.info is None or peer.info.kind not in SOURCE_KINDS:
                return default
            v = self.view
            src = self[sid] = SourceState(sid, "peer", v.load_of(sid, self.now), v.fails.get(sid, 0),
                                          bad=sid in v.bad)
        return src


def _after_reports(rec: ClientRec, reports: list[wire.Report], cdn: str, now: int, limits: Limits) -> ClientState:
    """The client as it will be once the store has applied `reports` (scripts.py,
    apply_reports), for deciding in the same round trip: pieces reported held, their
    assignments over, failed sources avoided. The claim re-checks all of it."""
    inflight = {n for n, (_, dl) in rec.fly.items() if dl >= now}
    have, bl, fails = rec.have, rec.bl, rec.fails
    if reports:
        have, bl = Flags(bytearray(rec.have.data)), set(rec.bl)
        for r in reports:
            entry = rec.fly.get(r.piece)
            inflight.discard(r.piece)
            if r.result in ("have", "ok"):
                if r.result == "have" or entry is not None:
                    have.add(r.piece)
            elif entry is not None and not (entry[0] == cdn and r.reason not in ("refused", "timeout")):
                bl.add(entry[0])
                fails += 1
    return ClientState(
        cid=rec.cid, have=have, inflight=frozenset(inflight), blacklist=frozenset(bl), failures=fails,
        cdn_only=rec.info is not None and rec.info.kind == "peer-cdn",
    )
