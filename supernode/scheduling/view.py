"""This supernode's in-process view of a task's scheduling state, kept exact by replaying
the change log every script writes (scripts.py: `emit`/`flush`).

Why: a pull used to read the task from Redis in three scripts (snapshot, holders,
claim), re-decoding the whole meta hash, counts and bitmaps each time; one process
answered ~125 pulls/s. Now the scheduler decides from this view, in memory, and the
only Redis work of a pull is one script that applies its reports and claims what was
decided, re-checking every invariant there (a view a moment old can only cost a lost
claim, never a wrong assignment).

Each change of a task in Redis is logged as ops and published with the task's next
sequence number (`seq\\nop\\nop...`). The script's caller gets the same text back, so
its own changes are in its view before it answers; the copy that arrives by pub/sub is
then recognised by its number and skipped. Ops are applied strictly in sequence order:
one that arrives early waits for the missing ones, and a gap that is not filled within
GAP_TIMEOUT (a message lost in a reconnect) makes the view reload from Redis.

Ops (fields separated by one space):
  P cid info         client registered (info: "peer_id|ip|port|kind")
  D cid              client removed (its pieces, assignments and uploads with it)
  H cid n            cid now holds piece n (a new holder: never repeated)
  L cid n            cid no longer holds piece n (it failed a possession challenge)
  T cid n src dl     piece n assigned to cid from src until dl (ms)
  R cid n            cid's assignment of piece n is over (reported, expired, released)
  B cid src          src blacklisted for cid
  F src              one more failure reported against src
  C cid              one more failure reported by cid
  X src              src dropped for everyone
  G n digest         the CDN verified piece n
  U [n]              the CDN copy of piece n (of every piece) is unusable
  M                  the task's meta changed (read again before the next decision)
  A                  everything may have changed (a takeover): reload
  Z                  the task was deleted

This module is pure: no I/O, no clock (callers pass `now_ms`). `supernode/scheduling/views.py`
loads, feeds and evicts the views.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Iterable
from itertools import compress

from common import wire
from supernode.store.repo import PeerInfo, TaskMeta

from .policy import ClientState, RarityOrder, failure_blacklists

SOURCE_KINDS = ("peer", "peer-cdn")  # clients whose peer server serves pieces to others
HOLDER_SCAN = 64  # holder list entries looked at at most for free ones, per piece
GAP_TIMEOUT = 1.0  # seconds a missing sequence number is waited for before a reload
ORDER_TTL = 0.05  # seconds a rarity order is reused while holders change
NEVER = 1 << 62  # a deadline that never comes
MAX_PENDING = 4096  # out-of-order events kept at most before giving up and reloading


class Flags:
    """A set of piece numbers as one byte per piece (0/1), with Bitmap's read interface
    (`in`, members, count) for the scheduler."""

    __slots__ = ("data", "n")

    def __init__(self, data: bytearray | None = None) -> None:
        self.data = data if data is not None else bytearray()
        self.n = sum(self.data)

    def __contains__(self, piece: int) -> bool:
        return 0 <= piece < len(self.data) and self.data[piece] == 1

    def add(self, piece: int) -> bool:
        if piece >= len(self.data):
            self.data.extend(bytes(piece + 1 - len(self.data)))
        if self.data[piece]:
            return False
        self.data[piece] = 1
        self.n += 1
        return True

    def discard(self, piece: int) -> None:
        if 0 <= piece < len(self.data) and self.data[piece]:
            self.data[piece] = 0
            self.n -= 1

    def clear(self) -> None:
        self.data = bytearray(len(self.data))
        self.n = 0

    def count(self) -> int:
        return self.n

    def members(self, n: int) -> list[int]:
        return list(compress(range(min(n, len(self.data))), self.data))

    @classmethod
    def of_bitmap(cls, raw: bytes) -> Flags:
        """A Redis bitmap (bit n = MSB-first bit n of the string)."""
        if not raw:
            return cls()
        bits = bin(int.from_bytes(raw, "big") | (1 << (8 * len(raw))))[3:]
        return cls(bytearray(bits.encode().translate(_FLAG)))


_FLAG = bytes.maketrans(b"01", b"\x00\x01")


class ClientRec:
    __slots__ = ("cid", "info", "have", "fly", "bl", "fails", "fed_at")

    def __init__(self, cid: str, info: PeerInfo | None, now: float = 0.0) -> None:
        self.cid = cid
        # when it was last given a piece or ended one (monotonic; its registration at
        # first): how long a client with nothing in flight has waited (policy.starving)
        self.fed_at = now
        self.info = info
        self.have = Flags()
        self.fly: dict[int, tuple[str, int]] = {}  # piece -> (source, deadline ms)
        self.bl: set[str] = set()
        self.fails = 0


class TaskView:
    def __init__(self, task_id: str, peer_cap: int = 0) -> None:
        self.task_id = task_id
        # Sources that can take one more upload: clients holding a piece, serving others,
        # below `peer_cap` uploads (0: no cap known, every such client). Kept as ops
        # arrive, so a decision looks only at holders that can serve it, and a task whose
        # sources are all busy is seen to be so without looking at any piece.
        self.peer_cap = peer_cap
        self.free: set[str] = set()
        self.seq = 0
        self.meta: TaskMeta | None = None
        self.meta_stale = True
        self.cdn = Flags()
        self.digests: dict[int, str] = {}
        self.counts: list[int] = []  # peer holders per piece
        self.holders: list[list[str]] = []  # per piece; may keep clients in `gone` (skipped)
        self.gone: set[str] = set()  # removed clients still listed in `holders`
        self.order: RarityOrder | None = None
        self.order_at = 0.0
        self.order_dirty = True
        self.clients: dict[str, ClientRec] = {}
        self.uploads: dict[str, dict[str, int]] = {}  # source -> {"cid:piece": deadline ms}
        self.earliest: dict[str, int] = {}  # source -> no upload of it ends before this (ms)
        # (deadline, source) for every value `earliest` took: expire() pops what is due
        # instead of scanning every source (a heap entry whose source moved on is skipped)
        self._due: list[tuple[int, str]] = []
        self.fails: dict[str, int] = {}
        self.bad: set[str] = set()
        self.pending: dict[int, list[str]] = {}  # seq -> ops that arrived early
        self.gap_since: float | None = None  # when the first early event arrived
        self.stale = False  # must be reloaded before use (a takeover, a lost event)
        self.now = 0.0  # monotonic time of the event being applied
        self.deleted = False

    # --- loading ----------------------------------------------------------------------
    @classmethod
    def load(cls, task_id: str, seq: int, meta: TaskMeta | None, cdn: bytes, digests: dict[int, str],
             clients: Iterable[tuple[str, PeerInfo | None, bytes, dict[int, tuple[str, int]], set[str], int]],
             fails: dict[str, int], bad: set[str], now: float = 0.0, peer_cap: int = 0) -> TaskView:
        v = cls(task_id, peer_cap)
        v.seq = seq
        v.now = now
        v.meta, v.meta_stale = meta, meta is None
        v.cdn = Flags.of_bitmap(cdn)
        v.digests = digests
        v.fails, v.bad = fails, bad
        for cid, info, have, fly, bl, nfails in clients:
            rec = v.clients[cid] = ClientRec(cid, info, now)
            rec.have = Flags.of_bitmap(have)
            rec.fly, rec.bl, rec.fails = fly, bl, nfails
            for n in rec.have.members(len(rec.have.data)):
                v._grow(n)
                v.counts[n] += 1
                v.holders[n].append(cid)
        cdn_id = meta.cdn if meta is not None else ""
        for cid, rec in v.clients.items():
            for n, (src, dl) in rec.fly.items():
                if src in v.clients or src == cdn_id:  # a source that left took its uploads along
                    v._upload(src, f"{cid}:{n}", dl)
        for cid in v.clients:
            v._refresh_free(cid)
        return v

    # --- replay -----------------------------------------------------------------------
    def offer(self, seq: int, ops: list[str], now: float) -> int:
        """Take an event; returns how many new pieces or free slots the applied events
        made (-1: status changed, wake everyone). Out of order: kept until its turn."""
        if seq <= self.seq:
            return 0
        self.now = now
        if seq > self.seq + 1:
            self.pending[seq] = ops
            if self.gap_since is None:
                self.gap_since = now
            if len(self.pending) > MAX_PENDING:
                self.stale = True
            return 0
        woke = self.apply(ops)
        self.seq = seq
        while self.seq + 1 in self.pending:
            self.seq += 1
            w = self.apply(self.pending.pop(self.seq))
            woke = -1 if w < 0 or woke < 0 else woke + w
        self.gap_since = None if not self.pending else now
        return woke

    def gap_expired(self, now: float) -> bool:
        return self.gap_since is not None and now - self.gap_since > GAP_TIMEOUT

    def apply(self, ops: list[str]) -> int:
        woke = 0
        status = False
        for op in ops:
            f = op.split(" ")
            code = f[0]
            if code == "T":
                rec = self.clients.get(f[1])
                n, dl = int(f[2]), int(f[4])
                src_rec = self.clients.get(f[3])
                src = src_rec.cid if src_rec is not None else f[3]  # one copy of an id, not one an op
                if rec is not None:
                    rec.fly[n] = (src, dl)
                    rec.fed_at = self.now
                self._upload(src, f"{f[1]}:{n}", dl)
                if src in self.free:
                    self._refresh_free(src)
            elif code == "R":
                rec = self.clients.get(f[1])
                if rec is not None:
                    entry = rec.fly.pop(int(f[2]), None)
                    rec.fed_at = self.now
                    if entry is not None:
                        up = self.uploads.get(entry[0])
                        if up is not None:
                            up.pop(f"{f[1]}:{f[2]}", None)
                            self._refresh_free(entry[0])
                woke += 1
            elif code == "H":
                rec = self.clients.get(f[1])
                n = int(f[2])
                if rec is not None and rec.have.add(n):
                    self._grow(n)
                    self.counts[n] += 1
                    self.holders[n].append(rec.cid)  # the record's copy of the id, shared
                    self.order_dirty = True
                    if rec.have.n == 1:
                        self._refresh_free(f[1])
                    woke += 1
            elif code == "L":
                self._lose(f[1], int(f[2]))
            elif code == "P":
                rec = self.clients.get(f[1])
                info = PeerInfo.decode(f[2]) if len(f) > 2 else None
                if rec is None:
                    if f[1] in self.gone:  # back under the same id: its old entries must go
                        self._compact()
                    self.clients[f[1]] = ClientRec(f[1], info, self.now)
                else:
                    rec.info = info
                    self._refresh_free(f[1])
            elif code == "D":
                self._remove(f[1])
                woke += 1
            elif code == "G":
                n = int(f[1])
                self.digests[n] = f[2]
                if self.cdn.add(n):
                    self._grow(n)
                    woke += 1
            elif code == "B":
                rec = self.clients.get(f[1])
                if rec is not None:
                    rec.bl.add(f[2])
            elif code == "F":
                self.fails[f[1]] = self.fails.get(f[1], 0) + 1
            elif code == "C":
                rec = self.clients.get(f[1])
                if rec is not None:
                    rec.fails += 1
            elif code == "X":
                self.bad.add(f[1])
            elif code == "U":
                if len(f) > 1:
                    self.cdn.discard(int(f[1]))
                else:
                    self.cdn.clear()
            elif code == "M":
                self.meta_stale = True
                status = True
            elif code == "A":
                self.stale = True
                status = True
            elif code == "Z":
                self.deleted = True
                status = True
        return -1 if status else woke

    def _grow(self, n: int) -> None:
        if n >= len(self.counts):
            extra = n + 1 - len(self.counts)
            self.counts.extend([0] * extra)
            self.holders.extend([] for _ in range(extra))

    def _remove(self, cid: str) -> None:
        rec = self.clients.pop(cid, None)
        self.free.discard(cid)
        if rec is None:
            return
        held = rec.have.members(len(rec.have.data))
        for n in held:
            self.counts[n] -= 1  # its entry in holders[n] is skipped from now on
        if held:
            self.gone.add(cid)
            self.order_dirty = True
            if len(self.gone) > 64 and len(self.gone) > len(self.clients) // 4:
                self._compact()
        for n, (src, _) in rec.fly.items():
            up = self.uploads.get(src)
            if up is not None:
                up.pop(f"{cid}:{n}", None)
                self._refresh_free(src)
        self.uploads.pop(cid, None)
        self.earliest.pop(cid, None)

    def _lose(self, cid: str, n: int) -> None:
        rec = self.clients.get(cid)
        if rec is None or n not in rec.have:
            return
        rec.have.discard(n)
        self.counts[n] -= 1
        if cid in self.holders[n]:
            self.holders[n].remove(cid)
        self.order_dirty = True
        self._refresh_free(cid)

    def _refresh_free(self, cid: str) -> None:
        rec = self.clients.get(cid)
        if (rec is not None and rec.have.n > 0 and rec.info is not None and rec.info.kind in SOURCE_KINDS
                and (not self.peer_cap or len(self.uploads.get(cid) or ()) < self.peer_cap)):
            self.free.add(cid)
        else:
            self.free.discard(cid)

    def expire(self, now_ms: int) -> None:
        """Drop the uploads past their deadline (Redis drops them before it checks a cap):
        their sources are free again."""
        due = self._due
        while due and due[0][0] <= now_ms:
            deadline, src = heapq.heappop(due)
            if self.earliest.get(src) == deadline:
                self.load_of(src, now_ms)

    # --- reads for the scheduler --------------------------------------------------------
    def _upload(self, source: str, member: str, deadline: int) -> None:
        self.uploads.setdefault(source, {})[member] = deadline
        if deadline < self.earliest.get(source, NEVER):
            self.earliest[source] = deadline
            heapq.heappush(self._due, (deadline, source))

    def load_of(self, source: str, now_ms: int) -> int:
        """Uploads `source` is doing (those past their deadline do not count: Redis
        drops them before it checks a cap)."""
        up = self.uploads.get(source)
        if not up:
            return 0
        if now_ms >= self.earliest.get(source, NEVER):
            for m in [m for m, dl in up.items() if dl <= now_ms]:
                del up[m]
            if up:
                self.earliest[source] = first = min(up.values())
                heapq.heappush(self._due, (first, source))
            else:
                del self.earliest[source]
            self._refresh_free(source)
        return len(up)

    def sending(self, source: str, now_ms: int) -> list[tuple[int, int]]:
        """(piece, deadline ms) of the uploads `source` is doing now."""
        up = self.uploads.get(source) or {}
        return [(int(m.rsplit(":", 1)[1]), dl) for m, dl in up.items() if dl > now_ms]

    def _compact(self) -> None:
        gone = self.gone
        for hs in self.holders:
            if hs:
                hs[:] = [c for c in hs if c not in gone]
        gone.clear()

    def holders_of(self, n: int, sample: int, start: int) -> list[str]:
        """Up to `sample` current holders of piece n: the run of them from position
        `start` (mod their number) on, so callers spread over all holders by varying it."""
        if n >= len(self.holders):
            return []
        hs = self.holders[n]
        k = len(hs)
        gone = self.gone
        if not gone:
            if k <= sample:
                return list(hs)
            i = start % k
            return hs[i:i + sample] if i + sample <= k else hs[i:] + hs[:i + sample - k]
        if k > 2 * self.counts[n] + 8:  # mostly clients that left: compact this list
            hs[:] = [c for c in hs if c not in gone]
            k = len(hs)
        # skip those that left, however many sit in a row (a run of them must not hide
        # the holders behind it: it kept clients waiting for a minute in the soak)
        out: list[str] = []
        i = start % k if k else 0
        for j in range(k):
            c = hs[(i + j) % k]
            if c not in gone:
                out.append(c)
                if len(out) >= sample:
                    break
        return out

    def free_holders_of(self, n: int, sample: int, start: int) -> list[str]:
        """Up to `sample` holders of piece n that can take an upload now (`free`): from
        position `start` (mod their number) on, looking at HOLDER_SCAN entries at most."""
        if n >= len(self.holders):
            return []
        hs = self.holders[n]
        k = len(hs)
        if not k:
            return []
        free = self.free
        i = start % k
        if k <= HOLDER_SCAN and i == 0:
            out = [c for c in hs if c in free]
            return out[:sample]
        out = []
        for j in range(min(k, HOLDER_SCAN)):
            c = hs[(i + j) % k]
            if c in free:
                out.append(c)
                if len(out) >= sample:
                    break
        return out

    def rarity(self, piece_count: int, now: float) -> RarityOrder:
        """The pieces by holders, rebuilt at most every ORDER_TTL while they change."""
        o = self.order
        if o is None or o.piece_count != piece_count or (self.order_dirty and now - self.order_at > ORDER_TTL):
            o = self.order = RarityOrder(self.counts, piece_count)
            self.order_at, self.order_dirty = now, False
        return o

    def piece_count(self) -> int:
        meta = self.meta
        if meta is not None and meta.piece_count >= 0:
            return meta.piece_count
        return len(self.cdn.data)  # length unknown yet: what the CDN has so far


def after_reports(rec: ClientRec, reports: list[wire.Report], cdn: str, now: int,
                  mono: float | None = None) -> ClientState:
    """The client as it will be once the store has applied `reports` (scripts.py,
    apply_reports), for deciding in the same round trip: pieces reported held, their
    assignments over, failed sources avoided. The claim re-checks all of it. `now` is
    the store's clock (ms), `mono` the monotonic one (s) that `fed_at` is on."""
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
            elif entry is not None and failure_blacklists(entry[0], cdn, r.reason):
                bl.add(entry[0])
                fails += 1
    return ClientState(
        cid=rec.cid, have=have, inflight=frozenset(inflight), blacklist=frozenset(bl), failures=fails,
        cdn_only=rec.info is not None and rec.info.kind == "peer-cdn",
        idle_for=0.0 if reports else max(0.0, (time.monotonic() if mono is None else mono) - rec.fed_at),
    )
