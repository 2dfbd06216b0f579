"""The `dfget` command line: `dfget -u URL -o OUT [...]`, `dfget server [...]`,
`dfget server stop --home DIR`, `dfget version`.

Exit codes (common/errors.py, README "Exit codes"): 0 ok, 1 unexpected, 2 bad
arguments, 3 no supernode reachable (with --notbs), 4 origin error, 5 integrity,
6 timeout, 7 local disk error, 8 P2P failed (with --notbs), 9 TLS with a supernode cannot
work as configured (certificate not trusted, client certificate refused), 130 interrupted,
141 the reader of `-o -` closed stdout (e.g. `| head`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import click

from common import __version__, logs
from common.errors import (
    EXIT_GENERIC,
    EXIT_INTERRUPTED,
    EXIT_OK,
    DfError,
    DownloadTimeout,
    LocalDiskError,
)
from common.tls import ClientTls, ServerTls, TlsConfigError, check_pair

from . import config as C
from . import notices, stream
from .download import download
from .progress import ProgressBar, Stats
from .stream import StreamClosed

SUBCOMMANDS = ("server", "version", "upload", "import")
DOWNLOAD_EPILOG = """\b
Other commands:
  dfget server [OPTIONS]          run this host's peer server in the foreground
                                  (dfget starts one by itself; see dfget server --help)
  dfget server stop [--home DIR]  stop the peer server of that home
  dfget import FILE [OPTIONS]     put a local file into the swarm, no origin
                                  (see dfget import --help)
  dfget version                   print the version
  dfget upload FILE --digest D    upload FILE into the supernode's CDN cache
                                  (resumable; see dfget upload --help)
"""
LEVELS = list(logs.LEVELS)


def _cfg(fn, *args, **kw):  # type: ignore[no-untyped-def]
    try:
        return fn(*args, **kw)
    except (C.ConfigError, TlsConfigError) as exc:
        raise click.UsageError(str(exc)) from None


def parse_tls(cacert: str | None, cert: str | None, key: str | None,
         client_ca: str | None) -> tuple[ClientTls, ServerTls | None]:
    """What we trust and present as a client, and how a peer server serves; every file is
    loaded once here so that a bad one is a usage error, not a failure mid-download."""
    check_pair(cert, key)
    if client_ca and not cert:
        raise TlsConfigError("--client-ca needs --cert/--key (the peer server must serve TLS to ask for "
                             "client certificates)")
    client = ClientTls(cacert, cert, key)
    server = ServerTls(cert, key, client_ca) if cert and key else None
    if cacert or cert:
        client.context()
    if server is not None:
        server.context()
    return client, server


def tls_options(fn):  # type: ignore[no-untyped-def]
    """--cacert/--cert/--key/--client-ca, the same on dfget and dfget server."""
    path = click.Path(dir_okay=False)
    for flag, help_ in reversed([
        ("--cacert", "PEM file of CA certificates trusted (besides the system's) for https supernodes, "
                     "peers and origins; with it a bare --node host:port is spoken to over https."),
        ("--cert", "PEM certificate: the peer server serves pieces over TLS with it, and it is the "
                   "client certificate presented to servers that ask (mutual TLS)."),
        ("--key", "PEM private key of --cert."),
        ("--client-ca", "PEM file of the CA(s) whose client certificates the peer server requires "
                        "(mutual TLS; needs --cert/--key)."),
    ]):
        fn = click.option(flag, type=path, default=None, help=help_)(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, epilog=DOWNLOAD_EPILOG)
@click.option("-u", "--url", default=None, help="URL of the file (http or https); optional with --digest.")
@click.option("--digest", default=None, metavar="sha256:HEX",
              help="The file's sha256: the task is the digest (any URL with these bytes is one task), "
                   "the whole file is verified before it is renamed into place; without -u the swarm "
                   "must already have it (exit 10 if not).")
@click.option("-o", "--output", default=None,
              help="Output file (default: last URL segment); '-' writes the file to stdout, in order, "
              "as its pieces are verified.")
@click.option("--range", "byte_range", default=None, metavar="bytes=A-B",
              help="Only these bytes of the file (bytes=A-B, bytes=A- or bytes=-N), fetched as "
              "the pieces covering them through the swarm.")
@click.option("--create-dirs", is_flag=True, help="Create the output's missing directories (else an error).")
@click.option("-m", "--md5", default=None, help="Expected md5 of the whole file.")
@click.option("-i", "--identifier", default=None, help="Identifies the file instead of the md5.")
@click.option("-n", "--node", default="127.0.0.1:8002", help="Supernodes: host[:port][=weight],...")
@click.option("--header", "headers", multiple=True, help="'Name: value' for the origin (repeatable).")
@click.option("-f", "--filter", "filter_", default=None, help="Query keys ignored in the task id: 'k1&k2'.")
@click.option("-s", "--locallimit", default="0", show_default=True,
              help="Download rate limit (e.g. 20MB); 0 = none, as fast as the link goes.")
@click.option("--totallimit", default="0", help="Host-wide rate limit (uploads + downloads); 0 = none.")
@click.option("--minrate", default="64KB", show_default=True, help="Slowest acceptable piece rate.")
@click.option("-e", "--timeout", default=None, help="Give up after this long (e.g. 10m).")
@click.option("-p", "--pattern", type=click.Choice(["p2p", "cdn", "source"]), default="p2p", show_default=True,
              help="p2p: peers and supernodes; cdn: supernodes only; source: the origin only.")
@click.option("--notbs", is_flag=True, help="Never download straight from the origin.")
@click.option("-b/-B", "--showbar/--no-showbar", default=None, help="Progress bar on stderr (default: if a tty).")
@click.option("--verbose", is_flag=True, help="Log details to stderr.")
@click.option("--home", default="~/.dfget", show_default=True, help="dfget's working directory.")
@click.option("--ip", default=None, help="IP of this host's peer server (default: towards the supernode).")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="Port of the peer server (0 = any).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report on stdout at the end.")
@click.option("--pull-limit", default=C.DEFAULT_PULL_LIMIT, type=click.IntRange(1, 16), show_default=True,
              help="Pieces in flight at once.")
@click.option("--expiretime", default="3m", show_default=True, help="Peer server: stop serving a file unread this long.")
@click.option("--alivetime", default="5m", show_default=True, help="Peer server: exit after this long idle.")
@click.option("--stall-timeout", default="2m", show_default=True, help="P2P without progress this long fails.")
@click.option("--no-serve", is_flag=True, help="Do not start or use a peer server.")
@click.option("--log-level", type=click.Choice(LEVELS), default=None,
              help="Log level on stderr (default: info with --verbose, else error); "
              "debug logs every piece.")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@tls_options
def download_cmd(url: str | None, digest: str | None, output: str | None, create_dirs: bool, md5: str | None, identifier: str | None, node: str,
                 headers: tuple[str, ...], filter_: str | None, locallimit: str, totallimit: str,
                 minrate: str, timeout: str | None, pattern: str, notbs: bool, showbar: bool | None,
                 verbose: bool, home: str, ip: str | None, port: int, as_json: bool, pull_limit: int,
                 expiretime: str, alivetime: str, stall_timeout: str, no_serve: bool,
                 log_level: str | None, log_json: bool, cacert: str | None, cert: str | None,
                 key: str | None, client_ca: str | None, byte_range: str | None) -> None:
    """Download URL through the supernodes (P2P), back to the origin if that fails."""
    from .stream import check_range

    client_tls, server_tls = _cfg(parse_tls, cacert, cert, key, client_ca)
    digest = _cfg(C.check_digest, digest, identifier, md5)
    if url is None and digest is None:
        raise click.UsageError("give -u/--url, or --digest sha256:<hex> for a file the swarm has")
    if url is None and output is None:
        raise click.UsageError("--digest without -u needs -o/--output")
    if url is None and pattern == "source":
        raise click.UsageError("-p source needs -u/--url (without one there is no origin)")
    to_stdout = output == "-"
    if byte_range is not None:
        byte_range = _cfg(check_range, byte_range)
    out = Path("-") if to_stdout else _cfg(C.default_output, url or "", output)
    cfg = C.DownloadConfig(
        url=_cfg(C.check_url, url) if url is not None else "", output=out, create_dirs=create_dirs,
        to_stdout=to_stdout, byte_range=byte_range,
        home=Path(home).expanduser().absolute(), nodes=_cfg(C.parse_nodes, node),
        md5=_cfg(C.check_md5, md5), identifier=digest or identifier, digest=digest,
        headers=_cfg(C.parse_headers, headers),
        filter_keys=C.parse_filter(filter_), locallimit=_cfg(C.parse_rate, locallimit, "--locallimit"),
        totallimit=_cfg(C.parse_rate, totallimit, "--totallimit"),
        minrate=_cfg(C.parse_rate, minrate, "--minrate") or 1,
        timeout=_cfg(C.parse_duration, timeout, "--timeout") if timeout else None,
        pattern=pattern, notbs=notbs or url is None, showbar=sys.stderr.isatty() if showbar is None else showbar,
        verbose=verbose, json=as_json, ip=ip, port=port, pull_limit=pull_limit,
        stall_timeout=_cfg(C.parse_duration, stall_timeout, "--stall-timeout"),
        alivetime=_cfg(C.parse_duration, alivetime, "--alivetime"),
        expiretime=_cfg(C.parse_duration, expiretime, "--expiretime"), serve=not no_serve,
        log_level=log_level, log_json=log_json, tls=client_tls, server_tls=server_tls)
    exit_now(run(cfg))


def exit_now(code: int) -> NoReturn:
    """End the process once the work is done, without the interpreter's teardown (freeing
    every module, object and the thread pool's bookkeeping one by one). Everything dfget
    promised is already done by then: the file is fsynced and renamed, asyncio.run has
    joined the worker threads, and the peer server, if this command started one, is a
    process of its own. What is still buffered on stdout/stderr is flushed first; if that
    fails (a reader that left), the ordinary exit reports it as before."""
    try:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001 - let the ordinary exit deal with it
        sys.exit(code)
    os._exit(code)


def run(cfg: C.DownloadConfig) -> int:
    logs.setup(cfg.log_level or ("info" if cfg.verbose else "error"), as_json=cfg.log_json,
               text_format="dfget: %(name)s: %(message)s")
    notices.configure(as_json=cfg.log_json)
    stats = Stats(url=cfg.url, output="-" if cfg.to_stdout else str(cfg.output))
    code = EXIT_OK
    try:
        asyncio.run(_main(cfg, stats))
    except StreamClosed as exc:  # the reader of stdout left (| head): quiet, code 141
        code = exc.exit_code
        if cfg.verbose:
            click.echo(f"dfget: {exc.message}", err=True)
    except DfError as exc:
        code = exc.exit_code
        click.echo(f"dfget: error: {exc.message}", err=True)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        click.echo("dfget: interrupted", err=True)
    except Exception as exc:  # noqa: BLE001 - last resort: one line, detail with --verbose
        code = EXIT_GENERIC
        click.echo(f"dfget: unexpected error: {type(exc).__name__}: {exc}", err=True)
        if cfg.verbose:
            traceback.print_exc()
    if cfg.json:
        report = stats.report()
        if cfg.digest:
            report["digest"] = cfg.digest
        report["exit_code"] = code
        if cfg.byte_range is not None:
            report["range"] = cfg.byte_range
        # with -o - stdout carries the file and nothing else: the report goes to stderr
        click.echo(json.dumps(report), err=cfg.to_stdout)
    return code


async def _main(cfg: C.DownloadConfig, stats: Stats) -> None:
    caps = [r for r in (cfg.locallimit, cfg.totallimit) if r > 0]
    bar = ProgressBar(stats, limit=min(caps, default=0)) if cfg.showbar else None
    if bar is not None:
        bar.start()
    try:
        async with asyncio.timeout(cfg.timeout):
            if cfg.to_stdout or cfg.byte_range is not None:
                await stream.main(cfg, stats)
            else:
                await download(cfg, stats)
    except TimeoutError:
        raise DownloadTimeout(f"download did not finish within {cfg.timeout:g} s") from None
    finally:
        if bar is not None:
            await bar.stop()


@click.command("server", context_settings={"help_option_names": ["-h", "--help"]},
               epilog="Stop a running one with: dfget server stop --home DIR")
@click.option("--home", default="~/.dfget", show_default=True, help="Working directory; dfget with the same --home uses this server.")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Address to listen on and advertise.")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="0 = any free port.")
@click.option("--totallimit", default="0", help="Upload rate shared by all uploads; 0 = none.")
@click.option("--alivetime", default="5m", show_default=True, help="Exit after this long idle.")
@click.option("--expiretime", default="3m", show_default=True, help="Stop serving a file unread this long.")
@click.option("--max-uploads", default=5, type=click.IntRange(1, 1024), show_default=True,
              help="Concurrent uploads; the next request gets 503.")
@click.option("--upload-timeout", default="60s", show_default=True, help="An upload slower than this is cut off.")
@click.option("--scan-interval", default="15s", show_default=True, help="How often files are checked for expiry and changes.")
@click.option("--log-level", type=click.Choice(LEVELS), default="info", show_default=True,
              help="debug logs every piece served.")
@click.option("--log-json", is_flag=True, help="Log one JSON object per line.")
@click.option("--listen-fd", default=-1, type=int, hidden=True,
              help="Peer socket already bound and listening (set by the dfget that starts us).")
@click.option("--peer-id", default=None, hidden=True, help="Peer id chosen by the dfget that starts us.")
@tls_options
def server_cmd(home: str, ip: str, port: int, totallimit: str, alivetime: str, expiretime: str,
               max_uploads: int, upload_timeout: str, scan_interval: str, log_level: str,
               log_json: bool, listen_fd: int, peer_id: str | None, cacert: str | None, cert: str | None,
               key: str | None, client_ca: str | None) -> None:
    """Run this host's peer server (normally started by dfget itself)."""
    from .server.lifecycle import ListenError, run_server
    from .server.state import ServerConfig

    if peer_id is not None and not (len(peer_id) == 32 and all(c in "0123456789abcdef" for c in peer_id)):
        raise click.UsageError("--peer-id must be 32 lower-case hex digits")
    client_tls, server_tls = _cfg(parse_tls, cacert, cert, key, client_ca)

    cfg = ServerConfig(
        home=Path(home).expanduser().absolute(), ip=ip, port=port,
        totallimit=_cfg(C.parse_rate, totallimit, "--totallimit"),
        alivetime=_cfg(C.parse_duration, alivetime, "--alivetime"),
        expiretime=_cfg(C.parse_duration, expiretime, "--expiretime"), max_uploads=max_uploads,
        upload_timeout=_cfg(C.parse_duration, upload_timeout, "--upload-timeout"),
        scan_interval=_cfg(C.parse_duration, scan_interval, "--scan-interval"),
        log_level=log_level, log_json=log_json, listen_fd=listen_fd, peer_id=peer_id,
        tls=server_tls, client_tls=client_tls)
    try:
        code = run_server(cfg)
    except ListenError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


@click.command("stop", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--home", default="~/.dfget", show_default=True, help="The home whose peer server to stop.")
def server_stop_cmd(home: str) -> None:
    """Stop the peer server of this home (the one dfget started, or `dfget server`)."""
    from .server.launcher import PeerServerError, stop_server

    path = Path(home).expanduser().absolute()
    try:
        pid = asyncio.run(stop_server(path))
    except PeerServerError as exc:
        click.echo(f"dfget: error: {exc}", err=True)
        sys.exit(EXIT_GENERIC)
    if pid is None:
        click.echo(f"dfget: no peer server runs for {path}", err=True)
    else:
        click.echo(f"dfget: stopped the peer server of {path} (pid {pid})", err=True)
    sys.exit(EXIT_OK)


@click.command("import", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("file", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--digest", default=None, metavar="sha256:HEX",
              help="The file must hash to this (else nothing is imported, exit 5).")
@click.option("-n", "--node", default="127.0.0.1:8002", help="Supernodes: host[:port][=weight],...")
@click.option("--home", default="~/.dfget", show_default=True, help="Home of the peer server that seeds the file.")
@click.option("--ip", default=None, help="IP of this host's peer server (default: towards the supernode).")
@click.option("--port", default=0, type=click.IntRange(0, 65535), help="Port of the peer server (0 = any).")
@click.option("-e", "--timeout", default="10m", show_default=True,
              help="How long to wait for the supernode to check the file.")
@click.option("--expiretime", default="3m", show_default=True, help="Peer server: stop serving a file unread this long.")
@click.option("--alivetime", default="5m", show_default=True, help="Peer server: exit after this long idle.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (digest, task_id, length, pieces, ...).")
@click.option("--verbose", is_flag=True, help="Log details to stderr.")
@click.option("--upload", is_flag=True,
              help="Also upload FILE into the supernode's CDN cache first, resumably (as `dfget upload`): "
                   "the swarm then keeps it without this host. Re-run the same command to resume.")
@click.option("--chunk-size", default="8MiB", show_default=True, help="With --upload: bytes per chunk (4KiB..64MiB).")
@click.option("-s", "--locallimit", default="0", show_default=True, help="With --upload: its rate limit (e.g. 20MB); 0 = none.")
@click.option("--admin-token", default="", envvar="DFGET_ADMIN_TOKEN", show_envvar=True,
              help="With --upload: the supernode's admin token, when it has one.")
@tls_options
def import_cmd(file: Path, digest: str | None, node: str, home: str, ip: str | None, port: int, timeout: str,
               expiretime: str, alivetime: str, as_json: bool, verbose: bool, upload: bool, chunk_size: str,
               locallimit: str, admin_token: str, cacert: str | None, cert: str | None, key: str | None,
               client_ca: str | None) -> None:
    """Put FILE into the swarm with no origin: this host's peer server seeds it, the
    supernode checks it, and other hosts get it with `dfget --digest sha256:<hex> -o OUT`."""
    from .importer import ImportConfig, run_import

    client_tls, server_tls = _cfg(parse_tls, cacert, cert, key, client_ca)
    chunk = limit = 0
    if upload:
        from .upload import check_chunk

        chunk, limit = _cfg(check_chunk, chunk_size), _cfg(C.parse_rate, locallimit, "--locallimit")
    cfg = ImportConfig(
        path=file.expanduser().absolute(), home=Path(home).expanduser().absolute(),
        nodes=_cfg(C.parse_nodes, node), digest=_cfg(C.check_digest, digest, None, None), ip=ip, port=port,
        timeout=_cfg(C.parse_duration, timeout, "--timeout"),
        alivetime=_cfg(C.parse_duration, alivetime, "--alivetime"),
        expiretime=_cfg(C.parse_duration, expiretime, "--expiretime"), tls=client_tls, server_tls=server_tls)
    logs.setup("info" if verbose else "error", as_json=False, text_format="dfget: %(name)s: %(message)s")
    notices.configure(as_json=False)
    code, report, uploaded = EXIT_OK, None, None
    try:
        if upload:  # first, so that the supernode's check finds the verified copy in its cache
            uploaded = asyncio.run(_upload_for_import(cfg, chunk, limit, admin_token.strip(), client_tls))
        report = asyncio.run(run_import(cfg))
    except DfError as exc:
        code = exc.exit_code
        click.echo(f"dfget: error: {exc.message}", err=True)
    except KeyboardInterrupt:
        code = EXIT_INTERRUPTED
        click.echo("dfget: interrupted", err=True)
    if report is not None and not as_json:
        click.echo(f"dfget: imported {report['path']} as {report['digest']} ({report['length']} bytes, "
                   f"{report['pieces']} pieces); get it elsewhere with: dfget --digest {report['digest']} -o OUT",
                   err=True)
    if as_json:
        click.echo(json.dumps({**(report or {}), **({"upload": uploaded} if uploaded else {}), "exit_code": code}))
    sys.exit(code)


async def _upload_for_import(cfg: object, chunk: int, limit: int, admin_token: str, tls: ClientTls) -> dict[str, object]:
    """`dfget import --upload`: the resumable upload of dfget/upload.py, for the digest
    given or computed here (the import hashes the file again: it needs the pieces)."""
    import dataclasses

    from .importer import hash_file
    from .upload import UploadConfig, upload_file

    path, digest = cfg.path, cfg.digest  # type: ignore[attr-defined]
    if digest is None:
        try:
            digest = (await asyncio.to_thread(hash_file, path)).digest
        except OSError as exc:
            raise LocalDiskError(f"cannot read {path}: {exc.strerror or exc}") from None
    ucfg = UploadConfig(file=path, digest=digest, home=cfg.home, nodes=cfg.nodes,  # type: ignore[attr-defined]
                        chunk_size=chunk, limit=limit, admin_token=admin_token, tls=tls)
    rep = await upload_file(ucfg)
    keep = ("state", "bytes_sent", "resumed_from", "supernode", "session")
    return {k: v for k, v in dataclasses.asdict(rep).items() if k in keep}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "version":
        click.echo(f"dfget {__version__}")
        sys.exit(EXIT_OK)
    if args[:2] == ["server", "stop"]:
        server_stop_cmd.main(args[2:], prog_name="dfget server stop")
    elif args and args[0] == "import":
        import_cmd.main(args[1:], prog_name="dfget import")
    elif args and args[0] == "server":
        server_cmd.main(args[1:], prog_name="dfget server")
    elif args and args[0] == "upload":
        from .upload import upload_cmd

        upload_cmd.main(args[1:], prog_name="dfget upload")
    else:
        download_cmd.main(args, prog_name="dfget")
