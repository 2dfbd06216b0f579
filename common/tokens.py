"""Piece tokens: the supernode's signed permission for one client to fetch one piece
from one source, for a short time. Pure: no I/O, no clock (callers pass `now`).

Binary layout (big-endian), then base64url without padding (215 characters):

    off len field
      0   1 version (1)
      1   8 kid: first 8 bytes of sha256(raw Ed25519 public key)
      9   4 expires: unix seconds
     13  32 task id
     45   4 piece number
     49   8 first byte of the range
     57   8 last byte of the range (inclusive)
     65  16 client id: the requester (cid) the token was issued to
     81  16 source id: the peer server (peer id) or supernode (supernode id) it is valid at
     97  64 Ed25519 signature over CONTEXT + bytes 0..96

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

TOKEN_HEADER = "X-Dragonfly-Token"
CLIENT_HEADER = "X-Dragonfly-Client"
VERSION = 1
CONTEXT = b"dragonfly-py piece token\x00"  # a signature over tokens is never valid for anything else
LEEWAY = 30  # seconds of clock skew forgiven between the supernode and the verifying host
_BODY = struct.Struct(">B8sI32sIQQ16s16s")
SIG_LEN = 64
TOKEN_LEN = _BODY.size + SIG_LEN  # 161 bytes, 215 base64url characters
_MAX_TEXT = 4 * ((TOKEN_LEN + 2) // 3)

# reason -> HTTP status. 401: the credentials themselves are not acceptable;
# 403: a genuine token that does not grant this request.
STATUS = {
    "missing": 401, "malformed": 401, "unknown_key": 401, "bad_signature": 401, "expired": 401,
    "wrong_task": 403, "wrong_range": 403, "wrong_client": 403, "wrong_source": 403,
}


class TokenError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @property
    def status(self) -> int:
        return STATUS[self.reason]

    @property
    def code(self) -> str:
        return "unauthorized" if self.status == 401 else "forbidden"

    def to_wire(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, "detail": {"reason": self.reason}}


class UnknownKey(TokenError):
    """Signed by a key this verifier does not know (yet): it may refresh its keys and retry."""

    def __init__(self, kid: bytes) -> None:
        super().__init__("unknown_key", f"token signed by an unknown key {kid.hex()}")
        self.kid = kid


@dataclass(frozen=True)
class Claims:
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
        body = _BODY.pack(VERSION, self.kid, expires, bytes.fromhex(task_id), piece, start, end,
                          bytes.fromhex(client), bytes.fromhex(source))
        sig = self.key.sign(CONTEXT + body)
        return base64.urlsafe_b64encode(body + sig).rstrip(b"=").decode("ascii")


def parse(token: str) -> tuple[Claims, bytes, bytes]:
    """(claims, signed body, signature); TokenError("malformed") on anything odd."""
    if not token or len(token) > _MAX_TEXT:
        raise TokenError("malformed", "malformed token")
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("malformed", "malformed token (not base64url)") from None
    if len(raw) != TOKEN_LEN or raw[0] != VERSION:
        raise TokenError("malformed", "malformed token (length or version)")
    body, sig = raw[:_BODY.size], raw[_BODY.size:]
    _v, kid, expires, tid, piece, start, end, client, source = _BODY.unpack(body)
    return Claims(kid, expires, tid.hex(), piece, start, end, client.hex(), source.hex()), body, sig


def verify(token: str | None, keys: Callable[[bytes], Ed25519PublicKey | None], *, task_id: str,
           start: int, end: int, client: str | None, source: str, now: float) -> Claims:
    """Check a token for the request `GET /peer/file/{task_id}` with `Range: bytes=start-end`
    (as resolved against the file) by `client`, served by `source`. Raises TokenError (UnknownKey for a key not in `keys`)."""
    if token is None:
        raise TokenError("missing", f"a piece token is required ({TOKEN_HEADER})")
    claims, body, sig = parse(token)
    public = keys(claims.kid)
    if public is None:
        raise UnknownKey(claims.kid)
    try:
        public.verify(sig, CONTEXT + body)
    except InvalidSignature:
        raise TokenError("bad_signature", "bad token signature") from None
    if now > claims.expires + LEEWAY:
        raise TokenError("expired", f"token expired {int(now - claims.expires)} s ago")
    if claims.task_id != task_id:
        raise TokenError("wrong_task", "token is for another task")
    if not claims.start <= start <= end <= claims.end:  # a range clamped at the end of the file is inside
        raise TokenError("wrong_range", f"token is for bytes {claims.start}-{claims.end} (piece {claims.piece})")
    if claims.source != source:
        raise TokenError("wrong_source", "token is for another source")
    if claims.client != client:
        raise TokenError("wrong_client", f"token is for another client ({CLIENT_HEADER})")
    return claims
