"""Records of the local control plane (Unix socket `<home>/peer.sock`, JSON bodies).

Only local dfget processes of the same user talk to it (the socket is mode 0600 in the
home directory); still every body is decoded strictly, like the supernode API.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Annotated

from msgspec import Meta, Struct

from common.wire import BackToSourceReason, Id32, PieceKeys, PieceNo, TaskId

SOCKET_NAME = "peer.sock"
_MAX_UNIX_PATH = 100  # sun_path is 108 bytes on Linux; keep a margin

AbsPath = Annotated[str, Meta(min_length=1, max_length=4096, pattern=r"^/[^\x00]*$")]
BaseUrl = Annotated[str, Meta(min_length=8, max_length=512, pattern=r"^https?://")]


class ServerInfo(Struct, frozen=True):
    peer_id: str
    ip: str
    port: int
    pid: int
    version: str
    totallimit: int
    auth_refused: dict[str, int] = {}  # piece requests refused, by reason (common/tokens.py)
    # supernode base URL -> this peer's secret there (RegisterReply.peer_secret), so that
    # every dfget of this host registers the peer with it
    peer_secrets: dict[str, str] = {}
    tls: bool = False  # pieces are served over TLS (--cert/--key)


class RegisterFile(Struct, frozen=True):
    task_id: TaskId
    path: AbsPath
    length: int  # -1 while unknown
    piece_size: Annotated[int, Meta(ge=1)]
    supernodes: Annotated[list[BaseUrl], Meta(max_length=64)] = []
    owner_pid: int = 0  # the dfget downloading it; the file is "in progress" while it lives
    piece_auth: bool = True  # what the supernode said at registration: requests need a token
    keys: PieceKeys = []  # the supernodes' public keys from that registration
    clients: Annotated[list[Id32], Meta(max_length=64)] = []  # the download's client ids (supernodes')


class TrustKeys(Struct, frozen=True):
    keys: PieceKeys


class MarkVerified(Struct, frozen=True):
    pieces: Annotated[list[PieceNo], Meta(max_length=1 << 20)]
    length: int | None = None  # set once a chunked origin's length is known


class MovedFile(Struct, frozen=True):
    path: AbsPath
    # sha256 hex of the whole file (a digest task's, checked by dfget; else the
    # supernode's): outputs with one content stand in for each other (table.py)
    content: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")] | None = None


class PeerSecret(Struct, frozen=True):
    supernode: BaseUrl
    secret: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]


class BackToSource(Struct, frozen=True):
    reason: BackToSourceReason


class Limits(Struct, frozen=True):
    totallimit: Annotated[int, Meta(ge=0)]


def socket_path(home: Path) -> Path:
    """`<home>/peer.sock`, or a per-home path under the temp dir when the home's path is
    too long for AF_UNIX (deep test directories)."""
    path = home / SOCKET_NAME
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH:
        return path
    tag = hashlib.sha256(os.fsencode(home.resolve())).hexdigest()[:24]
    base = Path(tempfile.gettempdir()) / f"dfget-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / f"{tag}.sock"
