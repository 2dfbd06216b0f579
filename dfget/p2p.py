"""One P2P download session: register, resume, then keep up to `pull_limit` pieces in
flight, pulling again as soon as a slot frees, and failing over between supernodes
without starting over (the same cid, pieces already done re-announced as `have`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from dataclasses import dataclass

from common import digest, wire
from common.errors import (
    DfError,
    PeerAddressDenied,
    PeerSecretRefused,
    Signal,
    SupernodeUnavailable,
    TaskFailed,
    from_wire,
)
from common.pieces import piece_count, piece_range

from .config import DownloadConfig
from .httpclient import HttpClient
from .notices import notice
from .output import PartFile, recheck
from .peerlink import PeerLink
from .piecefetch import FetchLimits, PieceFailed, fetch_piece
from .progress import Stats
from .stream import Want
from .supernodes import SupernodeDown, Supernodes

log = logging.getLogger("dfget.p2p")
DRAIN_WAIT = 5.0  # s a finished download waits for the peer server it launched to hear of it
PULL_WAIT = 20.0
SECRET_WAITS = 30  # x 0.1 s: how long another dfget of this host may take to share our peer's secret
MAX_FAIL_STREAK = 30
FAILOVER_WAIT = 30.0  # seconds a failover keeps trying while every supernode is down


class P2PGaveUp(Signal):
    """P2P made no progress (stall or too many failed pieces): go back to source."""


@dataclass(frozen=True)
class Flight:
    assignment: wire.Assignment
    generation: int  # which registration assigned it (bumped on failover)


class P2PSession:
    def __init__(self, cfg: DownloadConfig, http: HttpClient, part: PartFile,
                 stats: Stats, peer: PeerLink, limits: FetchLimits, want: Want | None = None) -> None:
        self.cfg, self.part, self.stats = cfg, part, stats
        self.want = want  # --range: only the pieces covering it (dfget/stream.py)
        self.peer, self.limits = peer, limits
        self.sn = Supernodes(http, cfg.nodes, cfg.tls)
        self.cid: str | None = None
        self.cids: list[str] = []  # every client id supernodes gave this download
        self.task: wire.TaskInfo | None = None
        self.generation = 0
        self.done: set[int] = set()
        self.reports: list[wire.Report] = []
        self.flights: dict[asyncio.Task[int], Flight] = {}
        # assignments of pieces still in flight from an earlier registration
        self.shadows: dict[int, wire.Assignment] = {}
        self.last_progress = time.monotonic()
        self.fail_streak = 0
        self.piece_auth = False  # what the supernode said at registration
        self.keys: list[wire.PieceKey] = []

    @property
    def task_id(self) -> str:
        assert self.task is not None
        return self.task.task_id

    def _register_request(self) -> wire.RegisterRequest:
        return wire.RegisterRequest(
            url=self.cfg.url or None, peer=self.peer.addr, headers=self.cfg.headers, md5=self.cfg.md5,
            identifier=self.cfg.identifier, filter=list(self.cfg.filter_keys),
            pattern="cdn" if self.cfg.pattern == "cdn" else "p2p", cid=self.cid,
            digest_algos=list(digest.ALGORITHMS))

    async def _register(self, *, skip_current: bool = False) -> None:
        self.sn.peer_secrets.update(await self.peer.secrets())
        waits = 0
        while True:
            try:
                reply = await self.sn.register(self._register_request(), skip_current=skip_current)
                break
            except PeerAddressDenied as exc:
                if self.peer.addr is None:
                    raise
                # Our peer server's address is not one the supernode lets others dial (e.g.
                # loopback): download anyway, just without serving.
                notice(f"downloading without serving: {exc.message}", serving=False)
                self.peer = PeerLink(None, None)
            except PeerSecretRefused as exc:
                if self.peer.addr is None:
                    raise
                if waits < SECRET_WAITS:
                    # Another dfget of this host registered our peer first and is about
                    # to hand its secret to the peer server: read it from there.
                    waits += 1
                    await asyncio.sleep(0.1)
                    self.sn.peer_secrets.update(await self.peer.secrets())
                    continue
                notice(f"downloading without serving: {exc.message}", serving=False)
                self.peer = PeerLink(None, None)
        if reply.peer_secret is not None and self.peer.addr is not None:
            url = self.sn.current.base_url
            self.sn.peer_secrets[url] = reply.peer_secret
            await self.peer.peer_secret(url, reply.peer_secret)
        self._adopt(reply)

    async def _register_file(self) -> None:
        """Our peer server serves the part file as this download's clients (every id a
        supernode gave us): when the file goes, exactly those leave the swarm."""
        assert self.task is not None
        await self.peer.register(self.task_id, self.part.path, self.task.length, self.task.piece_size,
                                 self.sn.base_urls(), self.piece_auth, self.keys, clients=self.cids[-64:])

    def _adopt(self, reply: wire.RegisterReply) -> None:
        self.piece_auth, self.keys = reply.piece_auth, list(reply.keys)
        self.cid = reply.cid
        if reply.cid not in self.cids:
            self.cids.append(reply.cid)
        self._update_task(reply.task)
        self.stats.supernode = self.sn.current.base_url
        if reply.task.status == "failed":
            raise _task_error(reply.task)

    def _update_task(self, task: wire.TaskInfo) -> None:
        self.task = task
        self.stats.task_id = task.task_id
        if task.length >= 0:
            self.stats.length = task.length
            self.stats.pieces = task.piece_count
        if self.want is not None:
            self.want.resolve(task.length, task.piece_size)

    def complete(self) -> bool:
        t = self.task
        if self.want is not None:
            return self.want.covers(self.done)
        return t is not None and t.length >= 0 and t.piece_count >= 0 and len(self.done) >= t.piece_count

    async def run(self) -> None:
        resuming = self.part.existed()
        if resuming:  # the same client as the run that wrote it, when we can
            self.cid = await asyncio.to_thread(self.part.load_cid)
        await self._register()
        assert self.task is not None and self.cid is not None
        await asyncio.to_thread(self.part.open, self.task.length)
        await asyncio.to_thread(self.part.save_cid, self.cid)
        if resuming and self.task.length > 0:
            await self._resume()
        await self._register_file()
        await self.peer.verified(self.task_id, sorted(self.done))
        await self._loop()  # on failure the caller leaves the swarm (leave), saying why
        await self._finish()

    async def _resume(self) -> None:
        """Only pieces whose bytes re-hash to the supernode's digests count as present."""
        assert self.task is not None
        reply = await self.sn.digests(self.task_id)
        t = reply.task
        count = piece_count(t.length, t.piece_size)
        ranges = [(n, *piece_range(n, t.length, t.piece_size), reply.digests[n])
                  for n in range(min(count, len(reply.digests)))]
        good = await asyncio.to_thread(recheck, self.part, ranges, t.digest_algo)
        for n in good:
            start, end = piece_range(n, t.length, t.piece_size)
            self.done.add(n)
            self.stats.pieces_resumed += 1
            self.stats.bytes_resumed += end - start + 1
            self.stats.piece_ready(n, start, end)
            self.reports.append(wire.Report(piece=n, result="have"))
        log.info("resume: %d of %d pieces on disk re-verified", len(good), count)

    async def _loop(self) -> None:
        pull: asyncio.Task[wire.PullReply] | None = None
        sender: asyncio.Task[None] | None = None
        try:
            while not self.complete():
                free = self.cfg.pull_limit - len(self.flights)
                if pull is None and free > 0:
                    pull = asyncio.create_task(self._pull(free))
                elif sender is None and self.reports:
                    sender = asyncio.create_task(self._send_reports())
                waits: set[asyncio.Future[object]] = set(self.flights)  # type: ignore[arg-type]
                waits.update(t for t in (pull, sender) if t is not None)
                timeout = max(0.1, self.cfg.stall_timeout - (time.monotonic() - self._alive_at()))
                finished, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                for t in finished:
                    if t in self.flights:
                        await self._piece_done(t)  # type: ignore[arg-type]
                try:
                    if pull in finished:
                        p, pull = pull, None
                        self._pulled(p.result())  # type: ignore[union-attr]
                    if sender in finished:
                        s, sender = sender, None
                        s.result()  # type: ignore[union-attr]
                except (SupernodeDown, _Reregister) as exc:
                    pull, sender = await _cancel(pull), await _cancel(sender)
                    await self._failover(str(exc), skip_current=isinstance(exc, SupernodeDown))
                except _ReportsRefused as exc:
                    log.info("reports refused, pulling again without them: %s", exc)
                if time.monotonic() - self._alive_at() > self.cfg.stall_timeout:
                    raise P2PGaveUp(f"no piece verified for {self.cfg.stall_timeout:.0f} s")
        finally:
            await _cancel(pull)
            await _cancel(sender)
            for t in list(self.flights):
                await _cancel(t)
            self.flights.clear()

    def _alive_at(self) -> float:
        """When the swarm last showed life: a verified piece, or a supernode answering
        that it is busy (overload is waited out, never a reason to leave the swarm)."""
        return max(self.last_progress, self.sn.busy_at)

    async def _pull(self, free: int) -> wire.PullReply:
        assert self.cid is not None
        reports, self.reports = self.reports[:64], self.reports[64:]
        wait = PULL_WAIT if not self.reports else 0.0
        started = time.monotonic()
        try:
            reply = await self.sn.pull(self.task_id, wire.PullRequest(
                cid=self.cid, limit=min(free, 16), wait=wait, reports=reports,
                window=self.want.window if self.want is not None else None))
        except DfError as exc:
            if exc.code == "not_found":  # the supernode forgot this client or task
                self.reports[:0] = reports
                raise _Reregister(exc.message) from None
            if reports and exc.code in _REFUSED:
                self.reports[:0] = _without_refused(reports, exc)
                raise _ReportsRefused(exc.message) from None
            self.reports[:0] = reports
            raise
        except BaseException:
            self.reports[:0] = reports  # not delivered: send them again after failover
            raise
        if reply.state == "wait" and time.monotonic() - started < 0.2:
            # A supernode that answers "wait" at once must not turn us into a busy loop.
            await asyncio.sleep(0.2)
        return reply

    def _pulled(self, reply: wire.PullReply) -> None:
        self._update_task(reply.task)
        if reply.task.length >= 0:
            self.part.set_length(reply.task.length)
        if reply.state == "failed":
            raise _task_error(reply.task)
        if reply.state == "finished" and not self.complete():
            raise P2PGaveUp("the supernode says finished but pieces are missing here")
        for a in reply.assignments:
            if a.piece in self.done:
                # the supernode lost a report of ours: tell it again (voids the assignment)
                self.reports.append(wire.Report(piece=a.piece, result="have"))
                continue
            if any(f.assignment.piece == a.piece for f in self.flights.values()):
                # Still in flight from before a failover: never two writers on one piece.
                # Its outcome settles this assignment (see _piece_done).
                self.shadows[a.piece] = a
                continue
            self._start(a)

    def _start(self, a: wire.Assignment) -> None:
        assert self.task is not None
        task = asyncio.create_task(fetch_piece(None, self.task_id, a, self.part, self.limits,
                                               self.cid, self.task.digest_algo))
        self.flights[task] = Flight(a, self.generation)

    async def _piece_done(self, task: asyncio.Task[int]) -> None:
        flight = self.flights.pop(task)
        a = flight.assignment
        shadow = self.shadows.pop(a.piece, None)
        try:
            nbytes = task.result()
        except PieceFailed as exc:
            log.info("piece %d from %s:%d failed: %s", a.piece, a.source.ip, a.source.port, exc)
            self.stats.peer_failures[exc.reason] += 1
            self.fail_streak += 1
            if flight.generation == self.generation:
                self.reports.append(wire.Report(piece=a.piece, result="failed", source=a.source.cid,
                                                reason=exc.reason))  # type: ignore[arg-type]
            if self.fail_streak > MAX_FAIL_STREAK:
                raise P2PGaveUp(f"{self.fail_streak} pieces failed in a row") from None
            if shadow is not None:
                self._start(shadow)  # the piece's current assignment, now that nobody writes it
            return
        self.fail_streak = 0
        self.last_progress = time.monotonic()
        self.done.add(a.piece)
        self.stats.add_piece(a.source.kind, nbytes)
        self.stats.piece_ready(a.piece, a.start, a.end)
        # The peer server learns of the piece before the supernode sends anyone to us.
        await self.peer.verified(self.task_id, [a.piece], self.task.length if self.task else None)
        result = "ok" if flight.generation == self.generation else "have"
        self.reports.append(wire.Report(piece=a.piece, result=result,
                                        source=a.source.cid if result == "ok" else None))

    async def _send_reports(self) -> None:
        assert self.cid is not None
        while self.reports:
            batch, self.reports = self.reports[:64], self.reports[64:]
            try:
                await self.sn.report(self.task_id, wire.ReportRequest(cid=self.cid, reports=batch))
            except SupernodeDown:
                self.reports[:0] = batch
                raise
            except DfError as exc:
                # 409 (not assigned to us any more) and the like: the piece stays ours.
                if exc.code == "not_found":
                    self.reports[:0] = batch
                    raise _Reregister(exc.message) from None
                log.info("report rejected: %s", exc.message)
                if exc.code in _REFUSED:  # nothing was applied: the others go again
                    self.reports[:0] = _without_refused(batch, exc)

    async def _failover(self, why: str, *, skip_current: bool) -> None:
        log.warning("supernode %s: %s; moving on", self.sn.current.base_url, why)
        self.stats.failovers += 1
        self.generation += 1
        self.shadows.clear()  # assignments of the registration being left
        known = len(self.cids)
        await self._register_again(skip_current)
        await self.peer.trust(self.keys)  # the new supernode's tokens must verify at our peer server
        if len(self.cids) != known and self.task is not None:
            await self._register_file()  # a new client id: the peer server must know it too
            await self.peer.verified(self.task_id, sorted(self.done))
        self.reports = [wire.Report(piece=n, result="have") for n in sorted(self.done)]

    async def _register_again(self, skip_current: bool) -> None:
        """Mid-download, every supernode being down is most often one restarting (or its
        Redis): with pieces in hand, keep trying them all with backoff for a while
        (bounded by FAILOVER_WAIT and the stall timeout) before going back to source."""
        deadline = time.monotonic() + min(FAILOVER_WAIT, self.cfg.stall_timeout)
        delay = 0.2
        while True:
            try:
                await self._register(skip_current=skip_current)
                return
            except SupernodeUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.info("%s; trying again in %.1f s", exc.message, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
            skip_current = False

    async def _finish(self) -> None:
        assert self.task is not None
        if self.want is not None:
            # --range: the pieces it needs are verified in the part file, which the peer
            # server keeps serving (the rest of the file was never fetched)
            self.want.partial = True
            return
        length = self.task.length
        await asyncio.to_thread(functools.partial(self.part.finish, length, self.cfg.md5, keep_part=True,
                                                  sha256=_hex(self.cfg.digest)))
        try:
            await self.peer.moved(self.task_id, self.cfg.output, await self._content())
            # A server we launched may not be up yet, with this news in its queue: the part
            # file's name stays until it has heard where the file went (else peers asking
            # meanwhile find neither name)
            await self.peer.drain(DRAIN_WAIT)
        finally:
            await asyncio.to_thread(self.part.release)
        with contextlib.suppress(SupernodeDown, DfError):
            await self._final_report("finished")

    async def _content(self) -> str | None:
        """The output's sha256: --digest's (checked by finish), else the supernode's, which
        hashed the same bytes every piece of ours was verified against (asked once more if
        our last news of the task is older than its CDN's end; never waited for)."""
        if self.cfg.digest:
            return _hex(self.cfg.digest)
        if self.task is not None and self.task.content is None and self.peer.addr is not None:
            with contextlib.suppress(SupernodeDown, DfError):
                self.task = (await self.sn.digests(self.task_id)).task
        content = self.task.content if self.task is not None else None
        if content and content.startswith("sha256:") and len(content) == 71:
            return content[7:]
        return None

    async def leave(self, back_to_source: wire.BackToSourceReason | None) -> None:
        """Tell the supernode this client gives up (its in-flight pieces are released), and
        whether it now goes to the origin itself (counted there by reason). Best effort:
        a supernode that does not answer within 3 s is not waited for."""
        if self.cid is None or self.task is None or self.complete():
            return
        with contextlib.suppress(SupernodeDown, DfError, asyncio.CancelledError, TimeoutError):
            async with asyncio.timeout(3):
                if back_to_source is not None:
                    try:
                        await self._final_report("back_to_source", back_to_source)
                        return
                    except DfError as exc:
                        if exc.code != "bad_request":
                            raise
                        # a supernode older than the back_to_source event: plain abort
                await self._final_report("aborted")

    async def _final_report(self, event: str, reason: str | None = None) -> None:
        assert self.cid is not None
        while len(self.reports) > 64:
            await self._send_reports_once()
        await self.sn.report(self.task_id, wire.ReportRequest(
            cid=self.cid, reports=self.reports, event=event, reason=reason))  # type: ignore[arg-type]
        self.reports = []

    async def _send_reports_once(self) -> None:
        assert self.cid is not None
        batch, self.reports = self.reports[:64], self.reports[64:]
        await self.sn.report(self.task_id, wire.ReportRequest(cid=self.cid, reports=batch))


class _Reregister(Signal):
    """The supernode forgot us (404): register again there, same cid."""


class _ReportsRefused(Signal):
    """A batch of piggy-backed reports was refused as a whole: pull again."""


_REFUSED = ("conflict", "bad_request")


def _without_refused(batch: list[wire.Report], exc: DfError) -> list[wire.Report]:
    """The batch minus the report the supernode named (all of it if none is named: an
    older supernode). Every refusal drops at least one report, so retries end."""
    piece = exc.detail.get("piece")
    if not isinstance(piece, int):
        return []
    rest = [r for r in batch if r.piece != piece]
    return rest if len(rest) < len(batch) else []


def _hex(digest: str | None) -> str | None:
    return digest.split(":", 1)[1] if digest else None


def _task_error(task: wire.TaskInfo) -> DfError:
    if task.error:
        return from_wire(task.error, fallback_status=502)
    return TaskFailed("the supernode reports the task as failed")


async def _cancel(task: asyncio.Task[object] | None) -> None:
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    elif task is not None and not task.cancelled():
        task.exception()
    return None
