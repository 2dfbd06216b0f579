"""`dfget upload FILE --digest sha256:<hex>`: put a local file into a supernode's CDN
cache with a resumable chunked upload (supernode/api/uploads.py, docs/api.md "Uploads").

The file is hashed first: a file that does not match --digest is refused before a byte
is sent. The session (its id and the supernode that holds it: its spool file is on that
supernode's disk) is kept in `<home>/uploads/<hex>.json`, so the same command run again
after a kill asks that supernode where its durable offset is (HEAD) and sends only the
rest. Transient failures (connection refused or reset, timeouts, 5xx, 503 busy) are
retried with bounded exponential backoff, re-reading the offset first (a chunk whose
answer was lost may have been kept).

`upload_file(cfg)` is the library entry (`dfget import --upload` calls it);
`run_upload(cfg)` runs it and returns the exit code; `upload_cmd` is the subcommand.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from common import errors, logs, units
from common import tls as tlsconf
from common.errors import EXIT_GENERIC, EXIT_INTERRUPTED, EXIT_OK, DfError, Signal
from common.hostport import hostport
from common.taskid import is_content_identifier, task_id
from common.tls import ClientTls

from . import config as C
from .httpclient import HttpClient, Response, TlsFailure
from .neterr import describe
from .throttle import Throttle

log = logging.getLogger("dfget.upload")
DEFAULT_CHUNK = 8 << 20
MIN_CHUNK = 4 << 10
MAX_CHUNK = 64 << 20  # the supernode's limit of one PATCH body
REQUEST_TIMEOUT = 120.0
STATE_DIR = "uploads"
TOKEN_ENV = "DFGET_ADMIN_TOKEN"


@dataclass(frozen=True)
class UploadConfig:
    file: Path
    digest: str  # sha256:<64 hex>
    home: Path
    nodes: tuple[C.Node, ...] = (C.Node("127.0.0.1", C.DEFAULT_NODE_PORT),)
    chunk_size: int = DEFAULT_CHUNK
    admin_token: str = field(default="", repr=False)
    tls: ClientTls = field(default_factory=ClientTls)
    limit: int = 0  # bytes/s, 0 = none
    retries: int = 6  # consecutive transient failures before giving up
    backoff: float = 0.2  # first retry delay, doubled each time (capped at 5 s)
    json: bool = False
    log_level: str = "error"


@dataclass
class UploadReport:
    digest: str
    task_id: str
    file: str
    length: int = 0
    bytes_sent: int = 0
    resumed_from: int = 0
    supernode: str = ""
    session: str = ""
    state: str = ""  # committed once the supernode holds the verified file
    elapsed: float = 0.0


class _Transient(Signal):
    """A failure worth a retry (the supernode may be restarting, busy, or the link hiccuped)."""


class _Lost(Signal):
    """The session is gone (expired, cancelled, supernode restarted): start a new one."""


def check_digest(digest: str) -> str:
    if not is_content_identifier(digest):
        raise C.ConfigError("--digest must be sha256:<64 lower-case hex digits>")
    return digest


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, "sha256:" + h.hexdigest()


def _read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(size)
    if len(data) != size:
        raise errors.LocalDiskError(f"{path} changed while uploading (short read at {offset})")
    return data


# --- the resume state -------------------------------------------------------------------
def state_path(home: Path, digest: str) -> Path:
    return home / STATE_DIR / f"{digest.split(':', 1)[1]}.json"


def _load_state(path: Path, length: int) -> dict[str, Any] | None:
    try:
        st = json.loads(path.read_text())
        if st.get("length") == length and isinstance(st.get("session"), str) and isinstance(st.get("node"), dict):
            return st  # type: ignore[no-any-return]
    except (OSError, ValueError):
        pass
    return None


def _save_state(path: Path, body: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body))
    os.replace(tmp, path)


def _drop_state(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


# --- the protocol -----------------------------------------------------------------------
class Uploader:
    def __init__(self, http: HttpClient, cfg: UploadConfig, report: UploadReport) -> None:
        self.http = http
        self.cfg = cfg
        self.report = report
        self.state_file = state_path(cfg.home, cfg.digest)
        self.throttle = Throttle(cfg.limit)

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        h = {"Accept": "application/json"}
        if self.cfg.admin_token:
            h["Authorization"] = f"Bearer {self.cfg.admin_token}"
        h.update(extra or {})
        return h

    def _tls(self, node: C.Node) -> Any:
        secure = node.tls or (node.scheme == "" and bool(self.cfg.tls.cacert))
        return self.cfg.tls.context() if secure else None

    async def _request(self, node: C.Node, method: str, path: str, body: bytes | None = None,
                       headers: dict[str, str] | None = None) -> Response:
        """One request; _Transient for what a retry may cure, DfError for a refusal."""
        try:
            resp = await self.http.request(method, node.host, node.port, path, body, self._headers(headers),
                                           REQUEST_TIMEOUT, tls=self._tls(node))
        except TlsFailure as exc:
            if exc.kind == tlsconf.OTHER:  # a TLS stream broken mid-answer: the link, not the setup
                raise _Transient(f"{hostport(node.host, node.port)}: {exc}") from None
            raise errors.TlsError(f"{node.base_url}: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise _Transient(f"{hostport(node.host, node.port)}: {describe(exc)}") from None
        if resp.status >= 500 and resp.status != 507:
            raise _Transient(f"{hostport(node.host, node.port)} answered HTTP {resp.status}: {_message(resp)}")
        if resp.status == 409 and _code(resp) == "upload_busy":
            raise _Transient("the supernode is still receiving an earlier chunk of this upload")
        return resp

    async def _retrying(self, what: str, fn: Any) -> Any:
        delay = self.cfg.backoff
        for attempt in range(self.cfg.retries + 1):
            try:
                return await fn()
            except _Transient as exc:
                if attempt == self.cfg.retries:
                    raise errors.SupernodeUnavailable(f"{what}: {exc}") from None
                log.info("%s: %s; retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
        raise AssertionError("unreachable")

    async def run(self) -> None:
        for _ in range(3):  # a session lost twice in one run is not chance
            node, sid, offset = await self._open()
            if sid == "":
                self.report.state = "committed"
                return
            try:
                await self._send(node, sid, offset)
                await self._commit(node, sid)
                return
            except errors.IntegrityError:
                _drop_state(self.state_file)  # the supernode discarded the session
                raise
            except _Lost as exc:
                log.warning("upload session lost (%s); starting a new one", exc)
                _drop_state(self.state_file)
        raise errors.DfError("the supernode lost the upload session three times")

    async def _open(self) -> tuple[C.Node, str, int]:
        """(node, session id, offset) of the session to continue or a new one; session ""
        when the supernode has the file already."""
        st = _load_state(self.state_file, self.report.length)
        if st is not None:
            node = C.Node(str(st["node"]["host"]), int(st["node"]["port"]), 1, str(st["node"].get("scheme", "")))
            try:
                offset = await self._retrying("resuming the upload", lambda: self._offset(node, st["session"]))
            except (_Lost, errors.SupernodeUnavailable) as exc:
                log.warning("cannot resume the upload on %s (%s); starting anew", node.base_url, exc)
                _drop_state(self.state_file)
            else:
                self.report.resumed_from = offset
                self.report.supernode, self.report.session = node.base_url, st["session"]
                return node, st["session"], offset
        last: Exception | None = None
        for node in self.cfg.nodes:
            try:
                return await self._retrying(f"opening an upload on {node.base_url}", lambda n=node: self._create(n))
            except errors.SupernodeUnavailable as exc:
                last = exc
        raise last if last is not None else errors.SupernodeUnavailable("no supernode given")

    async def _offset(self, node: C.Node, sid: str) -> int:
        resp = await self._request(node, "HEAD", f"/api/v1/uploads/{sid}")
        if resp.status == 404:
            raise _Lost("the supernode does not know the session (expired, cancelled or restarted)")
        _check(resp)
        return _int_header(resp, "upload-offset")

    async def _create(self, node: C.Node) -> tuple[C.Node, str, int]:
        body = json.dumps({"digest": self.cfg.digest, "length": self.report.length}).encode()
        resp = await self._request(node, "POST", "/api/v1/uploads", body, {"Content-Type": "application/json"})
        _check(resp)
        out = json.loads(resp.body)
        self.report.supernode = node.base_url
        if resp.status == 200 and out.get("state") == "committed":
            log.info("%s has %s already: nothing to send", node.base_url, self.cfg.digest)
            return node, "", self.report.length
        sid = str(out["id"])
        self.report.session = sid
        _save_state(self.state_file, {"digest": self.cfg.digest, "length": self.report.length, "session": sid,
                                      "node": {"host": node.host, "port": node.port, "scheme": node.scheme}})
        return node, sid, 0

    async def _send(self, node: C.Node, sid: str, offset: int) -> None:
        length, path = self.report.length, f"/api/v1/uploads/{sid}"
        delay = self.cfg.backoff
        failures = 0
        while offset < length:
            size = min(self.cfg.chunk_size, length - offset)
            data = await asyncio.to_thread(_read_at, self.cfg.file, offset, size)
            if not self.throttle.unlimited:
                await self.throttle.consume(size)
            try:
                resp = await self._request(node, "PATCH", path, data, {
                    "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"})
                if resp.status == 404:
                    raise _Lost("the supernode forgot the session")
                if resp.status == 409 and _code(resp) == "upload_offset_mismatch":
                    offset = _detail_offset(resp)  # we are behind what it has: follow it
                    continue
                _check(resp)
            except _Transient as exc:
                failures += 1
                if failures > self.cfg.retries:
                    raise errors.SupernodeUnavailable(f"uploading to {node.base_url}: {exc}") from None
                log.info("chunk at %d: %s; retrying in %.1f s", offset, exc, delay)
                await asyncio.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, 5.0)
                offset = await self._retrying("re-reading the upload offset", lambda: self._offset(node, sid))
                continue
            failures, delay = 0, self.cfg.backoff
            offset = _int_header(resp, "upload-offset")
            self.report.bytes_sent += size
            if json.loads(resp.body).get("state") == "committed":
                self.report.state = "committed"

    async def _commit(self, node: C.Node, sid: str) -> None:
        if self.report.state != "committed":
            async def put() -> None:
                resp = await self._request(node, "PUT", f"/api/v1/uploads/{sid}")
                if resp.status == 404:
                    raise _Lost("the supernode forgot the session before its commit")
                _check(resp)
            await self._retrying("committing the upload", put)
            self.report.state = "committed"
        _drop_state(self.state_file)


def _code(resp: Response) -> str:
    try:
        return str(json.loads(resp.body).get("error", ""))
    except (ValueError, AttributeError):
        return ""


def _message(resp: Response) -> str:
    try:
        return str(json.loads(resp.body).get("message", ""))
    except (ValueError, AttributeError):
        return resp.body[:200].decode("utf-8", "replace")


def _check(resp: Response) -> None:
    """A refusal (4xx, 507) as the error of the tree its code names."""
    if resp.status < 400:
        return
    try:
        body = json.loads(resp.body)
    except ValueError:
        body = None
    err = errors.from_wire(body, fallback_status=resp.status)
    if not isinstance(body, dict) or errors.BY_CODE.get(str(body.get("error"))) is None:
        # a finer code of the upload API (e.g. upload_too_large): keep its message
        cls = errors.IntegrityError if resp.status == 422 else (
            errors.BadRequest if resp.status == 400 else errors.DfError)
        err = cls(f"HTTP {resp.status}: {_message(resp)}")
    raise err


def _int_header(resp: Response, name: str) -> int:
    raw = resp.headers.get(name, "")
    if not raw.isdigit():
        raise _Transient(f"answer without a valid {name} header")
    return int(raw)


def _detail_offset(resp: Response) -> int:
    try:
        return int(json.loads(resp.body)["detail"]["offset"])
    except (ValueError, KeyError, TypeError):
        raise _Transient("409 without the current offset") from None


def check_chunk(text: str) -> int:
    """--chunk-size: a size between MIN_CHUNK and MAX_CHUNK (ConfigError otherwise)."""
    try:
        chunk = units.parse_size(text)
    except ValueError as exc:
        raise C.ConfigError(f"--chunk-size: {exc}") from None
    if not MIN_CHUNK <= chunk <= MAX_CHUNK:
        raise C.ConfigError("--chunk-size must be between 4KiB and 64MiB")
    return chunk


async def upload_file(cfg: UploadConfig) -> UploadReport:
    """Upload `cfg.file` (checked against `cfg.digest` first) and return the report."""
    t0 = time.monotonic()
    check_digest(cfg.digest)
    try:
        length, actual = await asyncio.to_thread(_hash_file, cfg.file)
    except OSError as exc:
        raise errors.LocalDiskError(f"cannot read {cfg.file}: {exc.strerror or exc}") from None
    report = UploadReport(digest=cfg.digest, task_id=task_id("", identifier=cfg.digest), file=str(cfg.file),
                          length=length)
    if actual != cfg.digest:
        raise errors.ContentDigestMismatch(f"{cfg.file} hashes to {actual}, not {cfg.digest}: nothing sent")
    async with HttpClient() as http:
        await Uploader(http, cfg, report).run()
    report.elapsed = round(time.monotonic() - t0, 3)
    return report


def run_upload(cfg: UploadConfig) -> int:
    """Run an upload, print its result (JSON report with `cfg.json`), return the exit code."""
    logs.setup(cfg.log_level, as_json=False, text_format="dfget: %(name)s: %(message)s")
    code, report, message = EXIT_OK, None, ""
    try:
        report = asyncio.run(upload_file(cfg))
    except DfError as exc:
        code, message = exc.exit_code, exc.message
        click.echo(f"dfget: error: {exc.message}", err=True)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        click.echo("dfget: interrupted", err=True)
    except Exception as exc:  # noqa: BLE001 - last resort: one line
        code = EXIT_GENERIC
        click.echo(f"dfget: unexpected error: {type(exc).__name__}: {exc}", err=True)
    if cfg.json:
        out: dict[str, Any] = asdict(report) if report is not None else {
            "digest": cfg.digest, "file": str(cfg.file), "state": "failed", "error": message}
        out["exit_code"] = code
        click.echo(json.dumps(out))
    elif report is not None:
        click.echo(f"dfget: uploaded {report.file} as {report.digest} to {report.supernode} "
                   f"({report.bytes_sent} bytes sent, resumed from {report.resumed_from})", err=True)
    return code


@click.command("upload", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--digest", required=True, help="sha256:<hex> of FILE (checked before anything is sent).")
@click.option("-n", "--node", default="127.0.0.1:8002", show_default=True,
              help="Supernodes: host[:port][=weight],...; the first that answers gets the upload.")
@click.option("--home", default="~/.dfget", show_default=True,
              help="dfget's working directory (the resume state lives in <home>/uploads/).")
@click.option("--chunk-size", default="8MiB", show_default=True, help="Bytes per PATCH (4KiB..64MiB).")
@click.option("-s", "--locallimit", default="0", show_default=True, help="Upload rate limit (e.g. 20MB); 0 = none.")
@click.option("--admin-token", default="", envvar=TOKEN_ENV, show_envvar=True,
              help="The supernode's admin token, when it has one (uploads write its cache).")
@click.option("--cacert", type=click.Path(dir_okay=False), default=None,
              help="PEM CA certificates trusted for https supernodes (a bare host:port is then https).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout at the end.")
@click.option("--verbose", is_flag=True, help="Log details to stderr.")
def upload_cmd(file: str, digest: str, node: str, home: str, chunk_size: str, locallimit: str, admin_token: str,
               cacert: str | None, as_json: bool, verbose: bool) -> None:
    """Upload FILE into the supernode's CDN cache as the content-addressed task of its
    digest (resumable: run the same command again after an interruption)."""
    try:
        chunk = check_chunk(chunk_size)
        cfg = UploadConfig(
            file=Path(file).expanduser().absolute(), digest=check_digest(digest),
            home=Path(home).expanduser().absolute(), nodes=C.parse_nodes(node), chunk_size=chunk,
            admin_token=admin_token.strip(), tls=ClientTls(cacert, None, None),
            limit=C.parse_rate(locallimit, "--locallimit"), json=as_json,
            log_level="info" if verbose else "error")
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(run_upload(cfg))
