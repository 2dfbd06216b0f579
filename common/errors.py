"""One exception tree for the whole project, with stable wire codes and CLI exit codes.

Every error that crosses a process boundary carries a short `code` string; the HTTP
middleware turns it into a status and a JSON body, dfget turns it back into the same
class and from there into an exit code. Third-party exceptions (aiohttp, redis) are
translated into this tree at the boundary and never leak further.
"""

from __future__ import annotations

from typing import ClassVar


class Error(Exception):
    """Root of every exception this project raises. Two branches: `DfError` (expected
    failures, with wire codes and exit codes) and `Signal` (control flow between modules
    of one process). A few leaves also derive from a builtin (`OSError`, `ValueError`)
    so that callers written against the builtin keep catching them."""


class DfError(Error):
    """Root of every expected failure. `code` is the wire name, `status` the HTTP one."""

    # Class attributes; an instance may narrow code and status (a piece token's reason
    # decides between 401 and 403, common/tokens.py).
    code: str = "internal"
    status: int = 500
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str = "", *, detail: dict[str, object] | None = None) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.detail = detail or {}

    def to_wire(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.code, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return body


class Signal(Error):
    """Control flow between modules of one process ("this supernode is down, try the
    next", "register again", "this piece failed for reason R"): caught by the caller
    that knows what to do next, never sent on the wire, never shown to a user. One that
    escapes to an HTTP middleware is a bug and is logged as one."""


# --- client input -------------------------------------------------------------------
class BadRequest(DfError):
    code = "bad_request"
    status = 400
    exit_code = 2


class NotFound(DfError):
    code = "not_found"
    status = 404


class Conflict(DfError):
    """Same task id, different URL / md5 / identifier (or a report on a piece not held)."""

    code = "conflict"
    status = 409


class Unauthorized(DfError):
    code = "unauthorized"
    status = 401


class Forbidden(DfError):
    code = "forbidden"
    status = 403


class PeerAddressDenied(Forbidden):
    """A registration named a peer address the supernode's peer policy refuses."""

    code = "peer_denied_by_policy"


class PeerSecretRefused(Forbidden):
    """A call as a peer (heartbeat, down, registration of a peer id already taken) without
    that peer's secret (`X-Dragonfly-Peer-Secret`), or with a wrong one."""

    code = "peer_secret_refused"


class TooManyRequests(DfError):
    code = "too_many_requests"
    status = 429


class RequestTimeout(DfError):
    """The request body did not arrive within the server's deadline (a slow client)."""

    code = "request_timeout"
    status = 408


class PayloadTooLarge(DfError):
    code = "payload_too_large"
    status = 413


class RangeNotSatisfiable(DfError):
    code = "range_not_satisfiable"
    status = 416


class Busy(DfError):
    """Upload slots exhausted, or the server is draining."""

    code = "busy"
    status = 503


# --- origin -------------------------------------------------------------------------
class OriginError(DfError):
    """The origin could not give us the file. Exit code 4 for dfget."""

    code = "origin_error"
    status = 502
    exit_code = 4


class OriginPolicyDenied(OriginError):
    code = "origin_denied_by_policy"
    status = 403


class OriginNotFound(OriginError):
    code = "origin_not_found"


class OriginUnauthorized(OriginError):
    code = "origin_unauthorized"


class OriginForbidden(OriginError):
    code = "origin_forbidden"


class OriginStatus(OriginError):
    """Any other unexpected status (other 4xx, or 5xx/429 after bounded retries)."""

    code = "origin_bad_status"


class OriginUnavailable(OriginError):
    """Connection refused / reset / timeout after bounded retries."""

    code = "origin_unavailable"


class OriginShortBody(OriginError):
    code = "origin_short_body"


class OriginLongBody(OriginError):
    code = "origin_long_body"


class OriginChanged(OriginError):
    """ETag / Last-Modified / length moved under us: two versions are never spliced."""

    code = "origin_changed"


class OriginTooLarge(OriginError):
    code = "origin_too_large"


# --- integrity ------------------------------------------------------------------------
class IntegrityError(DfError):
    code = "integrity"
    status = 502
    exit_code = 5


class ContentDigestMismatch(IntegrityError):
    """The bytes do not hash to the content-addressed identifier (`sha256:<hex>`) the task
    is named by: never cached, never served."""

    code = "content_digest_mismatch"


# --- infrastructure -------------------------------------------------------------------
class StoreError(DfError):
    """Redis (or the embedded store) did not answer."""

    code = "store_unavailable"
    status = 503


class CdnStorageError(DfError):
    """The supernode could not write its piece cache (disk full, I/O error): the origin is
    fine, so a dfget goes back to source (or fails with 8 under --notbs)."""

    code = "cdn_storage"
    status = 507


class StartupError(DfError):
    """A daemon cannot start (its port is taken, its key file unusable): one line on
    stderr, no traceback."""

    code = "startup"


class SupernodeUnavailable(DfError):
    code = "supernode_unavailable"
    status = 503
    exit_code = 3


class TlsError(DfError):
    """TLS with a supernode cannot work as configured (its certificate is not trusted, it
    does not speak TLS, it refused our client certificate): the user must fix a flag, and
    going to the origin instead would hide that (the supernode answers)."""

    code = "tls"
    status = 502
    exit_code = 9


class PeerError(DfError):
    """A peer refused, reset, timed out or sent a wrong body."""

    code = "peer_error"
    status = 502


class DownloadTimeout(DfError):
    code = "timeout"
    status = 504
    exit_code = 6


class LocalDiskError(DfError):
    code = "local_disk"
    status = 507
    exit_code = 7


class P2PFailed(DfError):
    """P2P did not complete and back-to-source was not allowed (--notbs)."""

    code = "p2p_failed"
    status = 502
    exit_code = 8


class TaskFailed(DfError):
    """A task's CDN fetch failed for a reason not covered by a finer class."""

    code = "task_failed"
    status = 502
    exit_code = 4


class UnknownDigest(NotFound):
    """`dfget --digest` without a URL: no task of the swarm has that digest (nobody
    imported it, nobody registered it with a URL, or it was collected since)."""

    code = "unknown_digest"
    exit_code = 10


class DigestUnsupported(Conflict):
    """The task's pieces are hashed with an algorithm this client did not say it can
    check (an older dfget joining a blake3 task): it must be upgraded, or the task
    registered again once collected, or the supernodes run with --piece-digest sha256."""

    code = "digest_unsupported"


class ImportRejected(IntegrityError):
    """An imported file's bytes, as its importer's peer server served them, do not match
    the piece digests or the whole-file digest the importer claimed."""

    code = "import_rejected"


def _all_subclasses(cls: type[DfError]) -> list[type[DfError]]:
    out: list[type[DfError]] = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


BY_CODE: dict[str, type[DfError]] = {c.code: c for c in [DfError, *_all_subclasses(DfError)]}


def from_wire(body: object, *, fallback_status: int = 500) -> DfError:
    """Rebuild an error from a `{"error": code, "message": ...}` body."""
    if isinstance(body, dict):
        code = body.get("error")
        message = body.get("message")
        detail = body.get("detail")
        cls = BY_CODE.get(code) if isinstance(code, str) else None
        if cls is not None:
            return cls(
                message if isinstance(message, str) else str(code),
                detail=detail if isinstance(detail, dict) else None,
            )
    return DfError(f"unexpected error answer (HTTP {fallback_status})")


# Documented dfget exit codes (README "Exit codes").
EXIT_OK = 0
EXIT_GENERIC = 1
EXIT_BAD_ARGS = 2
EXIT_NO_SUPERNODE = 3
EXIT_ORIGIN = 4
EXIT_INTEGRITY = 5
EXIT_TIMEOUT = 6
EXIT_DISK = 7
EXIT_P2P_FAILED = 8
EXIT_TLS = 9
EXIT_UNKNOWN_DIGEST = 10
EXIT_INTERRUPTED = 130
