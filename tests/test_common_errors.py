"""common/errors.py: one tree, stable wire codes, exit codes."""

from __future__ import annotations

import pytest

from common import errors
from common.errors import BY_CODE, DfError, from_wire

ALL = sorted(BY_CODE.values(), key=lambda c: c.code)


def test_codes_are_unique() -> None:
    classes = [DfError, *errors._all_subclasses(DfError)]
    assert len({c.code for c in classes}) == len(classes)


@pytest.mark.parametrize("cls", ALL, ids=lambda c: c.code)
def test_round_trip(cls: type[DfError]) -> None:
    e = cls("boom", detail={"piece": 3})
    back = from_wire(e.to_wire())
    assert type(back) is cls
    assert back.message == "boom" and back.detail == {"piece": 3}
    assert 400 <= cls.status <= 599


def test_to_wire_shape() -> None:
    assert errors.NotFound("x").to_wire() == {"error": "not_found", "message": "x"}
    assert errors.NotFound().to_wire() == {"error": "not_found", "message": "not_found"}


@pytest.mark.parametrize("body", [
    {"error": "no_such_code", "message": "x"}, {"error": 5}, {"message": "x"}, None, "text",
    [1, 2], {"error": None},
])
def test_unknown_gives_generic(body) -> None:
    e = from_wire(body, fallback_status=418)
    assert type(e) is DfError and "418" in e.message


def test_bad_field_types_do_not_crash() -> None:
    e = from_wire({"error": "conflict", "message": 12, "detail": "no"})
    assert type(e) is errors.Conflict and e.message == "conflict" and e.detail == {}


@pytest.mark.parametrize("cls,status,exit_code", [
    (errors.BadRequest, 400, errors.EXIT_BAD_ARGS),
    (errors.OriginNotFound, 502, errors.EXIT_ORIGIN),
    (errors.OriginPolicyDenied, 403, errors.EXIT_ORIGIN),
    (errors.IntegrityError, 502, errors.EXIT_INTEGRITY),
    (errors.SupernodeUnavailable, 503, errors.EXIT_NO_SUPERNODE),
    (errors.DownloadTimeout, 504, errors.EXIT_TIMEOUT),
    (errors.LocalDiskError, 507, errors.EXIT_DISK),
    (errors.P2PFailed, 502, errors.EXIT_P2P_FAILED),
    (errors.RangeNotSatisfiable, 416, errors.EXIT_GENERIC),
])
def test_status_and_exit_codes(cls, status, exit_code) -> None:
    assert (cls.status, cls.exit_code) == (status, exit_code)


def test_origin_errors_share_a_root() -> None:
    for cls in ALL:
        if cls.code.startswith("origin_"):
            assert issubclass(cls, errors.OriginError)
