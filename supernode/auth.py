"""Access control on the supernode: its piece-token key pair and key ring, the check of
piece tokens on the download port. (The admin token of the API: `api/admin.py`.)

Several supernodes on one Redis: each has its own Ed25519 key pair
(`<home>/piece-signing.key`, created at first start, mode 0600) and publishes its public
key in Redis (`df:keys`, with an expiry it refreshes every 10 s). Registration replies
and `GET /api/v1/keys` carry every live key, so a peer server verifies a token from any
supernode of the cluster offline. Not one private key shared by all: a file operators
copy to every host is a secret to hand out and rotate by hand and leaks with any one of
them; per-node keys need nothing from the operator, and a retired supernode's key drops
out by itself. Redis already holds everything the scheduler trusts (piece digests
included), so publishing public keys there adds no party to trust.
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    load_pem_private_key,
)

from common import errors, tokens, wire
from common.logs import RefusalLog

from .store import keys
from .store.connection import raise_if_cancelled, translate

log = logging.getLogger("supernode.auth")
KEY_FILE = "piece-signing.key"
PUBLISH_INTERVAL = 10.0
KEY_GRACE_MS = 60_000  # an announced key stays valid this long (+ token TTL) after the last announcement
PRUNE_AFTER_MS = 3600_000  # a dead supernode's entry is deleted from Redis after this
RELOAD_INTERVAL = 5.0  # the key list handed to clients is at most this old
REFRESH_MIN_INTERVAL = 1.0  # an unknown key id reloads the ring at most this often


class KeyFileError(errors.StartupError):
    """The signing key file is unusable (unreadable, not a key, readable by others)."""

    code = "key_file"


# --- the key pair ---------------------------------------------------------------------
def load_or_create_key(home: Path) -> Ed25519PrivateKey:
    path = home / KEY_FILE
    if not path.exists():
        _create(path)
    try:
        st = path.stat()
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                               "chmod 600 it")
        key = load_pem_private_key(path.read_bytes(), password=None)
    except OSError as exc:
        raise KeyFileError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{path} is not an Ed25519 key")
    return key


def _create(path: Path) -> None:
    """Written to a 0600 temp file, then linked into place: never a half-written key,
    and of two processes racing, one key wins for both."""
    pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".key-")  # mode 0600
    try:
        os.write(fd, pem)
        os.fsync(fd)
        os.close(fd)
        try:
            os.link(tmp, path)
            log.info("created the piece-token signing key %s", path)
        except FileExistsError:
            pass
    finally:
        os.unlink(tmp)


# --- the key ring ---------------------------------------------------------------------
class KeyRing:
    """Every live supernode's public key, read from Redis; ours is always in it."""

    def __init__(self, client: object, signer: tokens.Signer, *, token_ttl: float) -> None:
        self.client = client
        self.signer = signer
        self.token_ttl = token_ttl
        own = wire.PieceKey(kid=signer.kid.hex(), key=signer.public.hex())
        self._own = own
        self._keys: dict[bytes, Ed25519PublicKey] = {signer.kid: signer.key.public_key()}
        self._wire: list[wire.PieceKey] = [own]
        self._loaded = -1e9
        self._refreshed = -1e9
        self._refresh_lock = asyncio.Lock()

    def get(self, kid: bytes) -> Ed25519PublicKey | None:
        return self._keys.get(kid)

    @translate
    async def publish(self) -> None:
        now = int(time.time() * 1000)
        expires = now + KEY_GRACE_MS + int(self.token_ttl * 1000)
        await self.client.hset(keys.PIECE_KEYS, self._own.kid, f"{self._own.key}|{expires}")  # type: ignore[attr-defined]
        await self._load(now)

    @translate
    async def reload(self) -> None:
        await self._load(int(time.time() * 1000))

    async def _load(self, now: int) -> None:
        raw = await self.client.hgetall(keys.PIECE_KEYS)  # type: ignore[attr-defined]
        found: dict[bytes, Ed25519PublicKey] = {self.signer.kid: self.signer.key.public_key()}
        listed = [self._own]
        stale: list[str] = []
        for k, v in raw.items():
            kid_hex = k.decode() if isinstance(k, bytes) else str(k)
            entry = _parse_entry(kid_hex, v.decode() if isinstance(v, bytes) else str(v))
            if entry is None or entry[1] < now - PRUNE_AFTER_MS:
                stale.append(kid_hex)
            elif entry[1] >= now and bytes.fromhex(kid_hex) not in found:
                found[bytes.fromhex(kid_hex)] = entry[0]
                listed.append(wire.PieceKey(kid=kid_hex, key=tokens.raw_public(entry[0]).hex()))
        if stale:
            await self.client.hdel(keys.PIECE_KEYS, *stale)  # type: ignore[attr-defined]
        self._keys, self._wire = found, listed
        self._loaded = time.monotonic()

    async def current(self) -> list[wire.PieceKey]:
        if time.monotonic() - self._loaded > RELOAD_INTERVAL:
            await self.reload()
        return self._wire

    async def refresh(self) -> bool:
        """After an unknown key id: reload (rate-limited). True if a reload happened
        since the caller asked. Concurrent callers (a new supernode's first tokens arrive
        several at once) wait for the one reload in progress instead of being refused
        for the rate limit it set."""
        asked = time.monotonic()
        async with self._refresh_lock:
            if self._loaded >= asked:
                return True
            if time.monotonic() - self._refreshed < REFRESH_MIN_INTERVAL:
                return False
            self._refreshed = time.monotonic()
            try:
                await self.reload()
            except errors.StoreError as exc:
                log.warning("cannot reload piece-token keys: %s", exc.message)
                return False
            return True

    async def run(self) -> None:
        while True:
            try:
                await self.publish()
            except errors.StoreError as exc:
                log.warning("cannot publish the piece-token key: %s", exc.message)
            raise_if_cancelled()
            await asyncio.sleep(PUBLISH_INTERVAL)


def _parse_entry(kid_hex: str, value: str) -> tuple[Ed25519PublicKey, int] | None:
    """`<public key hex>|<expires ms>`, with the kid matching the key; None if not."""
    key_hex, _, expires = value.partition("|")
    try:
        public = tokens.load_public(key_hex)
        if tokens.key_id(tokens.raw_public(public)).hex() != kid_hex:
            return None
        return public, int(expires)
    except ValueError:
        return None


# --- piece tokens on the download port ------------------------------------------------
class PieceGate:
    """Verifies the piece token of a request to this supernode's seed."""

    def __init__(self, ring: KeyRing, source: str, on_refused: Callable[[str], None]) -> None:
        self.ring = ring
        self.source = source  # our supernode id: tokens must name us
        self.on_refused = on_refused
        self.log = RefusalLog(log, "piece request")

    async def check(self, request: web.Request, task_id: str, start: int, end: int) -> web.Response | None:
        """None when the request may be served, else the refusal to send."""
        token = request.headers.get(tokens.TOKEN_HEADER)
        client = request.headers.get(tokens.CLIENT_HEADER)
        try:
            try:
                tokens.verify(token, self.ring.get, task_id=task_id, start=start, end=end, client=client,
                              source=self.source, now=time.time())
            except tokens.UnknownKey:
                if not await self.ring.refresh():
                    raise
                tokens.verify(token, self.ring.get, task_id=task_id, start=start, end=end, client=client,
                              source=self.source, now=time.time())
        except tokens.TokenError as exc:
            self.on_refused(exc.reason)
            self.log(exc.reason, f"{exc.message}; task {task_id[:12]} from {request.remote}")
            return web.json_response(exc.to_wire(), status=exc.status)
        return None
