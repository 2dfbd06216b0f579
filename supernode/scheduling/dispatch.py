"""The thin async shell around the scheduler: decide from this process's view of the
task (supernode/scheduling/view.py), claim in one atomic script, and long-poll on task events when
nothing can be assigned.

Pulls of one task are decided and claimed in rounds: the pulls that arrive while a
round's claim is in flight wait for the next round, which decides all of them from one
look at the view (each decision sees the loads and copies the ones before it took) and
claims them in one script call. Under load a round carries tens of pulls: one Redis
round trip, one sequence number and one published event for all of them. Rounds of a
task run one at a time in this process, so each decides from a view that already holds
the previous round's claims."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import random
import time
from collections.abc import Callable, Iterator

from common import errors, wire
from common.pieces import piece_range
from common.tokens import Signer
from supernode.cdn.fetch import Cdn
from supernode.store.events import EventHub
from supernode.store.repo import PeerInfo, Repo, ReportRefused, TaskMeta, now_ms

from .policy import (
    Candidate,
    ClientState,
    Decision,
    Limits,
    RarityOrder,
    SourceState,
    allowance_ms,
    assign,
    assign_free,
    cdn_copy_limit,
    cdn_open_to,
    cdn_open_to_task,
    claim_copies,
    count_cdn_uploads,
    next_stale_s,
    piece_allowance_ms,
    piece_bounds,
    rank_ordered,
    rarest_sampled,
    rescue_in,
    source_first,
    wanted,
)
from .view import HOLDER_SCAN, SOURCE_KINDS, ClientRec, Flags, TaskView, after_reports
from .views import Views

PENDING_GRACE_MS = 10_000  # a CDN upload older than this no longer hides its piece
HOLDER_SAMPLE = 4  # holders looked at per candidate piece (the least loaded of a few random ones)
WIDE_WINDOW = 64  # candidates ranked when the narrow window (4 per wanted piece) is not enough
PICK_SAMPLE = 6  # pieces a source could send that the rarest is picked from
MAX_ROUND = 128  # pulls decided and claimed together at most
MAX_GRANTS = 8  # assignments per piece token (common/tokens.py)


class _Ask:
    """A pull waiting for its task's next round."""

    __slots__ = ("cid", "limit", "reports", "fut", "park", "parked", "window")

    def __init__(self, cid: str, limit: int, reports: list[wire.Report],
                 fut: asyncio.Future[tuple[wire.PullReply | None, int]], park: bool,
                 window: tuple[int, int] | None = None) -> None:
        self.cid, self.limit, self.reports, self.fut = cid, limit, reports, fut
        self.window = window  # dfget --range: only these pieces (inclusive)
        self.park = park  # it will wait for an event if it gets nothing
        self.parked: asyncio.Future[None] | None = None  # its place in the hub's queue


def windowed(client: ClientState, window: tuple[int, int] | None, count: int) -> ClientState:
    """The client as the decision sees it when it wants pieces first..last only: every
    other piece counts as held, so none of them is chosen (pure)."""
    if window is None or count <= 0:
        return client
    first, last = window[0], min(window[1], count - 1)
    data = bytearray(b"\x01") * count
    if first <= last:
        seg = client.have.data[first:last + 1]
        data[first:last + 1] = bytes(seg).ljust(last + 1 - first, b"\x00")
    return dataclasses.replace(client, have=Flags(data))


class _Round:
    """What the decisions of one round share: the task as this view sees it, and what the
    decisions before took of it (source loads, CDN copies)."""

    __slots__ = ("view", "meta", "count", "now", "counts", "pending_only", "cdn_open", "sources",
                 "copy_limit", "order", "taken", "length", "free", "all_mask", "held", "addrs")

    def __init__(self, view: TaskView, meta: TaskMeta, count: int, now: int) -> None:
        self.view, self.meta, self.count, self.now = view, meta, count, now
        self.counts: list[int] = []
        self.pending_only: set[int] = set()
        self.cdn_open = False
        self.sources = _Sources(view, now)
        self.copy_limit = 1
        self.order: RarityOrder | None = None
        self.taken: dict[str, int] = {}  # source -> assignments decided this round
        self.length = meta.length if meta.length >= 0 else count * meta.piece_size
        self.free: list[str] | None = None  # view.free as a list, when decisions go source first
        self.all_mask = 0  # one byte per piece (scheduler.assign_free)
        self.held: dict[str, int] = {}  # source -> its pieces as such a mask
        self.addrs: dict[str, PeerInfo] = {}  # the peers decided on, as they were then

    def holdings(self, sid: str) -> int:
        mask = self.held.get(sid)
        if mask is None:
            rec = self.view.clients.get(sid)
            mask = self.held[sid] = int.from_bytes(rec.have.data, "little") & self.all_mask if rec else 0
        return mask


class Dispatcher:
    def __init__(self, repo: Repo, hub: EventHub, cdn: Cdn, *, sn_id: str, address: tuple[str, int],
                 limits: Limits, min_rate: int = 64 << 10, rng: random.Random | None = None,
                 signer: Signer | None = None, token_ttl: float = 300.0, views: Views | None = None,
                 tls: bool = False) -> None:
        self.repo = repo
        self.views = views or Views(repo, hub, peer_cap=limits.peer_uploads)
        self.signer = signer  # piece tokens (None: --no-piece-auth)
        self.token_ttl = token_ttl
        self.hub = hub
        self.cdn = cdn
        self.sn_id = sn_id
        self.address = address  # our advertised ip and download port
        self.tls = tls  # our download port serves TLS
        self.limits = limits
        self.min_rate = min_rate
        self.rng = rng or random.Random()
        self._sn_addr: dict[str, tuple[str, int, bool]] = {}
        self._sn_seen: dict[str, tuple[float, bool]] = {}  # sid -> (checked at, alive)
        self.assigned = 0
        self.draining = False
        self._asks: dict[str, list[_Ask]] = {}  # task -> pulls waiting for its next round
        self._rounds: dict[str, asyncio.Task[None]] = {}  # task -> its running rounds
        self.round_sizes = [0, 0]  # rounds, pulls in them (a metric: pulls per round)
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
            park = deadline - time.monotonic() > 0 and not self.draining
            reply, view, done, parked = await self._try(task_id, req, reports, park)
            try:
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
                # no event marks a pending CDN upload going stale, or this client's wait
                # earning it a rescue piece: look again by then
                until = min(remaining, self._next_stale(view, meta), self._next_rescue(view, meta, req.cid))
                async with idle() if idle is not None else contextlib.nullcontext():
                    await self.hub.wait(task_id, gen, until, parked)
                    parked = None
            finally:
                if parked is not None:
                    self.hub.unpark(task_id, parked)
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
        self, task_id: str, req: wire.PullRequest, reports: list[wire.Report], park: bool = False,
    ) -> tuple[wire.PullReply | None, TaskView, int, asyncio.Future[None] | None]:
        """This pull in its task's next round: its reply (None: nothing assigned), the
        view, the pieces its client holds, and its place among the waiters when it got
        nothing and `park` asked for one."""
        view, _ = await self._client(task_id, req.cid)
        fut: asyncio.Future[tuple[wire.PullReply | None, int]] = asyncio.get_running_loop().create_future()
        ask = _Ask(req.cid, req.limit, reports, fut, park, req.window)
        self._asks.setdefault(task_id, []).append(ask)
        if task_id not in self._rounds:
            self._rounds[task_id] = asyncio.create_task(self._run_rounds(task_id))
        try:
            reply, done = await fut
        except BaseException:
            if ask.parked is not None:
                self.hub.unpark(task_id, ask.parked)
            raise
        if reply is not None and ask.parked is not None:  # its claim went through after all
            self.hub.unpark(task_id, ask.parked)
            ask.parked = None
        return reply, view, done, ask.parked

    async def _run_rounds(self, task_id: str) -> None:
        """Rounds of the task, one after another, while pulls wait for one."""
        batch: list[_Ask] = []
        try:
            while asks := self._asks.get(task_id):
                batch = asks[:MAX_ROUND]
                del asks[:MAX_ROUND]
                self.round_sizes[0] += 1
                self.round_sizes[1] += len(batch)
                try:
                    await self._round(task_id, batch)
                except Exception as exc:  # noqa: BLE001 - whatever failed the round (the store, the task
                    # gone) is every one of its pulls' answer: each handler raises it to its client
                    for ask in batch:
                        if not ask.fut.done():
                            ask.fut.set_exception(exc)
        finally:
            self._rounds.pop(task_id, None)
            left = self._asks.pop(task_id, [])
            for ask in batch + left:  # cancelled (shutdown): nobody is left to answer them
                if not ask.fut.done():
                    ask.fut.cancel()

    async def close(self) -> None:
        """Stop the running rounds (shutdown)."""
        tasks = list(self._rounds.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _round(self, task_id: str, batch: list[_Ask]) -> None:
        view = await self.views.get(task_id)
        if view is None or view.meta is None:
            raise errors.NotFound("unknown task")
        meta = view.meta
        now = now_ms()
        count = view.piece_count()
        rnd: _Round | None = None
        plans: list[tuple[_Ask, str | None, int, list[tuple[int, str, str]], list[tuple[int, str, str, int, int]]]] = []
        for ask in batch:
            rec = view.clients.get(ask.cid)
            if rec is None:  # removed since it was looked up
                if not ask.fut.done():
                    ask.fut.set_exception(errors.NotFound("unknown client for this task"))
                continue
            client = after_reports(rec, ask.reports, meta.cdn, now)
            done = client.have.count()
            state = None
            if meta.status == "failed":
                state = "failed"
            elif meta.status == "success" and done >= count:
                state = "finished"
            decisions: list[tuple[int, str, str]] = []
            items: list[tuple[int, str, str, int, int]] = []
            if state is None and not ask.fut.done():  # a pull whose client left claims nothing
                if rnd is None:
                    rnd = await self._prepare(view, meta, count, now)
                decisions, items = self._decide(rnd, windowed(client, ask.window, count), ask.limit)
                if not decisions and ask.park:
                    ask.parked = self.hub.park(task_id)  # before this round's change is applied
            plans.append((ask, state, done, decisions, items))
        sent = [p for p in plans if p[0].reports or p[4]]
        results: list[list[int] | ReportRefused] = []
        if sent:
            results = await self.repo.pull_many(
                task_id, [(p[0].cid, p[0].reports, p[4]) for p in sent], max_inflight=self.limits.max_inflight,
                peer_cap=self.limits.peer_uploads, cdn_cap=self.limits.cdn_uploads,
                source_fail_limit=self.limits.source_fail_limit)
        outcome = {id(p[0]): r for p, r in zip(sent, results)}
        meta = view.meta or meta
        info = meta.info()
        for ask, state, done, decisions, _ in plans:
            res = outcome.get(id(ask), [])
            if isinstance(res, ReportRefused):
                if not ask.fut.done():
                    ask.fut.set_exception(_refusal(res.status, res.value))
                continue
            if state is not None:
                reply: wire.PullReply | None = wire.PullReply(state, info, done=done)
            else:
                reply = await self._reply(task_id, view, meta, ask.cid, decisions, set(res), info, done,
                                          rnd.addrs if rnd is not None else {})
            if not ask.fut.done():
                ask.fut.set_result((reply, done))

    async def _reply(self, task_id: str, view: TaskView, meta: TaskMeta, cid: str,
                     decisions: list[tuple[int, str, str]], claimed: set[int], info: wire.TaskInfo,
                     done: int, rnd_addrs: dict[str, PeerInfo]) -> wire.PullReply | None:
        """The assignments of the claimed decisions, with one piece token for them all."""
        picked: list[tuple[int, int, int, wire.Source, str]] = []
        addrs = rnd_addrs
        for piece, sid, kind in decisions:
            if piece not in claimed:
                continue
            # The address as the decision saw it: a source that left since (a peer server
            # retiring an old download's client) is still named, so that the client finds
            # out at once and reports it, instead of waiting out the assignment's
            # deadline for a piece it was never told about.
            addr = addrs.get(sid)
            if kind != "cdn" and addr is None:
                continue  # not a client even when decided (cannot happen: decisions name clients)
            src = await self._source(sid, kind, addr)
            start, end = piece_bounds(meta.length, meta.piece_size, piece)
            # bound to the server that will check it: a peer server knows its peer id, a
            # seed its supernode id
            at = addr.peer_id if src.kind == "peer" and addr is not None else sid
            picked.append((piece, start, end, src, at))
        if not picked:
            return None
        tokens: list[str | None] = [None] * len(picked)
        if self.signer is not None:
            expires = int(time.time() + self.token_ttl)
            for i in range(0, len(picked), MAX_GRANTS):
                group = picked[i:i + MAX_GRANTS]
                token = self.signer.issue_grants(task_id=task_id, client=cid, expires=expires,
                                                 grants=[(p, s, e, at) for p, s, e, _, at in group])
                tokens[i:i + len(group)] = [token] * len(group)
        out = [wire.Assignment(piece, start, end, view.digests.get(piece, ""), src, token)
               for (piece, start, end, src, _), token in zip(picked, tokens)]
        self.assigned += len(out)
        return wire.PullReply("continue", info, out, done=done)

    async def _prepare(self, view: TaskView, meta: TaskMeta, count: int, now: int) -> _Round:
        """What every decision of a round starts from."""
        rnd = _Round(view, meta, count, now)
        if meta.piece_size <= 0:
            return rnd
        view.expire(now)  # sources whose uploads ran out are free again
        sending = view.sending(meta.cdn, now) if meta.cdn else []
        rnd.counts, rnd.pending_only = count_cdn_uploads(
            view.counts, count, sending, now, self._allowance(meta), PENDING_GRACE_MS)
        rnd.cdn_open = cdn_open_to_task(meta.cdn, view.bad) and await self._reachable(meta.cdn)
        if meta.cdn:
            rnd.sources[meta.cdn] = SourceState(meta.cdn, "cdn", len(sending), view.fails.get(meta.cdn, 0),
                                                bad=meta.cdn in view.bad)
        rnd.copy_limit = cdn_copy_limit(len(view.clients), self.limits)
        rnd.order = view.rarity(count, time.monotonic())
        rnd.free = list(view.free)
        rnd.all_mask = int.from_bytes(b"\x01" * count, "little")
        return rnd

    def _decide(
        self, rnd: _Round, client: ClientState, limit: int,
    ) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str, int, int]]]:
        """The scheduler's choice for this client in this round: (piece, source, kind)
        decisions and the claim items that go with them."""
        want = wanted(client, limit, self.limits)
        meta, view = rnd.meta, rnd.view
        if want == 0 or meta.piece_size <= 0 or rnd.order is None:
            return [], []
        counts = rnd.counts
        cdn = meta.cdn
        cdn_open = cdn_open_to(client, rnd.cdn_open, rnd.sources.get(cdn) if rnd.cdn_open else None,
                               rnd.taken, self.limits)
        if not view.free and not cdn_open:
            return [], []  # every source is busy: nothing to look at
        chosen = []
        if rnd.free is not None and source_first(rnd.count, client):
            chosen = self._from_free(rnd, client, want)
            if len(chosen) >= want or not cdn_open:
                return self._items(rnd, client, chosen)
            # the rest from the CDN, as the piece-first walk would (super-seeding limits)
            client = dataclasses.replace(client, inflight=client.inflight | {d.piece for d in chosen})
            ranked = rank_ordered(rnd.order, view.cdn, client, 4 * (want - len(chosen)), self.rng, cdn_open=True,
                                  exclude=rnd.pending_only)
            cands = (Candidate(n, True, (), counts[n]) for n in ranked if n in view.cdn)
            taken = dict(rnd.taken)
            for d in chosen:
                taken[d.source] = taken.get(d.source, 0) + 1
            chosen += assign(cands, rnd.sources, cdn, client, want - len(chosen), self.limits,
                             cdn_copies=rnd.copy_limit, taken=taken, dead_end=self._dead_end(rnd, client))
            return self._items(rnd, client, chosen)
        for window in (4 * want, WIDE_WINDOW):
            ranked = rank_ordered(rnd.order, view.cdn, client, max(window, want), self.rng, cdn_open=cdn_open,
                                  exclude=rnd.pending_only)
            cands = _candidates(view, ranked, counts, cdn_open, self.rng.getrandbits)
            chosen = assign(cands, rnd.sources, cdn if cdn_open else None, client, want, self.limits,
                            cdn_copies=rnd.copy_limit, taken=rnd.taken, dead_end=self._dead_end(rnd, client))
            if len(chosen) >= want or len(ranked) < window:
                break
        return self._items(rnd, client, chosen)

    def _from_free(self, rnd: _Round, client: ClientState, want: int) -> list[Decision]:
        assert rnd.free is not None
        missing = rnd.all_mask & ~int.from_bytes(client.have.data, "little")
        for n in itertools.chain(client.inflight, rnd.pending_only):
            missing &= ~(1 << (8 * n))
        if not missing:
            return []
        counts, rng, count = rnd.counts, self.rng, rnd.count

        rand = rng.getrandbits

        def pick(common: int) -> int:
            return rarest_sampled(common.to_bytes(count, "little"), counts, rand, PICK_SAMPLE)

        return assign_free(rnd.free, rng.randrange(len(rnd.free) or 1), rnd.sources, client, want, self.limits,
                           missing=missing, holdings=rnd.holdings, pick=pick, taken=rnd.taken)

    def _items(
        self, rnd: _Round, client: ClientState, chosen: list[Decision],
    ) -> tuple[list[tuple[int, str, str]], list[tuple[int, str, str, int, int]]]:
        meta, counts = rnd.meta, rnd.counts
        decisions, items = [], []
        now = rnd.now
        for i, d in enumerate(chosen):
            start, end = piece_range(d.piece, max(rnd.length, (d.piece + 1) * meta.piece_size), meta.piece_size)
            deadline = now + allowance_ms(end - start + 1, self.min_rate)
            max_copies = claim_copies(i == 0, client, counts[d.piece], rnd.copy_limit, self.limits,
                                      dead_end=i == 0 and not client.inflight
                                      and self._dead_end(rnd, client)(d.piece))
            kind = rnd.sources[d.source].kind
            rnd.taken[d.source] = rnd.taken.get(d.source, 0) + 1
            if kind == "cdn":
                # one more copy for the decisions after this one, and (no peer holding it)
                # a young CDN upload, as the next round will see it
                if counts[d.piece] == 0:
                    rnd.pending_only.add(d.piece)
                counts[d.piece] += 1
            decisions.append((d.piece, d.source, kind))
            if kind != "cdn":
                peer = rnd.view.clients.get(d.source)
                if peer is not None and peer.info is not None:
                    rnd.addrs[d.source] = peer.info
            items.append((d.piece, d.source, kind, deadline, max_copies))
        return decisions, items

    def _next_stale(self, view: TaskView, meta: TaskMeta) -> float:
        """Seconds until the next CDN upload of this task passes PENDING_GRACE (inf: none)."""
        now = now_ms()
        if meta.piece_size <= 0 or not meta.cdn:
            return float("inf")
        return next_stale_s(view.sending(meta.cdn, now), now, self._allowance(meta), PENDING_GRACE_MS)

    def _dead_end(self, rnd: _Round, client: ClientState) -> Callable[[int], bool]:
        """Whether no copy of a piece can reach this client but from the seed: the seed
        is not sending it (an upload past PENDING_GRACE_MS does not count: its receiver
        is likely dead), and its holders (the first HOLDER_SCAN) are all gone, bad,
        failing, or on this client's blacklist."""
        view, pending, sources, fail_limit = rnd.view, rnd.pending_only, rnd.sources, self.limits.source_fail_limit

        def dead_end(n: int) -> bool:
            if n in pending:  # the CDN is sending it (a young upload): a holder soon
                return False
            for h in itertools.islice(view.holders[n] if n < len(view.holders) else (), HOLDER_SCAN):
                if h == client.cid or h in view.gone or h in client.blacklist:
                    continue
                src = sources.get(h)
                if src is not None and src.kind == "peer" and not src.bad and src.failures < fail_limit:
                    return False
            return True

        return dead_end

    def _next_rescue(self, view: TaskView, meta: TaskMeta, cid: str) -> float:
        """Seconds until this idle client may take a rescue piece (inf: not idle)."""
        rec = view.clients.get(cid)
        if rec is None:
            return float("inf")
        return max(0.05, rescue_in(after_reports(rec, [], meta.cdn, now_ms()), self.limits))

    def _allowance(self, meta: TaskMeta) -> Callable[[int], int]:
        """Piece n's assignment deadline is its start plus allowance(n) (as claimed in _items)."""
        return lambda n: piece_allowance_ms(meta.length, meta.piece_size, n, self.min_rate)

    async def _source(self, sid: str, kind: str, info: PeerInfo | None) -> wire.Source:
        if kind == "cdn":
            ip, port, tls = (*self.address, self.tls) if sid == self.sn_id else await self._supernode(sid)
            return wire.Source(sid, ip, port, "cdn", tls)
        assert info is not None
        return wire.Source(sid, info.ip, info.port, "peer", info.tls)

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

    async def _supernode(self, sid: str) -> tuple[str, int, bool]:
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


def _candidates(view: TaskView, ranked: list[int], counts: list[int], cdn_open: bool,
                rand: Callable[[int], int]) -> Iterator[Candidate]:
    """The ranked pieces that some source can serve now: their free holders (a sample),
    or the CDN copy when the CDN has room."""
    cdn = view.cdn
    for n in ranked:
        hs = view.free_holders_of(n, HOLDER_SAMPLE, rand(20))
        on = n in cdn
        if hs or (on and cdn_open):
            yield Candidate(n, on, hs, counts[n])


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
