"""The pull's piece window (dfget --range): decoded strictly, and the scheduler sees every
piece outside it as held, so none of them is chosen (pure)."""

from __future__ import annotations

import pytest

from common import wire
from common.errors import BadRequest
from supernode.scheduling.dispatch import windowed
from supernode.scheduling.policy import ClientState
from supernode.scheduling.view import Flags

CID = "a" * 32


def test_window_decodes_and_defaults_to_none() -> None:
    assert wire.decode(b'{"cid": "%s"}' % CID.encode(), wire.PullRequest).window is None
    req = wire.decode(b'{"cid": "%s", "window": [2, 5]}' % CID.encode(), wire.PullRequest)
    assert req.window == (2, 5)
    for bad in (b"[-1, 3]", b"[1]", b'"1-3"', b"[1, 2, 3]", b"[1.5, 2]"):
        with pytest.raises(BadRequest):
            wire.decode(b'{"cid": "%s", "window": %s}' % (CID.encode(), bad), wire.PullRequest)


def test_windowed_marks_the_outside_as_held() -> None:
    client = ClientState(cid=CID, have=Flags(bytearray([0, 1, 0, 0, 0, 0])))
    assert windowed(client, None, 6) is client
    seen = windowed(client, (1, 3), 6)
    assert [n for n in range(6) if n not in seen.have] == [2, 3]  # 1 is really held
    assert [n for n in range(6) if n not in windowed(client, (4, 99), 6).have] == [4, 5]
    assert [n for n in range(6) if n not in windowed(client, (5, 2), 6).have] == []  # empty
    assert [n for n in range(6) if n not in windowed(client, (50, 60), 6).have] == []
    short = ClientState(cid=CID, have=Flags())  # a client that holds nothing yet
    assert [n for n in range(6) if n not in windowed(short, (0, 2), 6).have] == [0, 1, 2]
