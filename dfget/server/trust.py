"""The supernodes' public keys this peer server verifies piece tokens with.

Keys arrive with every registration of a file (from the dfget that registered it), and
are re-read from the supernodes with the heartbeat and, rate-limited, when a token names
a key id not seen yet (a supernode that joined the cluster later). A key no supernode
has confirmed for KEY_TTL is dropped: a retired supernode's tokens stop working here.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common import tokens
from common.wire import PieceKey

KEY_TTL = 900.0
REFRESH_MIN_INTERVAL = 2.0  # an unknown key id asks the supernodes at most this often


class TrustedKeys:
    def __init__(self) -> None:
        self._keys: dict[bytes, tuple[Ed25519PublicKey, float]] = {}
        self.last_refresh = -1e9

    def add(self, records: Iterable[PieceKey], now: float | None = None) -> int:
        """Trust (or re-confirm) these keys; returns how many were new. Records whose kid
        does not match their key are ignored."""
        until = (time.monotonic() if now is None else now) + KEY_TTL
        new = 0
        for r in records:
            try:
                public = tokens.load_public(r.key)
            except ValueError:
                continue
            kid = bytes.fromhex(r.kid)
            if tokens.key_id(tokens.raw_public(public)) != kid:
                continue
            new += kid not in self._keys
            self._keys[kid] = (public, until)
        return new

    def get(self, kid: bytes) -> Ed25519PublicKey | None:
        item = self._keys.get(kid)
        if item is None:
            return None
        if item[1] < time.monotonic():
            del self._keys[kid]
            return None
        return item[0]

    def may_refresh(self) -> bool:
        now = time.monotonic()
        if now - self.last_refresh < REFRESH_MIN_INTERVAL:
            return False
        self.last_refresh = now
        return True

    def __len__(self) -> int:
        return len(self._keys)
