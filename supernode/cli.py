"""`supernode` command line: options map 1:1 onto `Settings`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click
import yaml

from common import __version__, errors, logs
from common.units import parse_duration, parse_size

from .config import Settings

_SIZES = {"max_bandwidth", "upload_limit", "disk_gc_threshold", "max_file_size", "origin_min_rate",
          "max_upload_size"}
_DURATIONS = {"fail_access_interval", "task_expire_time", "peer_gc_delay", "gc_initial_delay",
              "gc_meta_interval", "register_wait", "origin_read_timeout", "shutdown_timeout", "lease_ttl",
              "piece_token_ttl", "header_timeout", "body_timeout", "pop_interval", "pop_timeout",
               "upload_ttl", "blob_ttl"}
_CIDRS = {"allow_origin", "deny_origin", "allow_peer", "deny_peer"}


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            data = yaml.safe_load(Path(value).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise click.BadParameter(f"cannot read config file: {exc}") from None
        if not isinstance(data, dict):
            raise click.BadParameter("config file must be a mapping of option names to values")
        ctx.default_map = {str(k).replace("-", "_"): v for k, v in data.items()}
    return value


OPTIONS: list[tuple[str, dict[str, Any]]] = [
    ("--port", dict(type=int, default=8002, show_default=True, help="API port.")),
    ("--download-port", dict(type=int, default=8001, show_default=True, help="Port serving CDN pieces to peers.")),
    ("--listen", dict(default="0.0.0.0", show_default=True, help="Address to bind both ports on; :: = every IPv4 and IPv6 address (dual stack).")),
    ("--advertise-ip", dict(default="", help="IP peers use to reach this supernode (default: detected).")),
    ("--home", dict(default=str(Path.home() / ".supernode"), show_default=True, help="Piece cache and state directory.")),
    ("--redis-url", dict(default=None, help="redis://, rediss://, redis+sentinel://, redis+cluster://; default: embedded in-process store.")),
    ("--allow-origin", dict(multiple=True, help="CIDR origins may resolve to even if denied by default (repeatable).")),
    ("--deny-origin", dict(multiple=True, help="Extra CIDR never dialled as an origin (repeatable).")),
    ("--max-bandwidth", dict(default="200MB", show_default=True, help="Origin fetch rate cap (0 = none).")),
    ("--upload-limit", dict(default="0", show_default=True, help="Seed upload rate cap (0 = none).")),
    ("--up-limit", dict(type=int, default=5, show_default=True, help="Concurrent uploads per peer.")),
    ("--down-limit", dict(type=int, default=4, show_default=True, help="Pieces in flight per client.")),
    ("--cdn-limit", dict(type=int, default=16, show_default=True, help="Concurrent CDN uploads per task.")),
    ("--cdn-copies", dict(type=int, default=1, show_default=True,
                          help="Super-seeding: the CDN sends a piece only while fewer than this many "
                               "peers hold or fetch it from the CDN (a client with nothing in flight "
                               "gets one more copy when no peer copy can reach it, or after 10 s).")),
    ("--seed-slots", dict(type=int, default=64, show_default=True, help="Concurrent CDN uploads in all.")),
    ("--fail-access-interval", dict(default="3m", show_default=True, help="How long a failed origin stays failed.")),
    ("--task-expire-time", dict(default="3m", show_default=True, help="Idle time after which a task is dropped.")),
    ("--peer-gc-delay", dict(default="3m", show_default=True, help="Silence after which a peer is dropped.")),
    ("--gc-initial-delay", dict(default="6s", show_default=True, help="Wait before the first garbage collection after start.")),
    ("--gc-meta-interval", dict(default="2m", show_default=True, help="Interval between garbage collections of tasks, peers and cached files.")),
    ("--disk-gc-threshold", dict(default="5GB", show_default=True, help="Evict unused cached files below this free space.")),
    ("--blob-ttl", dict(default="3m", show_default=True,
                        help="A cached file (blob, stored once per content) that no task refers to any "
                             "more is removed this long after its last reference went (sooner below "
                             "--disk-gc-threshold).")),
    ("--max-file-size", dict(default="64GB", show_default=True, help="Largest origin file accepted (also chunked).")),
    ("--max-fetches", dict(type=int, default=16, show_default=True, help="Concurrent origin fetches.")),
    ("--origin-parallel", dict(type=int, default=1, show_default=True,
                               help="Parallel Range requests per origin fetch (1..32) when the origin "
                                    "accepts ranges and names its version; the file's bytes are still "
                                    "fetched exactly once.")),
    ("--lease-ttl", dict(default="15s", show_default=True, help="CDN fetch lease: a dead supernode's fetch is taken over after it, its CDN copies re-seeded after twice it.")),
    ("--register-wait", dict(default="10s", show_default=True, help="How long a registration waits for the origin's answer.")),
    ("--origin-read-timeout", dict(default="30s", show_default=True, help="An origin silent this long mid-response fails the read.")),
    ("--origin-retries", dict(type=int, default=3, show_default=True,
                              help="Retries of a failed origin request, and of a broken origin transfer (resumed).")),
    ("--origin-min-rate", dict(default="64KB", show_default=True, help="Slowest acceptable origin rate per fetch; also sizes piece deadlines.")),
    ("--header-timeout", dict(default="20s", show_default=True, help="Close a connection that has not sent a whole request head in this time (slow clients).")),
    ("--body-timeout", dict(default="10s", show_default=True, help="Answer 408 to a request whose body has not arrived in this time.")),
    ("--max-requests", dict(type=int, default=4096, show_default=True, help="API requests in progress at once; more get 503 busy.")),
    ("--register-rate", dict(type=float, default=100.0, show_default=True, help="Registrations per second per client address, bursts of 10x (0 = no limit); more get 429.")),
    ("--pull-rate", dict(type=float, default=200.0, show_default=True, help="Pulls per second per client id, bursts of 2x (0 = no limit); more get 429.")),
    ("--log-level", dict(default="info", show_default=True, type=click.Choice(["debug", "info", "warning", "error"]), help="Lowest level logged.")),
    ("--log-json", dict(is_flag=True, default=False, help="Log one JSON object per line.")),
    ("--shutdown-timeout", dict(default="10s", show_default=True, help="On SIGTERM, how long to drain requests and uploads before exiting.")),
    ("--allow-peer", dict(multiple=True, help="CIDR a peer may announce even if denied by default, e.g. 127.0.0.0/8 for tests (repeatable).")),
    ("--deny-peer", dict(multiple=True, help="Extra CIDR never accepted as a peer address (repeatable).")),
    ("--piece-auth/--no-piece-auth", dict(default=True, show_default=True, help="Require signed piece tokens on the download port and peer servers (off: trusted networks only).")),
    ("--piece-digest", dict(default="blake3", show_default=True, type=click.Choice(["blake3", "sha256"]), help="Piece digest of new tasks (blake3 hashes ~4x faster than sha256 on one core). Tasks named by a sha256 content digest, and those first registered by a dfget that knows only sha256, use sha256; a task keeps its digest for life.")),
    ("--piece-token-ttl", dict(default="5m", show_default=True, help="Validity of a piece token.")),
    ("--admin-token", dict(default=None, help="Bearer token admin operations need (delete, preheat, peer listings, uploads); prefer the env var or --admin-token-file. Unset: admin operations are open.")),
    ("--admin-token-file", dict(default=None, type=click.Path(dir_okay=False), help="File holding the admin token.")),
    ("--cert", dict(default=None, type=click.Path(dir_okay=False), help="PEM certificate (chain) of this supernode: the API and download ports serve HTTPS (needs --key); also the client certificate shown to peer servers that require one.")),
    ("--key", dict(default=None, type=click.Path(dir_okay=False), help="PEM private key of --cert.")),
    ("--client-ca", dict(default=None, type=click.Path(dir_okay=False), help="PEM CA certificate(s): require clients of both ports to present a certificate signed by one (mutual TLS; needs --cert).")),
    ("--cacert", dict(default=None, type=click.Path(dir_okay=False), help="PEM CA certificate(s) trusted besides the system's when this supernode is the client: https origins and TLS peer servers.")),
    ("--upload-ttl", dict(default="1h", show_default=True, help="An upload session (POST /api/v1/uploads) with no chunk this long expires and its spool file is removed.")),
    ("--max-upload-sessions", dict(type=int, default=16, show_default=True, help="Upload sessions open at once; more get 503 too_many_uploads.")),
    ("--max-upload-size", dict(default="64GB", show_default=True, help="Largest length an upload session may declare (413 above).")),
    ("--require-peer-tls", dict(is_flag=True, default=False, help="Accept only peers that serve TLS (dfget --cert/--key): piece tokens never travel in clear; a dfget with a plain peer server downloads without serving.")),
    ("--pop-interval", dict(default="1m", show_default=True, help="Proof of possession: challenge one random peer about one random piece it claims this often, jittered ±50 % (0 = off).")),
    ("--pop-timeout", dict(default="10s", show_default=True, help="A possession challenge not answered within this fails (a whole-piece answer gets piece size / --origin-min-rate more).")),
    ("--pop-max-failures", dict(type=int, default=3, show_default=True, help="Failed possession challenges after which a client is dropped as a source of the task for everyone.")),
]


def build_settings(values: dict[str, Any]) -> Settings:
    kwargs: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(Settings)}
    values = dict(values)
    token_file = values.pop("admin_token_file", None)
    if token_file:
        if values.get("admin_token"):
            raise ValueError("give --admin-token or --admin-token-file, not both")
        try:
            values["admin_token"] = Path(token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read --admin-token-file: {exc}") from None
    for name, value in values.items():
        if name not in fields or value is None:
            continue
        if name in _SIZES:
            value = parse_size(str(value))
        elif name in _DURATIONS:
            value = parse_duration(str(value))
        elif name in _CIDRS:
            value = tuple(value) if not isinstance(value, str) else (value,)
        elif name == "home":
            value = Path(value).expanduser()
        kwargs[name] = value
    return Settings(**kwargs).validate()


def _command() -> click.Command:
    @click.command(context_settings={"auto_envvar_prefix": "SUPERNODE", "help_option_names": ["-h", "--help"]})
    @click.option("--config", type=click.Path(dir_okay=False), callback=_load_config, is_eager=True,
                  expose_value=False, help="YAML file of option values (keys as option names).")
    @click.version_option(__version__, prog_name="supernode", allow_from_autoenv=False)
    def cmd(**values: Any) -> None:
        """Run the supernode: tracker, scheduler and CDN seed."""
        try:
            settings = build_settings(values)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        from .app import run

        logs.setup(settings.log_level, as_json=settings.log_json,
                   text_format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        try:
            run(settings)
        except errors.StartupError as exc:  # a taken port, an unusable key file
            raise click.ClickException(exc.message) from None

    for flag, kw in OPTIONS:  # appended to the built command's params, so in order
        cmd = click.option(flag, **kw)(cmd)
    return cmd


main = _command()
