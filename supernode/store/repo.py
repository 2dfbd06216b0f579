"""Typed access to the task state in Redis. Each method is one atomic script or read."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from common import digest, wire
from common.errors import Signal, StoreError

from . import keys
from .bitmaps import Bitmap, decode_counts
from .connection import Store, translate


def now_ms() -> int:
    return int(time.time() * 1000)


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _pairs(flat: list[Any]) -> dict[str, str]:
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}


class ReportRefused(Signal):
    """A report the store refused (status, value): nothing of the batch was applied."""

    def __init__(self, status: str, value: str) -> None:
        super().__init__(status, value)
        self.status = status
        self.value = value


@dataclass(frozen=True)
class TaskMeta:
    task_id: str
    url: str
    url_key: str
    md5: str
    identifier: str
    range: str
    headers: dict[str, str]
    status: str
    length: int
    piece_size: int
    piece_count: int
    cdn: str
    file_digest: str
    error: str
    error_message: str
    created_ms: int
    content: str = ""  # sha256 hex of the whole file, once the CDN has it all
    digest_algo: str = digest.LEGACY  # of its pieces (common/digest.py): fixed at registration

    @classmethod
    def from_hash(cls, task_id: str, h: dict[str, str]) -> TaskMeta:
        return cls(
            task_id=task_id,
            url=h.get("url", ""),
            url_key=h.get("url_key", ""),
            md5=h.get("md5", ""),
            identifier=h.get("identifier", ""),
            range=h.get("range", ""),
            headers=json.loads(h.get("headers") or "{}"),
            status=h.get("status", "pending"),
            length=int(h.get("length", "-1")),
            piece_size=int(h.get("piece_size", "0")),
            piece_count=int(h.get("piece_count", "-1")),
            cdn=h.get("cdn", ""),
            file_digest=h.get("file_digest", ""),
            error=h.get("error", ""),
            error_message=h.get("error_message", ""),
            created_ms=int(h.get("created_ms", "0")),
            content=h.get("content", ""),
            digest_algo=h.get("digest_algo") or digest.LEGACY,
        )

    def info(self) -> wire.TaskInfo:
        err = {"error": self.error, "message": self.error_message} if self.error else None
        return wire.TaskInfo(
            task_id=self.task_id,
            length=self.length,
            piece_size=self.piece_size,
            piece_count=self.piece_count,
            status=self.status,
            digest_algo=self.digest_algo,
            file_digest=self.file_digest or None,
            error=err,
            content=f"sha256:{self.content}" if self.content else None,
        )


@dataclass(frozen=True)
class PeerInfo:
    peer_id: str
    ip: str
    port: int
    kind: str
    tls: bool = False  # its peer server serves over TLS

    def encode(self) -> str:
        # a fifth field only when set: records of plain peers read as they always did
        return f"{self.peer_id}|{self.ip}|{self.port}|{self.kind}" + ("|tls" if self.tls else "")

    @classmethod
    def decode(cls, raw: str) -> PeerInfo | None:
        parts = raw.split("|")
        if len(parts) not in (4, 5):
            return None
        return cls(parts[0], parts[1], int(parts[2]), parts[3], len(parts) == 5 and parts[4] == "tls")


class SourceLoad(NamedTuple):
    """A source's transfers in flight and failures, as the `detail` script counts them."""

    sid: str
    kind: str  # "peer" or "cdn"
    load: int = 0
    failures: int = 0


@dataclass
class Detail:
    holders: list[tuple[str, ...]]
    digests: list[str]
    sources: dict[str, SourceLoad] = field(default_factory=dict)
    addresses: dict[str, PeerInfo] = field(default_factory=dict)


@dataclass
class TaskOverview:
    meta: TaskMeta
    cdn_pieces: int  # pieces the CDN has verified
    clients: int
    held: int  # piece copies held by clients, all clients together


@dataclass
class ClientView:
    cid: str
    info: PeerInfo
    have: bytes  # the bitmap as stored (bit n = piece n, MSB first)
    inflight: list[tuple[int, str]]  # (piece, source id) assigned and not yet reported
    uploads: int  # pieces of this task it is sending now
    failures: int


@dataclass
class PieceMap:
    meta: TaskMeta
    cdn: bytes  # bitmap of the pieces the CDN has verified
    cdn_uploads: int
    clients_total: int
    clients: list[ClientView]  # at most the cap asked for, sorted by address
    sources: dict[str, PeerInfo]  # address of every client source named in `inflight`


class Repo:
    def __init__(self, store: Store, *, ttl_ms: int = keys.TASK_KEY_TTL_MS) -> None:
        self.store = store
        self.r = store.client
        self.ttl = ttl_ms
        self._meta_cache: dict[tuple[str, tuple[tuple[str, str], ...]], TaskMeta] = {}
        self._touched: dict[str, float] = {}

    # --- tasks ------------------------------------------------------------------------
    async def register_task(
        self, task_id: str, *, url: str, url_key: str, md5: str, identifier: str,
        range_: str, headers: dict[str, str], fail_interval_ms: int, digest_algo: str = digest.LEGACY,
    ) -> tuple[str, str]:
        """A task that already exists keeps its fields, its `digest_algo` too."""
        res = await self.store.run(
            "register_task",
            [keys.meta(task_id)],
            [url, url_key, md5, identifier, range_, json.dumps(headers, sort_keys=True),
             now_ms(), self.ttl, fail_interval_ms, digest.check(digest_algo)],
        )
        await self.touch(task_id)
        return _s(res[0]), _s(res[1])

    async def touch(self, task_id: str) -> None:
        """Record an access for the idle-task GC. At most once a second per task: the GC
        counts idleness in minutes, and every pull touches."""
        now = time.monotonic()
        if now - self._touched.get(task_id, -1.0) < 1.0:
            return
        if len(self._touched) > 10_000:
            self._touched.clear()
        self._touched[task_id] = now
        await self._touch(task_id)

    @translate
    async def _touch(self, task_id: str) -> None:
        await self.r.zadd(keys.TASK_INDEX, {task_id: now_ms()})

    @translate
    async def get_meta(self, task_id: str) -> TaskMeta | None:
        h = await self.r.hgetall(keys.meta(task_id))
        if not h:
            return None
        return TaskMeta.from_hash(task_id, {_s(a): _s(b) for a, b in h.items()})

    async def set_meta(self, task_id: str, **fields: object) -> bool:
        args: list[Any] = [self.ttl]
        for name, value in fields.items():
            args += [name, str(value)]
        return bool(await self.store.run("set_meta", [keys.meta(task_id)], args))

    async def publish_pieces(self, task_id: str, cdn_id: str, pieces: list[tuple[int, str]]) -> None:
        args: list[Any] = [self.ttl, cdn_id]
        for n, d in pieces:
            args += [n, d]
        await self.store.run("publish_pieces", [keys.meta(task_id)], args)

    async def unpublish_pieces(self, task_id: str, pieces: list[int]) -> None:
        """Take pieces (all of them: []) of the CDN copy out of scheduling."""
        await self.store.run("unpublish_pieces", [keys.meta(task_id)], [self.ttl, *pieces])

    async def finish_task(self, task_id: str, cdn_id: str, fields: dict[str, object],
                          pieces: list[tuple[int, str]]) -> bool:
        """Meta fields and every piece digest at once (scripts.FINISH_TASK)."""
        args: list[Any] = [self.ttl, cdn_id, len(fields)]
        for name, value in fields.items():
            args += [name, str(value)]
        for n, d in pieces:
            args += [n, d]
        return bool(await self.store.run("finish_task", [keys.meta(task_id)], args))

    @translate
    async def digests(self, task_id: str) -> dict[int, str]:
        h = await self.r.hgetall(keys.digests(task_id))
        return {int(_s(a)): _s(b) for a, b in h.items()}

    @translate
    async def cdn_bitmap(self, task_id: str) -> Bitmap:
        return Bitmap(await self.r.get(keys.cdnmap(task_id)))

    async def delete_task(self, task_id: str) -> None:
        await self.store.run("delete_task", [keys.meta(task_id)], [])
        await self._zrem_task(task_id)

    @translate
    async def _zrem_task(self, task_id: str) -> None:
        await self.r.zrem(keys.TASK_INDEX, task_id)

    @translate
    async def list_tasks(self, limit: int = 1000) -> list[str]:
        ids = await self.r.zrevrange(keys.TASK_INDEX, 0, limit - 1)
        return [_s(i) for i in ids]

    @translate
    async def idle_tasks(self, older_than_ms: int) -> list[str]:
        ids = await self.r.zrangebyscore(keys.TASK_INDEX, "-inf", now_ms() - older_than_ms, start=0, num=500)
        return [_s(i) for i in ids]

    # --- leases -----------------------------------------------------------------------
    @translate
    async def take_lease(self, task_id: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self.r.set(keys.lease(task_id), owner, nx=True, px=ttl_ms))

    async def keep_lease(self, task_id: str, owner: str, ttl_ms: int) -> bool:
        return bool(await self.store.run("lease_keep", [keys.lease(task_id)], [owner, ttl_ms]))

    @translate
    async def lease_holder(self, task_id: str) -> str | None:
        v = await self.r.get(keys.lease(task_id))
        return _s(v) if v else None

    @translate
    async def lease_ttl_ms(self, task_id: str) -> int:
        """Milliseconds left on the task's lease (<= 0: nobody holds it)."""
        return int(await self.r.pttl(keys.lease(task_id)))

    async def adopt_cdn(self, task_id: str, cdn_id: str, pieces: list[tuple[int, str]]) -> bool:
        """Name `cdn_id` the task's CDN holding exactly `pieces` (a takeover)."""
        args: list[Any] = [self.ttl, cdn_id]
        for n, d in pieces:
            args += [n, d]
        return bool(await self.store.run("adopt_cdn", [keys.meta(task_id)], args))

    @translate
    async def origin_validators(self, task_id: str) -> tuple[str, str]:
        """ETag and Last-Modified the task's fetch started with ('' if none)."""
        etag, lm = await self.r.hmget(keys.meta(task_id), ["etag", "last_modified"])
        return (_s(etag) if etag else ""), (_s(lm) if lm else "")

    # --- peers ------------------------------------------------------------------------
    async def add_peer(self, task_id: str, cid: str, info: PeerInfo) -> bool:
        ok = await self.store.run("add_peer", [keys.meta(task_id)], [cid, info.encode(), self.ttl])
        if ok and info.kind == "peer":
            await self._index_host(info.peer_id, task_id)
        return bool(ok)

    @translate
    async def _index_host(self, peer_id: str, task_id: str) -> None:
        pipe = self.r.pipeline(transaction=False)
        pipe.sadd(keys.host(peer_id), task_id)
        pipe.pexpire(keys.host(peer_id), keys.HOST_TTL_MS)
        pipe.set(keys.alive(peer_id), b"1", px=keys.PEER_ALIVE_TTL_MS)
        await pipe.execute()

    @translate
    async def peer_of(self, task_id: str, cid: str) -> PeerInfo | None:
        raw = await self.r.hget(keys.peers(task_id), cid)
        return PeerInfo.decode(_s(raw)) if raw else None

    @translate
    async def heartbeat(self, peer_id: str) -> bool:
        pipe = self.r.pipeline(transaction=False)
        pipe.set(keys.alive(peer_id), b"1", px=keys.PEER_ALIVE_TTL_MS)
        pipe.pexpire(keys.host(peer_id), keys.HOST_TTL_MS)
        res = await pipe.execute()
        return bool(res[1])

    @translate
    async def is_alive(self, peer_id: str) -> bool:
        return bool(await self.r.exists(keys.alive(peer_id)))

    @translate
    async def host_tasks(self, peer_id: str) -> list[str]:
        return [_s(t) for t in await self.r.smembers(keys.host(peer_id))]

    @translate
    async def clients_of_host(self, task_id: str, peer_id: str) -> list[str]:
        h = await self.r.hgetall(keys.peers(task_id))
        out = []
        for cid, raw in h.items():
            info = PeerInfo.decode(_s(raw))
            if info and info.peer_id == peer_id and info.kind == "peer":
                out.append(_s(cid))
        return out

    @translate
    async def all_clients(self, task_id: str) -> dict[str, PeerInfo]:
        h = await self.r.hgetall(keys.peers(task_id))
        out = {}
        for cid, raw in h.items():
            info = PeerInfo.decode(_s(raw))
            if info:
                out[_s(cid)] = info
        return out

    async def remove_clients(self, task_id: str, cids: list[str]) -> None:
        if cids:
            await self.store.run("remove_clients", [keys.meta(task_id)], cids)

    @translate
    async def forget_host(self, peer_id: str, task_ids: list[str] | None = None) -> None:
        if task_ids is None:
            await self.r.delete(keys.host(peer_id), keys.alive(peer_id))
        else:
            await self.r.srem(keys.host(peer_id), *task_ids)

    @translate
    async def held_by(self, task_id: str, cid: str) -> Bitmap:
        """The pieces client `cid` is recorded as holding."""
        return Bitmap(await self.r.get(keys.have(task_id, cid)))

    @translate
    async def bad_sources(self, task_id: str) -> set[str]:
        """Sources dropped for everyone in this task."""
        return {_s(v) for v in await self.r.smembers(keys.bad(task_id))}

    async def pop_failed(self, task_id: str, cid: str, piece: int, max_failures: int) -> tuple[str, int]:
        """A failed possession challenge (scripts.POP_FAILED): (status, failures so far)."""
        res = await self.store.run("pop_failed", [keys.meta(task_id)], [cid, piece, self.ttl, max_failures])
        return _s(res[0]), int(res[1])

    # --- scheduling -------------------------------------------------------------------
    async def load_view(self, task_id: str) -> dict[str, Any] | None:
        """The whole scheduling state of the task at one instant (scripts.LOAD_VIEW), as
        the arguments of view.TaskView.load."""
        res = await self.store.run("load_view", [keys.meta(task_id)], [])
        h = _pairs(res[1])
        if not h:
            return None
        peers = res[4]
        cfails = _pairs(res[8])
        per = res[5]
        clients = []
        for i in range(0, len(peers), 2):
            cid = _s(peers[i])
            have, fly_raw, bl = per[3 * (i // 2): 3 * (i // 2) + 3]
            fly = {}
            for p, entry in _pairs(fly_raw).items():
                src, _, dl = entry.partition("|")
                fly[int(p)] = (src, int(dl or 0))
            clients.append((cid, PeerInfo.decode(_s(peers[i + 1])), bytes(have) if have else b"", fly,
                            {_s(x) for x in bl}, int(cfails.get(cid, "0"))))
        return {
            "task_id": task_id, "seq": int(_s(res[0])), "meta": TaskMeta.from_hash(task_id, h),
            "cdn": bytes(res[2]) if res[2] else b"", "digests": {int(a): b for a, b in _pairs(res[3]).items()},
            "clients": clients, "fails": {a: int(b) for a, b in _pairs(res[6]).items()},
            "bad": {_s(x) for x in res[7]},
        }

    async def pull(
        self, task_id: str, cid: str, reports: Sequence[wire.Report], items: list[tuple[int, str, str, int, int]],
        *, max_inflight: int, peer_cap: int, cdn_cap: int, source_fail_limit: int,
    ) -> list[int]:
        """Apply `reports` (all or nothing: ReportRefused if one is not acceptable), then
        claim `items` (piece, source, kind, deadline_ms, max_copies), each only where every
        invariant still holds (scripts.PULL). The claimed pieces."""
        (res,) = await self.pull_many(task_id, [(cid, reports, items)], max_inflight=max_inflight,
                                      peer_cap=peer_cap, cdn_cap=cdn_cap, source_fail_limit=source_fail_limit)
        if isinstance(res, ReportRefused):
            raise res
        return res

    async def pull_many(
        self, task_id: str, pulls: Sequence[tuple[str, Sequence[wire.Report], list[tuple[int, str, str, int, int]]]],
        *, max_inflight: int, peer_cap: int, cdn_cap: int, source_fail_limit: int,
    ) -> list[list[int] | ReportRefused]:
        """`pull` for several clients of one task in one script call, each in turn as if
        alone: per pull, the claimed pieces or the ReportRefused that changed nothing."""
        args: list[Any] = [now_ms(), self.ttl, max_inflight, peer_cap, cdn_cap, source_fail_limit]
        for cid, reports, items in pulls:
            args += [cid, len(reports), len(items)]
            for r in reports:
                args += [r.piece, r.result, r.source or "", r.reason or ""]
            for item in items:
                args.extend(item)
        res = await self.store.run("pull", [keys.meta(task_id)], args)
        out: list[list[int] | ReportRefused] = []
        for raw in res:
            f = _s(raw).split(" ")
            if f[0] == "ok":
                out.append([int(x) for x in f[1:]])
            else:
                out.append(ReportRefused(f[1], f[2] if len(f) > 2 else ""))
        return out

    def _meta(self, task_id: str, h: dict[str, str]) -> TaskMeta:
        """TaskMeta of a meta hash, parsed once per distinct content (pulls re-read the
        same hash hundreds of times a second)."""
        key = (task_id, tuple(h.items()))
        meta = self._meta_cache.get(key)
        if meta is None:
            if len(self._meta_cache) >= 256:
                self._meta_cache.clear()
            meta = self._meta_cache[key] = TaskMeta.from_hash(task_id, h)
        return meta

    async def detail(
        self, task_id: str, cdn_id: str, pieces: list[int], sample: int, *, peer_cap: int, cdn_cap: int
    ) -> Detail:
        """Holders (a sample), digests, and the state of every source below its cap."""
        res = await self.store.run(
            "detail", [keys.meta(task_id)], [now_ms(), sample, cdn_id, peer_cap, cdn_cap, *pieces]
        )
        groups = _s(res[0]).split(";")
        d = Detail(
            holders=[tuple(g.split(",")) if g else () for g in groups] if pieces else [],
            digests=_s(res[1]).split(",") if pieces else [],
        )
        for entry in _s(res[2]).split(";") if res[2] else ():
            # sid | peer_id|ip|port|kind[|tls] (empty if not a client) | uploads | failures
            parts = entry.split("|")
            sid, fails, load = parts[0], parts[-1], parts[-2]
            info = PeerInfo.decode("|".join(parts[1:-2])) if len(parts) in (7, 8) else None
            kind = "cdn" if sid == cdn_id else "peer"
            if info is not None:
                d.addresses[sid] = info
            elif kind == "peer":
                continue  # holder that left between the sample and now
            d.sources[sid] = SourceLoad(sid, kind, int(load), int(fails))
        return d

    async def claim(
        self, task_id: str, cid: str, items: list[tuple[int, str, str, int, int]], *,
        max_inflight: int, peer_cap: int, cdn_cap: int,
    ) -> list[int]:
        """`pull` without reports: items (piece, source, kind, deadline_ms, max_copies);
        max_copies > 0 holds a CDN assignment to the super-seeding limit atomically."""
        return await self.pull(task_id, cid, (), items, max_inflight=max_inflight, peer_cap=peer_cap,
                               cdn_cap=cdn_cap, source_fail_limit=1 << 30)

    async def report(
        self, task_id: str, cid: str, reports: list[wire.Report], *, source_fail_limit: int
    ) -> tuple[str, str]:
        args: list[Any] = [cid, self.ttl, source_fail_limit]
        for r in reports:
            args += [r.piece, r.result, r.source or "", r.reason or ""]
        res = await self.store.run("report", [keys.meta(task_id)], args)
        return _s(res[0]), _s(res[1])

    async def release(self, task_id: str, cid: str) -> int:
        return int(await self.store.run("release", [keys.meta(task_id)], [cid]))

    # --- dashboard (read-only, bounded) ----------------------------------------------
    @translate
    async def task_overviews(self, task_ids: list[str]) -> list[TaskOverview]:
        """Meta, CDN progress, client count and held copies of each task, one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hgetall(keys.meta(tid))
            pipe.bitcount(keys.cdnmap(tid))
            pipe.hlen(keys.peers(tid))
            pipe.get(keys.counts(tid))
        res = await pipe.execute()
        out = []
        for i, tid in enumerate(task_ids):
            h, cdn, clients, cnt = res[4 * i: 4 * i + 4]
            if not h:
                continue  # deleted since it was listed
            meta = TaskMeta.from_hash(tid, {_s(a): _s(b) for a, b in h.items()})
            count = meta.piece_count if meta.piece_count >= 0 else int(cdn)
            held = sum(decode_counts(bytes(cnt) if cnt else b"", max(count, 0)))
            out.append(TaskOverview(meta, int(cdn), int(clients), held))
        return out

    @translate
    async def some_clients(self, task_id: str, cap: int) -> tuple[int, dict[str, PeerInfo]]:
        """(number of clients, at most `cap` of them): HSCAN, never the whole hash."""
        total = int(await self.r.hlen(keys.peers(task_id)))
        out: dict[str, PeerInfo] = {}
        cursor = 0
        for _ in range(64):  # bounded: HSCAN may return fewer than COUNT per call
            cursor, batch = await self.r.hscan(keys.peers(task_id), cursor, count=max(cap, 16))
            for cid, raw in batch.items():
                info = PeerInfo.decode(_s(raw))
                if info is not None and len(out) < cap:
                    out[_s(cid)] = info
            if int(cursor) == 0 or len(out) >= cap:
                break
        return total, out

    @translate
    async def piece_map(self, task_id: str, cap: int) -> PieceMap | None:
        """Who holds which piece and who is fetching what from whom, for at most `cap`
        clients (bitmaps as stored, not per-piece records)."""
        meta = await self.get_meta(task_id)
        if meta is None:
            return None
        total, clients = await self.some_clients(task_id, cap)
        now = now_ms()
        pipe = self.r.pipeline(transaction=False)
        pipe.get(keys.cdnmap(task_id))
        if meta.cdn:
            pipe.zcount(keys.uploads(task_id, meta.cdn), f"({now}", "+inf")
        cids = sorted(clients, key=lambda c: (clients[c].ip, clients[c].port, c))
        for cid in cids:
            pipe.get(keys.have(task_id, cid))
            pipe.hgetall(keys.inflight(task_id, cid))
            pipe.zcount(keys.uploads(task_id, cid), f"({now}", "+inf")
            pipe.hget(keys.client_fails(task_id), cid)
        res = await pipe.execute()
        cdn_raw = res[0]
        cdn_up = int(res[1]) if meta.cdn else 0
        rest = res[2:] if meta.cdn else res[1:]
        views = []
        for i, cid in enumerate(cids):
            have, fly, up, fails = rest[4 * i: 4 * i + 4]
            inflight = []
            for piece, entry in fly.items():
                src, _, deadline = _s(entry).partition("|")
                if int(deadline or 0) > now:
                    inflight.append((int(_s(piece)), src))
            inflight.sort()
            views.append(ClientView(cid, clients[cid], bytes(have) if have else b"",
                                    inflight[:64], int(up), int(_s(fails)) if fails else 0))
        named = {s for v in views for _, s in v.inflight}
        unknown = sorted(named - set(clients) - {meta.cdn})[:256]
        sources = dict(clients)
        if unknown:  # sources outside the listed clients (truncated list)
            for cid, raw in zip(unknown, await self.r.hmget(keys.peers(task_id), unknown)):
                info = PeerInfo.decode(_s(raw)) if raw else None
                if info is not None:
                    sources[cid] = info
        return PieceMap(meta, bytes(cdn_raw) if cdn_raw else b"", cdn_up, total, views, sources)

    @translate
    async def clients_sample(self, task_ids: list[str], cap: int) -> dict[str, dict[str, PeerInfo]]:
        """Up to about `cap` clients of each task (first HSCAN page of each), one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for tid in task_ids:
            pipe.hscan(keys.peers(tid), 0, count=cap)
        out: dict[str, dict[str, PeerInfo]] = {}
        for tid, (_cursor, batch) in zip(task_ids, await pipe.execute()):
            got = out[tid] = {}
            for cid, raw in list(batch.items())[:cap]:
                info = PeerInfo.decode(_s(raw))
                if info is not None:
                    got[_s(cid)] = info
        return out

    @translate
    async def task_counts(self, active_ms: int) -> tuple[int, int]:
        """(tasks in the index, tasks accessed within the last `active_ms`)."""
        pipe = self.r.pipeline(transaction=False)
        pipe.zcard(keys.TASK_INDEX)
        pipe.zcount(keys.TASK_INDEX, now_ms() - active_ms, "+inf")
        total, active = await pipe.execute()
        return int(total), int(active)

    @translate
    async def peers_alive(self, peer_ids: list[str]) -> list[bool]:
        pipe = self.r.pipeline(transaction=False)
        for pid in peer_ids:
            pipe.exists(keys.alive(pid))
        return [bool(x) for x in await pipe.execute()]

    # --- supernodes -------------------------------------------------------------------
    @translate
    async def announce_supernode(self, sn_id: str, ip: str, port: int, download_port: int,
                                 ttl_ms: int = keys.SUPERNODE_TTL_MS, tls: bool = False) -> None:
        await self.r.hset(keys.supernode(sn_id), mapping={"ip": ip, "port": port, "download_port": download_port,
                                                          "tls": int(tls)})
        await self.r.pexpire(keys.supernode(sn_id), ttl_ms)

    @translate
    async def supernode_ttl_ms(self, sn_id: str) -> int:
        """Milliseconds left on a supernode's liveness record (<= 0: gone)."""
        return int(await self.r.pttl(keys.supernode(sn_id)))

    @translate
    async def supernode_address(self, sn_id: str) -> tuple[str, int, bool] | None:
        """Where a supernode's download port is: ip, port, and whether it serves TLS."""
        h = await self.r.hgetall(keys.supernode(sn_id))
        if not h:
            return None
        d = {_s(a): _s(b) for a, b in h.items()}
        return d["ip"], int(d["download_port"]), d.get("tls") == "1"


__all__ = [
    "ClientView",
    "Detail",
    "PeerInfo",
    "PieceMap",
    "Repo",
    "ReportRefused",
    "StoreError",
    "TaskMeta",
    "TaskOverview",
    "now_ms",
]
