"""Piece tokens: the supernode's signed permission for one client to fetch the pieces it
was just assigned, each from its source, for a short time. Pure: no I/O, no clock
(callers pass `now`).

One token covers the assignments of one pull (up to MAX_GRANTS): one signature per pull
instead of one per piece, the costliest step of a pull after the claim itself. Every
source checks the same token and finds its own grant in it.

Binary layout (big-endian), then base64url without padding (216 characters with one
grant, 552 with eight):

    off len field
      0   1 version (2)
      1   8 kid: first 8 bytes of sha256(raw Ed25519 public key)
      9   4 expires: unix seconds
     13  32 task id
     45  16 client id: the requester (cid) the token was issued to
     61   1 n: number of grants (1..MAX_GRANTS)
     62  36 each grant: piece number (4), first byte (8), last byte (8, inclusive) of its
            range, source id (16): the peer server (peer id) or supernode (supernode id)
            the grant is valid at
      ..  64 Ed25519 signature over CONTEXT + everything before it

The token travels in `X-Dragonfly-Token`, the requester names itself in
`X-Dragonfly-Client` (docs/api.md, "Piece tokens"). Issuing one costs about 40-50 µs
(Ed25519 signing), verifying one about 170-240 µs on the shared 2-core machine.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from common import errors
from common.tokenheaders import CLIENT_HEADER, TOKEN_HEADER  # re-exported

VERSION = 2
CONTEXT = b"dragonfly-py piece token\x00"  # a signature over tokens is never valid for anything else
LEEWAY = 30  # seconds of clock skew forgiven between the supernode and the verifying host
_HEAD = struct.Struct(">B8sI32s16sB")
_GRANT = struct.Struct(">IQQ16s")
SIG_LEN = 64
MAX_GRANTS = 8
MAX_LEN = _HEAD.size + MAX_GRANTS * _GRANT.size + SIG_LEN  # 414 bytes
_MAX_TEXT = 4 * ((MAX_LEN + 2) // 3)  # 552 base64url characters

# reason -> HTTP status. 401: the credentials themselves are not acceptable;
# 403: a genuine token that does not grant this request.
STATUS = {
    "missing": 401, "malformed": 401, "unknown_key": 401, "bad_signature": 401, "expired": 401,
    "wrong_task": 403, "wrong_range": 403, "wrong_client": 403, "wrong_source": 403,
}


class TokenError(errors.DfError):
    """A piece token that does not grant this request; `reason` (a key of STATUS) says why
    and decides the answer: 401 (no valid token) or 403 (a genuine token, not for this)."""

    code = "piece_token"  # on the wire: "unauthorized" or "forbidden", set per instance
    status = 401

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, detail={"reason": reason})
        self.reason = reason
        self.status = STATUS[reason]
        self.code = "unauthorized" if self.status == 401 else "forbidden"


class UnknownKey(TokenError):
    """Signed by a key this verifier does not know (yet): it may refresh its keys and retry."""

    code = "piece_token_unknown_key"  # class-level only, as TokenError's

    def __init__(self, kid: bytes) -> None:
        super().__init__("unknown_key", f"token signed by an unknown key {kid.hex()}")
        self.kid = kid


@dataclass(frozen=True)
class Claims:
    """One grant of a token, with the token's common fields."""

    kid: bytes
    expires: int
    task_id: str
    piece: int
    start: int
    end: int
    client: str
    source: str


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public: bytes) -> bytes:
    return hashlib.sha256(public).digest()[:8]


def load_public(hex_key: str) -> Ed25519PublicKey:
    """From the wire form (64 hex); ValueError when it is not a valid key."""
    return Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


class Signer:
    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key = key
        self.public = raw_public(key.public_key())
        self.kid = key_id(self.public)

    def issue(self, *, task_id: str, piece: int, start: int, end: int, client: str, source: str,
              expires: int) -> str:
        """A token with one grant."""
        return self.issue_grants(task_id=task_id, client=client, expires=expires,
                                 grants=[(piece, start, end, source)])

    def issue_grants(self, *, task_id: str, client: str, expires: int,
                     grants: list[tuple[int, int, int, str]]) -> str:
        """One token for `client` granting each (piece, start, end, source)."""
        if not 1 <= len(grants) <= MAX_GRANTS:
            raise ValueError(f"a token carries 1 to {MAX_GRANTS} grants, not {len(grants)}")
        parts = [_HEAD.pack(VERSION, self.kid, expires, bytes.fromhex(task_id), bytes.fromhex(client),
                            len(grants))]
        parts.extend(_GRANT.pack(piece, start, end, bytes.fromhex(source)) for piece, start, end, source in grants)
        body = b"".join(parts)
        sig = self.key.sign(CONTEXT + body)
        return base64.urlsafe_b64encode(body + sig).rstrip(b"=").decode("ascii")


def parse(token: str) -> tuple[list[Claims], bytes, bytes]:
    """(one Claims per grant, signed body, signature); TokenError("malformed") on anything odd."""
    if not token or len(token) > _MAX_TEXT:
        raise TokenError("malformed", "malformed token")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "malformed token (not base64url)") from None
    if len(raw) < _HEAD.size + _GRANT.size + SIG_LEN or raw[0] != VERSION:
        raise TokenError("malformed", "malformed token (length or version)")
    _v, kid, expires, tid, client, n = _HEAD.unpack_from(raw)
    if not 1 <= n <= MAX_GRANTS or len(raw) != _HEAD.size + n * _GRANT.size + SIG_LEN:
        raise TokenError("malformed", "malformed token (length or version)")
    body, sig = raw[:-SIG_LEN], raw[-SIG_LEN:]
    tid_hex, client_hex = tid.hex(), client.hex()
    grants = [Claims(kid, expires, tid_hex, piece, start, end, client_hex, source.hex())
              for piece, start, end, source in _GRANT.iter_unpack(body[_HEAD.size:])]
    return grants, body, sig


def verify(token: str | None, keys: Callable[[bytes], Ed25519PublicKey | None], *, task_id: str,
           start: int, end: int, client: str | None, source: str, now: float) -> Claims:
    """Check a token for the request `GET /peer/file/{task_id}` with `Range: bytes=start-end`
    (as resolved against the file) by `client`, served by `source`. Raises TokenError
    (UnknownKey for a key not in `keys`)."""
    if token is None:
        raise TokenError("missing", f"a piece token is required ({TOKEN_HEADER})")
    grants, body, sig = parse(token)
    first = grants[0]
    public = keys(first.kid)
    if public is None:
        raise UnknownKey(first.kid)
    try:
        public.verify(sig, CONTEXT + body)
    except InvalidSignature:
        raise TokenError("bad_signature", "bad token signature") from None
    if now > first.expires + LEEWAY:
        raise TokenError("expired", f"token expired {int(now - first.expires)} s ago")
    if first.task_id != task_id:
        raise TokenError("wrong_task", "token is for another task")
    mine = [g for g in grants if g.source == source]
    if not mine:
        raise TokenError("wrong_source", "token is for another source")
    for g in mine:
        if g.start <= start <= end <= g.end:  # a range clamped at the end of the file is inside
            break
    else:
        spans = ", ".join(f"bytes {g.start}-{g.end} (piece {g.piece})" for g in mine)
        raise TokenError("wrong_range", f"token is for {spans}")
    if first.client != client:
        raise TokenError("wrong_client", f"token is for another client ({CLIENT_HEADER})")
    return g
