"""Piece tokens (common/tokens.py): what a token binds, and every way one is refused."""

from __future__ import annotations

import base64

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import tokens

TID = "ab" * 32
CID = "11" * 16
SRC = "22" * 16
NOW = 1_700_000_000


@pytest.fixture
def signer() -> tokens.Signer:
    return tokens.Signer(Ed25519PrivateKey.generate())


def issue(signer: tokens.Signer, **over: object) -> str:
    kw: dict[str, object] = {"task_id": TID, "piece": 3, "start": 300, "end": 399, "client": CID,
                             "source": SRC, "expires": NOW + 60}
    kw.update(over)
    return signer.issue(**kw)  # type: ignore[arg-type]


def check(signer: tokens.Signer, token: str | None, **over: object) -> tokens.Claims:
    kw: dict[str, object] = {"task_id": TID, "start": 300, "end": 399, "client": CID, "source": SRC, "now": NOW}
    kw.update(over)
    keys = {signer.kid: signer.key.public_key()}
    return tokens.verify(token, keys.get, **kw)  # type: ignore[arg-type]


def test_round_trip_is_compact_and_binds_everything(signer: tokens.Signer) -> None:
    token = issue(signer)
    assert len(token) == 216 and set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    claims = check(signer, token)
    assert claims == tokens.Claims(signer.kid, NOW + 60, TID, 3, 300, 399, CID, SRC)
    # a range clamped at the end of the file (or any part of the piece) is inside the token's
    assert check(signer, token, start=300, end=350).piece == 3


@pytest.mark.parametrize("over, reason, status", [
    ({"task_id": "cd" * 32}, "wrong_task", 403),
    ({"start": 400, "end": 499}, "wrong_range", 403),
    ({"start": 200, "end": 399}, "wrong_range", 403),
    ({"end": 400}, "wrong_range", 403),
    ({"client": "33" * 16}, "wrong_client", 403),
    ({"client": None}, "wrong_client", 403),
    ({"source": "44" * 16}, "wrong_source", 403),
    ({"now": NOW + 60 + tokens.LEEWAY + 1}, "expired", 401),
])
def test_refused_for_another_request(signer: tokens.Signer, over: dict[str, object], reason: str,
                                     status: int) -> None:
    with pytest.raises(tokens.TokenError) as err:
        check(signer, issue(signer), **over)
    assert err.value.reason == reason and err.value.status == status
    assert err.value.to_wire()["error"] == ("unauthorized" if status == 401 else "forbidden")


def test_clock_skew_within_leeway_is_forgiven(signer: tokens.Signer) -> None:
    check(signer, issue(signer), now=NOW + 60 + tokens.LEEWAY)


def test_missing_and_malformed(signer: tokens.Signer) -> None:
    good = issue(signer)
    for token, reason in [(None, "missing"), ("", "malformed"), ("!!!", "malformed"),
                          (good[:-4], "malformed"), (good + "AAAA", "malformed"), ("A" * 5000, "malformed")]:
        with pytest.raises(tokens.TokenError) as err:
            check(signer, token)
        assert err.value.reason == reason and err.value.status == 401


def test_wrong_version_is_malformed(signer: tokens.Signer) -> None:
    raw = bytearray(base64.urlsafe_b64decode(issue(signer) + "="))
    raw[0] = 1  # the one-piece layout of version 1
    with pytest.raises(tokens.TokenError) as err:
        check(signer, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode())
    assert err.value.reason == "malformed"


def test_signed_by_another_key(signer: tokens.Signer) -> None:
    other = tokens.Signer(Ed25519PrivateKey.generate())
    with pytest.raises(tokens.UnknownKey) as err:
        check(signer, issue(other))
    assert err.value.reason == "unknown_key" and err.value.kid == other.kid


def test_another_key_under_a_known_key_id_fails_the_signature(signer: tokens.Signer) -> None:
    forger = tokens.Signer(Ed25519PrivateKey.generate())
    forger.kid = signer.kid  # claims to be the supernode's key
    with pytest.raises(tokens.TokenError) as err:
        check(signer, issue(forger))
    assert err.value.reason == "bad_signature"


@pytest.mark.parametrize("offset", [1, 9, 13, 45, 62, 66, 74, 82, 98, 161])
def test_any_flipped_byte_is_refused(signer: tokens.Signer, offset: int) -> None:
    raw = bytearray(base64.urlsafe_b64decode(issue(signer) + "="))
    raw[offset] ^= 0x01
    with pytest.raises(tokens.TokenError) as err:
        check(signer, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode())
    assert err.value.reason in ("bad_signature", "unknown_key")


def test_key_id_is_derived_from_the_public_key(signer: tokens.Signer) -> None:
    assert signer.kid == tokens.key_id(signer.public) and len(signer.kid) == 8
    assert tokens.raw_public(tokens.load_public(signer.public.hex())) == signer.public
    with pytest.raises(ValueError):
        tokens.load_public("zz" * 32)


def test_one_token_grants_each_assignment_of_a_pull_at_its_own_source(signer: tokens.Signer) -> None:
    other = "33" * 16
    token = signer.issue_grants(task_id=TID, client=CID, expires=NOW + 60,
                                grants=[(3, 300, 399, SRC), (7, 700, 799, other), (9, 900, 999, SRC)])
    assert len(token) <= 552
    assert check(signer, token).piece == 3
    assert check(signer, token, start=900, end=999).piece == 9
    assert check(signer, token, start=700, end=799, source=other).piece == 7
    # a grant is valid only at its own source
    with pytest.raises(tokens.TokenError) as err:
        check(signer, token, start=700, end=799)
    assert err.value.reason == "wrong_range"
    with pytest.raises(tokens.TokenError) as err:
        check(signer, token, start=300, end=399, source=other)
    assert err.value.reason == "wrong_range"
    with pytest.raises(tokens.TokenError) as err:
        check(signer, token, source="44" * 16)
    assert err.value.reason == "wrong_source"


def test_grant_count_is_bounded(signer: tokens.Signer) -> None:
    most = [(n, n * 100, n * 100 + 99, SRC) for n in range(tokens.MAX_GRANTS)]
    token = signer.issue_grants(task_id=TID, client=CID, expires=NOW + 60, grants=most)
    assert len(token) == 552 and check(signer, token, start=700, end=799).piece == 7
    for bad in ([], most + [(99, 0, 1, SRC)]):
        with pytest.raises(ValueError):
            signer.issue_grants(task_id=TID, client=CID, expires=NOW + 60, grants=bad)
    # a count that does not match the length is malformed, not an over-read
    raw = bytearray(base64.urlsafe_b64decode(issue(signer) + "="))
    raw[61] = 2
    with pytest.raises(tokens.TokenError) as err:
        check(signer, base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode())
    assert err.value.reason == "malformed"
