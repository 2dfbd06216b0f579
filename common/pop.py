"""Proof of possession: the supernode's signed challenge to a peer server, and the
answer it must give. Pure: no I/O, no clock (callers pass `now`).

A challenge names one peer server (its peer id), one task, one piece and a byte range
inside that piece, a 16-byte random nonce and a mode:

- HASH: answer sha256(nonce || bytes of the range), hex. The supernode checks it against
  its own CDN copy of the piece.
- PIECE: answer the whole piece's bytes. Used when the supernode has no copy: the only
  thing it can check on its own is the piece digest, sha256(piece), and a hash mixed
  with a nonce cannot be checked against that. So the proof is serving the piece on
  demand, verified against the published digest; the nonce still makes each challenge
  single-use (the peer refuses a nonce it has seen).

Binary layout (big-endian), then base64url without padding, in `X-Dragonfly-Challenge`:

    off len field
      0   1 version (1)
      1   8 kid: first 8 bytes of sha256(raw Ed25519 public key of the supernode)
      9   4 expires: unix seconds
     13  32 task id
     45  16 peer id: the peer server challenged (any other refuses it)
     61   4 piece number
     65   8 first byte of the range (offset in the file)
     73   8 last byte of the range (inclusive)
     81   1 mode (0 HASH, 1 PIECE)
     82  16 nonce
     98  64 Ed25519 signature over CONTEXT + everything before it
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common import errors
from common.tokens import LEEWAY, Signer

VERSION = 1
CONTEXT = b"dragonfly-py possession challenge\x00"  # never valid as a piece token, nor the reverse
HEADER = "X-Dragonfly-Challenge"
HASH, PIECE = 0, 1
NONCE_LEN = 16
_BODY = struct.Struct(">B8sI32s16sIQQB16s")
SIG_LEN = 64
LENGTH = _BODY.size + SIG_LEN
_TEXT_LEN = (LENGTH * 4 + 2) // 3  # base64url without padding

# reason -> HTTP status: 400 the challenge is not one; 401 not signed by a supernode we
# trust (or too old); 403 genuine but not for us; 409 a nonce already answered.
STATUS = {"missing": 400, "malformed": 400, "unknown_key": 401, "bad_signature": 401, "expired": 401,
          "wrong_peer": 403, "wrong_task": 403, "replayed": 409}


class ChallengeError(errors.DfError):
    code = "bad_challenge"
    status = 400

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message, detail={"reason": reason})
        self.reason = reason
        self.status = STATUS[reason]


@dataclass(frozen=True)
class Challenge:
    kid: bytes
    expires: int
    task_id: str
    peer_id: str
    piece: int
    start: int
    end: int
    mode: int
    nonce: bytes

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def issue(signer: Signer, *, task_id: str, peer_id: str, piece: int, start: int, end: int, mode: int,
          nonce: bytes, expires: int) -> str:
    if len(nonce) != NONCE_LEN or mode not in (HASH, PIECE) or not 0 <= start <= end:
        raise ValueError("bad challenge fields")
    body = _BODY.pack(VERSION, signer.kid, expires, bytes.fromhex(task_id), bytes.fromhex(peer_id), piece,
                      start, end, mode, nonce)
    sig = signer.key.sign(CONTEXT + body)
    return base64.urlsafe_b64encode(body + sig).rstrip(b"=").decode("ascii")


def parse(text: str | None) -> tuple[Challenge, bytes, bytes]:
    """(challenge, signed body, signature); ChallengeError on anything malformed."""
    if text is None:
        raise ChallengeError("missing", f"a signed challenge is required ({HEADER})")
    if len(text) != _TEXT_LEN:
        raise ChallengeError("malformed", "malformed challenge (length)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ChallengeError("malformed", "malformed challenge (not base64url)") from None
    if len(raw) != LENGTH or raw[0] != VERSION:
        raise ChallengeError("malformed", "malformed challenge (length or version)")
    body, sig = raw[:_BODY.size], raw[_BODY.size:]
    _v, kid, expires, tid, peer, piece, start, end, mode, nonce = _BODY.unpack(body)
    if mode not in (HASH, PIECE) or start > end:
        raise ChallengeError("malformed", "malformed challenge (mode or range)")
    return Challenge(kid, expires, tid.hex(), peer.hex(), piece, start, end, mode, nonce), body, sig


def verify(text: str | None, keys: Callable[[bytes], Ed25519PublicKey | None], *, task_id: str, peer_id: str,
           now: float) -> Challenge:
    """The challenge, if signed by a trusted supernode, unexpired, for this task and this
    peer server. Raises ChallengeError. The range is the caller's to check against what
    it holds (it knows the file's length and pieces)."""
    ch, body, sig = parse(text)
    public = keys(ch.kid)
    if public is None:
        raise ChallengeError("unknown_key", f"challenge signed by an unknown key {ch.kid.hex()}")
    try:
        public.verify(sig, CONTEXT + body)
    except InvalidSignature:
        raise ChallengeError("bad_signature", "bad challenge signature") from None
    if now > ch.expires + LEEWAY:
        raise ChallengeError("expired", f"challenge expired {int(now - ch.expires)} s ago")
    if ch.task_id != task_id:
        raise ChallengeError("wrong_task", "challenge is for another task")
    if ch.peer_id != peer_id:
        raise ChallengeError("wrong_peer", "challenge is for another peer server")
    return ch


def answer(nonce: bytes, data: bytes) -> str:
    """The HASH-mode answer: sha256(nonce || bytes), hex."""
    h = hashlib.sha256(nonce)
    h.update(data)
    return h.hexdigest()


def matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode(), given.encode())
