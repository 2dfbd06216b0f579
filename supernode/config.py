"""The supernode's settings: one frozen dataclass, validated once at start-up.

Filled 1:1 from the CLI options (supernode/cli.py), which also read `SUPERNODE_*`
environment variables and an optional YAML `--config` file (CLI > env > file > default).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from common import digest
from common.netpolicy import AddressPolicy
from common.tls import ClientTls, ServerTls, TlsConfigError, check_pair


def detect_ip() -> str:
    """The address other hosts reach us on: the source address of a default route
    (no packet is sent for a UDP connect). Falls back to loopback."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET-1: never routed, nothing is sent
        return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"
    finally:
        s.close()


@dataclass(frozen=True)
class Settings:
    port: int = 8002
    download_port: int = 8001
    listen: str = "0.0.0.0"
    advertise_ip: str = ""
    home: Path = field(default_factory=lambda: Path.home() / ".supernode")
    redis_url: str | None = None
    allow_origin: tuple[str, ...] = ()
    deny_origin: tuple[str, ...] = ()
    max_bandwidth: int = 200 << 20  # origin fetch cap, bytes/s (0 = none)
    upload_limit: int = 0  # seed upload cap, bytes/s (0 = none)
    up_limit: int = 5  # concurrent uploads per peer
    down_limit: int = 4  # pieces in flight per client
    cdn_limit: int = 16  # concurrent CDN uploads per task per supernode
    cdn_copies: int = 1  # super-seeding: CDN sends a piece while fewer copies exist
    seed_slots: int = 64  # concurrent uploads of the seed, all tasks
    fail_access_interval: float = 180.0
    task_expire_time: float = 180.0
    peer_gc_delay: float = 180.0
    gc_initial_delay: float = 6.0
    gc_meta_interval: float = 120.0
    disk_gc_threshold: int = 5 << 30  # below this free space, evict unused cached files
    blob_ttl: float = 180.0  # a cached blob nothing refers to any more is removed after this
    max_file_size: int = 64 << 30
    max_fetches: int = 16
    origin_parallel: int = 1  # Range requests one origin fetch may run at once (cdn/parallel.py)
    lease_ttl: float = 15.0  # CDN fetch lease: how long a dead fetcher blocks a takeover
    register_wait: float = 10.0
    origin_read_timeout: float = 30.0
    origin_retries: int = 3  # per origin request, and per fetch for a broken transfer
    origin_min_rate: int = 64 << 10
    pull_wait_max: float = 30.0
    header_timeout: float = 20.0  # a connection must deliver a request head within this
    body_timeout: float = 10.0  # a request body must arrive within this
    max_requests: int = 4096  # requests in progress at once; more get 503 busy
    register_rate: float = 100.0  # registrations per second per client address (0 = no limit)
    pull_rate: float = 200.0  # pulls per second per client id (0 = no limit)
    wake_batch: int = 8
    log_level: str = "info"
    log_json: bool = False
    shutdown_timeout: float = 10.0
    allow_peer: tuple[str, ...] = ()
    deny_peer: tuple[str, ...] = ()
    piece_auth: bool = True
    piece_digest: str = "blake3"  # of new tasks, when the registering client can check it
    piece_token_ttl: float = 300.0
    admin_token: str = field(default="", repr=False)
    # TLS (issue 14): both ports serve https with cert/key; client_ca makes them require a
    # client certificate (mutual TLS); cacert is trusted (besides the system CAs) when we
    # are the client: https origins, and peer servers a takeover copies pieces from
    cert: str | None = None
    key: str | None = None
    client_ca: str | None = None
    cacert: str | None = None
    require_peer_tls: bool = False  # refuse peers that serve plain HTTP
    # proof of possession (supernode/pop/): one challenge per interval (0: off), an answer
    # due within pop_timeout, a client dropped as a source of a task after max failures
    pop_interval: float = 60.0
    pop_timeout: float = 10.0
    pop_max_failures: int = 3
    # resumable uploads into the CDN cache (supernode/cdn/uploads.py)
    upload_ttl: float = 3600.0  # a session with no chunk this long expires, its space freed
    max_upload_sessions: int = 16  # upload sessions open at once
    max_upload_size: int = 64 << 30  # largest declared upload length

    def validate(self) -> Settings:
        for name in ("port", "download_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be 0..65535")
        for name in ("header_timeout", "body_timeout", "register_rate", "pull_rate"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must not be negative")
        for name in ("up_limit", "down_limit", "cdn_limit", "cdn_copies", "seed_slots", "max_fetches",
                     "max_requests", "max_upload_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        if not 1 <= self.origin_parallel <= 32:
            raise ValueError("--origin-parallel must be 1..32")
        if not 0 <= self.origin_retries <= 20:
            raise ValueError("--origin-retries must be 0..20")
        if self.redis_url:
            from .store.connection import check_url

            check_url(self.redis_url)  # a bad URL is a usage error, not a traceback at start
        if not 1.0 <= self.lease_ttl <= 3600.0:
            raise ValueError("--lease-ttl must be between 1s and 1h")
        self.origin_policy()  # raises on bad CIDRs
        self.peer_policy()
        if self.piece_digest not in digest.ALGORITHMS:
            raise ValueError(f"--piece-digest must be one of {', '.join(digest.ALGORITHMS)}")
        if not 10 <= self.piece_token_ttl <= 86400:
            raise ValueError("--piece-token-ttl must be between 10s and 24h")
        if self.admin_token and (len(self.admin_token) < 16 or self.admin_token != self.admin_token.strip()):
            raise ValueError("the admin token must be at least 16 characters, without surrounding spaces")
        self._check_pop()
        if not 1.0 <= self.upload_ttl <= 7 * 86400:
            raise ValueError("--upload-ttl must be between 1s and 7d")
        self._check_tls()
        return self

    def _check_pop(self) -> None:
        if not (self.pop_interval == 0 or 0.05 <= self.pop_interval <= 86400):
            raise ValueError("--pop-interval must be 0 (off) or between 50ms and 24h")
        if not 0.05 <= self.pop_timeout <= 600:
            raise ValueError("--pop-timeout must be between 50ms and 10m")
        if not 1 <= self.pop_max_failures <= 1000:
            raise ValueError("--pop-max-failures must be 1..1000")

    def _check_tls(self) -> None:
        """Each file is loaded once now: a bad one is a usage error, not a failure later."""
        try:
            check_pair(self.cert, self.key)
            if self.client_ca and not self.cert:
                raise TlsConfigError("--client-ca needs --cert/--key (client certificates are asked for in "
                                     "the TLS handshake)")
            server = self.server_tls()
            if server is not None:
                server.context()
            self.client_tls().context()
        except TlsConfigError as exc:
            raise ValueError(str(exc)) from None

    def server_tls(self) -> ServerTls | None:
        return ServerTls(self.cert, self.key, self.client_ca) if self.cert and self.key else None

    def client_tls(self) -> ClientTls:
        """What we trust as a client; our server certificate doubles as our client one
        (for peer servers that require one)."""
        return ClientTls(self.cacert, self.cert, self.key)

    def origin_policy(self) -> AddressPolicy:
        return AddressPolicy.build(self.allow_origin, self.deny_origin)

    def peer_policy(self) -> AddressPolicy:
        """Which peer addresses a registration may announce (same defaults as origins)."""
        return AddressPolicy.build(self.allow_peer, self.deny_peer)

    def public_ip(self) -> str:
        return self.advertise_ip or detect_ip()
