"""Wire records of the supernode API, in JSON or msgpack.

Decoding is strict: wrong types, missing fields, over-long strings and arrays are all
rejected with `BadRequest` before anything else looks at the data. msgspec does the
validation and both encodings (it is faster than json+msgpack by hand and validates as
it parses, so a hostile body never becomes a half-checked dict).
"""

from __future__ import annotations

from typing import Annotated, Literal, TypeVar

import msgspec
from msgspec import Meta, Struct

from .errors import BadRequest

JSON_TYPE = "application/json"
MSGPACK_TYPE = "application/msgpack"

Id32 = Annotated[str, Meta(pattern=r"^[0-9a-f]{32}\Z")]
TaskId = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
Digest = Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]
Md5 = Annotated[str, Meta(pattern=r"^[0-9a-fA-F]{32}\Z")]
Url = Annotated[str, Meta(min_length=1, max_length=8192)]
Ip = Annotated[str, Meta(min_length=2, max_length=64)]
Port = Annotated[int, Meta(ge=1, le=65535)]
PieceNo = Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]
ShortText = Annotated[str, Meta(max_length=256)]
HeaderName = Annotated[str, Meta(min_length=1, max_length=256, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")]
HeaderValue = Annotated[str, Meta(max_length=8192, pattern=r"^[^\r\n\x00]*\Z")]
Headers = Annotated[dict[HeaderName, HeaderValue], Meta(max_length=64)]
FilterKeys = Annotated[list[Annotated[str, Meta(min_length=1, max_length=256)]], Meta(max_length=32)]
Token = Annotated[str, Meta(min_length=1, max_length=552, pattern=r"^[A-Za-z0-9_-]+\Z")]  # common/tokens.py

Pattern = Literal["p2p", "cdn"]
DigestAlgo = Literal["blake3", "sha256"]  # common.digest.ALGORITHMS
# what a client offers: names this supernode may not know (a newer client) are ignored
DigestAlgos = Annotated[list[Annotated[str, Meta(max_length=16)]], Meta(max_length=8)]
ReportResult = Literal["ok", "failed", "have"]
FailReason = Literal[
    "not_found", "digest_mismatch", "timeout", "refused", "short_body", "long_body", "error"
]
PullState = Literal["continue", "wait", "finished", "failed"]
# Why a dfget went to the origin itself: a bounded set, so that it can be a metric label.
#   no_supernode: none answered; p2p_failed: P2P stalled or too many pieces failed;
#   error: the supernode refused the download for a reason that is not final (e.g. busy);
#   pattern_source: `-p source` asked for it.
BackToSourceReason = Literal["no_supernode", "p2p_failed", "error", "pattern_source"]
BACK_TO_SOURCE_REASONS: tuple[str, ...] = ("no_supernode", "p2p_failed", "error", "pattern_source")


class PeerAddr(Struct, frozen=True):
    """Where this client's peer server listens; the id is the peer server's own."""

    peer_id: Id32
    ip: Ip
    port: Port
    tls: bool = False  # the peer server serves pieces over TLS (https)


class RegisterRequest(Struct, frozen=True):
    # None only for a digest task joined by its digest alone (`identifier` is then a
    # `sha256:<hex>` the swarm must already know: `dfget --digest D` without -u)
    url: Url | None = None
    peer: PeerAddr | None = None
    headers: Headers = {}
    md5: Md5 | None = None
    identifier: ShortText | None = None
    filter: FilterKeys = []
    range: Annotated[str, Meta(max_length=128)] | None = None
    pattern: Pattern = "p2p"
    cid: Id32 | None = None  # given when a client moves to another supernode mid-download
    # the piece digests this client can check (common/digest.py); a client from before
    # the choice sends none and can check only sha256
    digest_algos: DigestAlgos = msgspec.field(default_factory=lambda: ["sha256"])


class TaskInfo(Struct, frozen=True):
    task_id: TaskId
    length: int  # -1 while unknown (chunked origin still streaming)
    piece_size: int
    piece_count: int  # -1 while unknown
    status: str  # pending | fetching | success | failed
    digest_algo: DigestAlgo = "sha256"  # of the piece digests (common/digest.py)
    file_digest: str | None = None
    error: dict[str, str] | None = None
    # sha256 of the whole file once the CDN has it all (`sha256:<hex>`): the content a
    # peer's output of this task is, whatever the task's id (issue 13's references)
    content: str | None = None


class PieceKey(Struct, frozen=True):
    """A supernode's Ed25519 public key for piece tokens (common/tokens.py)."""

    kid: Annotated[str, Meta(pattern=r"^[0-9a-f]{16}\Z")]
    key: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")]


PieceKeys = Annotated[list[PieceKey], Meta(max_length=64)]


class RegisterReply(Struct, frozen=True):
    cid: Id32
    supernode_id: Id32
    task: TaskInfo
    piece_auth: bool = False  # piece requests need a token; `keys` verify them
    keys: PieceKeys = []
    # with a peer: the secret its peer server sends (X-Dragonfly-Peer-Secret) when it
    # speaks for that peer (heartbeat, down) and dfget sends when registering it again
    peer_secret: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")] | None = None


ContentDigest = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}\Z")]
MAX_IMPORT_PIECES = 16384  # ~1.1 MB of digests: within the import route's 2 MiB body cap (supernode/api/guard.py)


class ImportRequest(Struct, frozen=True):
    """`dfget import`: a file this peer server holds enters the swarm with no origin. The
    piece digests are the importer's claim; the supernode's CDN checks every piece (and
    the whole file against `digest`) on the bytes it fetches from that peer server before
    anyone is told of them."""

    digest: ContentDigest
    length: Annotated[int, Meta(ge=0, le=1 << 50)]
    piece_size: Annotated[int, Meta(ge=1, le=1 << 30)]
    digests: Annotated[list[Digest], Meta(max_length=MAX_IMPORT_PIECES)]
    peer: PeerAddr


class ImportReply(Struct, frozen=True):
    task: TaskInfo
    new: bool  # False: the swarm had this digest already, nothing is fetched
    peer_secret: Annotated[str, Meta(pattern=r"^[0-9a-f]{64}\Z")] | None = None


class KeysReply(Struct, frozen=True):
    piece_auth: bool
    keys: PieceKeys


class Report(Struct, frozen=True):
    piece: PieceNo
    result: ReportResult
    source: Id32 | None = None
    reason: FailReason | None = None


Reports = Annotated[list[Report], Meta(max_length=64)]


DEFAULT_PULL_WAIT = 20.0  # s a pull long-polls for an assignment, unless it says
MAX_PULL_WAIT = 30.0


class PullRequest(Struct, frozen=True):
    cid: Id32
    limit: Annotated[int, Meta(ge=1, le=16)] = 4
    wait: Annotated[float, Meta(ge=0, le=MAX_PULL_WAIT)] = DEFAULT_PULL_WAIT
    reports: Reports = []
    # Only pieces first..last (inclusive) are wanted (dfget --range); None: all of them
    window: tuple[Annotated[int, Meta(ge=0)], Annotated[int, Meta(ge=0)]] | None = None


class Source(Struct, frozen=True):
    cid: Id32
    ip: Ip
    port: Port
    kind: Literal["peer", "cdn"]
    tls: bool = False  # fetch over https: the scheme travels with every source


class Assignment(Struct, frozen=True):
    piece: int
    start: int
    end: int  # inclusive
    digest: Digest
    source: Source
    token: Token | None = None


class PullReply(Struct, frozen=True):
    state: PullState
    task: TaskInfo
    assignments: list[Assignment] = []
    done: int = 0  # pieces this client holds, as the supernode sees it


class ReportRequest(Struct, frozen=True):
    cid: Id32
    reports: Reports = []
    # back_to_source: aborted, because this client now downloads from the origin itself
    event: Literal["finished", "aborted", "back_to_source"] | None = None
    reason: BackToSourceReason | None = None  # with event back_to_source


class DigestsReply(Struct, frozen=True):
    task: TaskInfo
    digests: list[str | None]


class PeerDownRequest(Struct, frozen=True):
    """A peer server leaving (all its files) or dropping some files."""

    peer_id: Id32
    tasks: Annotated[list[TaskId], Meta(max_length=4096)] | None = None
    # with tasks: only these clients of the peer go (the downloads whose files are gone),
    # not another download of the same task running on the host now
    clients: Annotated[list[Id32], Meta(max_length=4096)] | None = None


class HeartbeatRequest(Struct, frozen=True):
    peer_id: Id32


class PreheatRequest(Struct, frozen=True):
    url: Url
    headers: Headers = {}
    md5: Md5 | None = None
    identifier: ShortText | None = None
    filter: FilterKeys = []


class PreheatStatus(Struct, frozen=True):
    id: TaskId  # the job id is the task id
    status: str  # pending | fetching | success | failed
    length: int  # -1 while unknown
    piece_count: int  # -1 while unknown
    pieces_fetched: int  # verified on the CDN so far
    bytes_fetched: int
    error: dict[str, str] | None = None


T = TypeVar("T")

_json_encoder = msgspec.json.Encoder()
_msgpack_encoder = msgspec.msgpack.Encoder()


def encode(obj: object, *, msgpack: bool = False) -> bytes:
    return _msgpack_encoder.encode(obj) if msgpack else _json_encoder.encode(obj)


def decode(data: bytes, typ: type[T], *, msgpack: bool = False) -> T:
    """Decode and validate; any problem is a BadRequest naming the field."""
    try:
        if msgpack:
            return msgspec.msgpack.decode(data, type=typ)
        return msgspec.json.decode(data, type=typ)
    except msgspec.ValidationError as exc:
        raise BadRequest(f"invalid request: {exc}") from None
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        # msgspec raises UnicodeDecodeError (a ValueError) on bad UTF-8 and RecursionError
        # while skipping a deeply nested value under an unknown key
        raise BadRequest(f"malformed {'msgpack' if msgpack else 'JSON'} body: {exc}") from None


def to_builtins(obj: object) -> object:
    return msgspec.to_builtins(obj)
