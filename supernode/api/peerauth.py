"""Per-peer secrets: only the peer server that registered a peer id may speak for it
(heartbeat, down), so nobody reaching the API can take a peer out of every swarm.

The secret of a peer id is HMAC-SHA256(cluster key, peer id): every supernode sharing
the Redis derives the same one (a dfget failing over keeps it) and nothing per peer is
stored but a claim mark. The first registration of a peer id claims it and gets the
secret in its reply; from then on a registration of that id must present the secret
(else anyone who learnt a peer id could ask for its secret), as must every heartbeat and
down. A secret from another cluster, on an id this cluster has not seen, is ignored.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from common.errors import PeerSecretRefused
from supernode.store import keys
from supernode.store.connection import Store, translate

HEADER = "X-Dragonfly-Peer-Secret"


class PeerSecrets:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._key: bytes | None = None

    @property
    def r(self):  # type: ignore[no-untyped-def]
        return self.store.client

    @translate
    async def _cluster_key(self) -> bytes:
        if self._key is None:
            await self.r.set(keys.PEER_SECRET_KEY, secrets.token_hex(32), nx=True)
            raw = await self.r.get(keys.PEER_SECRET_KEY)
            self._key = bytes.fromhex(raw.decode() if isinstance(raw, bytes) else raw)
        return self._key

    async def secret(self, peer_id: str) -> str:
        return hmac.new(await self._cluster_key(), peer_id.encode(), hashlib.sha256).hexdigest()

    async def _valid(self, peer_id: str, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), (await self.secret(peer_id)).encode())

    @translate
    async def for_registration(self, peer_id: str, given: str | None) -> str:
        """The secret to return to a registration as `peer_id`; PeerSecretRefused when
        the id is taken and `given` is not its secret."""
        if await self._valid(peer_id, given):
            await self.r.set(keys.peer_claim(peer_id), b"1", px=keys.PEER_CLAIM_TTL_MS)
            return await self.secret(peer_id)
        if await self.r.set(keys.peer_claim(peer_id), b"1", px=keys.PEER_CLAIM_TTL_MS, nx=True):
            return await self.secret(peer_id)
        raise PeerSecretRefused(
            f"peer id {peer_id[:8]}... is registered already: its secret ({HEADER}, from the "
            "reply to its first registration) is required")

    @translate
    async def check(self, peer_id: str, given: str | None) -> None:
        """A call as `peer_id` (heartbeat, down) must carry its secret."""
        if not await self._valid(peer_id, given):
            what = "missing" if given is None else "wrong"
            raise PeerSecretRefused(f"{HEADER} {what}: only the peer server that registered "
                                    f"{peer_id[:8]}... may speak for it")
        await self.r.pexpire(keys.peer_claim(peer_id), keys.PEER_CLAIM_TTL_MS)
