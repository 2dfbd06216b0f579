"""The challenge loop: every `--pop-interval` (jittered ±50 %), one random client of one
random task is asked to prove it holds one random piece it claims. A wrong answer, a
refusal, no answer within `--pop-timeout` or an unreachable peer server makes it no
holder of that piece; its `--pop-max-failures`-th failure in a task drops it as a
source of that task for everyone (scripts.POP_FAILED).

Our own copy of the piece is used only after it was hashed again against the published
digest: a CDN copy gone bad on our disk must not make an honest peer look like a liar
(the piece is then asked for whole, as when we have no copy).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from common import digest, errors, pop
from common.hostport import hostport
from common.pieces import piece_count, piece_range
from common.tokens import Signer

from ..cdn.cache import PieceCache
from ..metrics import Metrics
from ..store.repo import PeerInfo, Repo, TaskMeta
from . import decide

log = logging.getLogger("supernode.pop")
TASK_TRIES = 4  # tasks looked at per round for one with a client to challenge
EXPIRY_SLACK = 5  # seconds a challenge stays valid after its answer is due


@dataclass(frozen=True)
class PopSettings:
    interval: float  # 0: off
    timeout: float
    max_failures: int
    min_rate: int  # bytes/s: a PIECE answer gets timeout + size / min_rate


@dataclass(frozen=True)
class Verdict:
    result: str  # passed | failed | timeout | unreachable
    why: str = ""


def read_own(path: Path, start: int, end: int, p_start: int, p_end: int, published: str,
             algo: str) -> bytes | None:
    """Bytes start..end of our copy, if the whole piece p_start..p_end still hashes to
    `published`; None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, p_end - p_start + 1, p_start)
    finally:
        os.close(fd)
    if len(data) != p_end - p_start + 1 or digest.of(data, algo) != published:
        return None
    return data[start - p_start:end - p_start + 1]


class Challenger:
    def __init__(self, repo: Repo, cache: PieceCache, signer: Signer, metrics: Metrics, sn_id: str,
                 settings: PopSettings, tls: ssl.SSLContext | None = None,
                 rng: random.Random | None = None) -> None:
        self.repo, self.cache, self.signer, self.metrics = repo, cache, signer, metrics
        self.sn_id = sn_id
        self.settings = settings
        self.tls = tls
        self.rng = rng or random.SystemRandom()
        self.outstanding = decide.Outstanding()
        self.session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self.tls or True, limit=4))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def run(self) -> None:
        await self.open()
        try:
            while True:
                await asyncio.sleep(self.settings.interval * self.rng.uniform(0.5, 1.5))
                try:
                    await self.round()
                except errors.StoreError as exc:
                    log.warning("possession challenge skipped: %s", exc.message)
        finally:
            await self.close()

    async def round(self) -> Verdict | None:
        """One challenge, if some task has a client to challenge; its verdict."""
        tasks = await self.repo.list_tasks()
        for tid in self.rng.sample(tasks, min(TASK_TRIES, len(tasks))):
            verdict = await self.challenge_task(tid)
            if verdict is not None:
                return verdict
        return None

    async def challenge_task(self, tid: str, cid: str | None = None) -> Verdict | None:
        meta = await self.repo.get_meta(tid)
        if meta is None or meta.length <= 0 or meta.piece_size <= 0:
            return None
        clients = await self.repo.all_clients(tid)
        if cid is None:
            bad = await self.repo.bad_sources(tid)
            cid = decide.pick_client([(c, i.kind) for c, i in clients.items()], bad, self.rng)
        info = clients.get(cid) if cid is not None else None
        if cid is None or info is None:
            return None
        held = (await self.repo.held_by(tid, cid)).members(piece_count(meta.length, meta.piece_size))
        published = await self.repo.digests(tid)
        own = await self._own_pieces(meta)
        t = decide.target(cid, [n for n in held if n in published], meta.length, meta.piece_size, own, self.rng)
        if t is None:
            return None
        return await self.challenge(meta, info, t, published[t.piece])

    async def _own_pieces(self, meta: TaskMeta) -> set[int]:
        """The pieces our CDN copy of the task has (claimed: `read_own` checks them)."""
        if meta.cdn != self.sn_id:
            return set()
        entry = self.cache.entries.get(meta.task_id) or await asyncio.to_thread(self.cache.load, meta.task_id)
        if entry is None or (entry.length, entry.piece_size) != (meta.length, meta.piece_size):
            return set()
        return set(entry.digests)

    async def challenge(self, meta: TaskMeta, info: PeerInfo, t: decide.Target, published: str) -> Verdict:
        tid = meta.task_id
        p_start, p_end = piece_range(t.piece, meta.length, meta.piece_size)
        mode, start, end = t.mode, t.start, t.end
        own: bytes | None = None
        if mode == pop.HASH:
            own = await asyncio.to_thread(read_own, self.cache.data_path(tid), start, end, p_start, p_end,
                                          published, meta.digest_algo)
            if own is None:  # our copy is not trustworthy: ask for the piece instead
                mode, start, end = pop.PIECE, p_start, p_end
        timeout = self.settings.timeout
        if mode == pop.PIECE:
            timeout += (end - start + 1) / max(self.settings.min_rate, 1)
        nonce = secrets.token_bytes(pop.NONCE_LEN)
        sent = decide.Target(t.cid, t.piece, start, end, mode)
        self.outstanding.open(nonce, sent)
        text = pop.issue(self.signer, task_id=tid, peer_id=info.peer_id, piece=t.piece, start=start, end=end,
                         mode=mode, nonce=nonce, expires=int(time.time() + timeout) + EXPIRY_SLACK)
        self.metrics.pop_sent.labels("hash" if mode == pop.HASH else "piece").inc()
        try:
            verdict = await self._ask(info, tid, text, nonce, own, published, meta.digest_algo,
                                      p_end - p_start + 1, timeout)
        finally:
            self.outstanding.settle(nonce)
        self.metrics.pop_results.labels(verdict.result).inc()
        if verdict.result == "passed":
            log.debug("task %s: client %s proved it holds piece %d", tid[:12], t.cid[:12], t.piece)
            return verdict
        await self._failed(tid, info, sent, verdict)
        return verdict

    async def _ask(self, info: PeerInfo, tid: str, text: str, nonce: bytes, own: bytes | None, published: str,
                   algo: str, size: int, timeout: float) -> Verdict:
        assert self.session is not None, "run() opens the session"
        url = f"{'https' if info.tls else 'http'}://{hostport(info.ip, info.port)}/peer/pop/{tid}"
        try:
            async with asyncio.timeout(timeout):
                async with self.session.post(url, headers={pop.HEADER: text}, allow_redirects=False) as resp:
                    if resp.status != 200:
                        return Verdict("failed", f"answered {resp.status}")
                    if own is not None:
                        body = await _read_capped(resp, 1024)
                        answer = _answer_field(body)
                        ok = decide.judge_hash(nonce, own, answer)
                        return Verdict("passed") if ok else Verdict("failed", "wrong answer")
                    if resp.content_length is not None and resp.content_length != size:
                        return Verdict("failed", f"piece of {resp.content_length} bytes, not {size}")
                    data = await _read_capped(resp, size)
        except TimeoutError:
            return Verdict("timeout", f"no answer in {timeout:.1f} s")
        except (aiohttp.ClientError, OSError) as exc:
            return Verdict("unreachable", type(exc).__name__)
        ok = await asyncio.to_thread(decide.judge_piece, data, size, published, algo)
        return Verdict("passed") if ok else Verdict("failed", "wrong piece bytes")

    async def _failed(self, tid: str, info: PeerInfo, t: decide.Target, verdict: Verdict) -> None:
        status, fails = await self.repo.pop_failed(tid, t.cid, t.piece, self.settings.max_failures)
        if status != "ok":
            return  # the task or the client went away meanwhile
        scope = decide.consequence(fails, self.settings.max_failures)
        self.metrics.pop_dropped.labels(scope).inc()
        log.warning("task %s: client %s (peer %s at %s) failed a possession challenge of piece %d: %s (%s); "
                    "%s", tid[:12], t.cid[:12], info.peer_id[:12], hostport(info.ip, info.port), t.piece,
                    verdict.result, verdict.why,
                    f"dropped as a source of the task after {fails} failures" if scope == "task"
                    else f"no longer a holder of that piece ({fails} of {self.settings.max_failures} failures)")


async def _read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    """The body, or its first cap + 1 bytes when it is longer (then it is wrong anyway)."""
    buf = bytearray()
    async for chunk in resp.content.iter_chunked(64 << 10):
        buf += chunk
        if len(buf) > cap:
            break
    return bytes(buf)


def _answer_field(body: bytes) -> object:
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc.get("answer") if isinstance(doc, dict) else None
