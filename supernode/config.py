"""The supernode's settings: one frozen dataclass, validated once at start-up.

Filled 1:1 from the CLI options (supernode/cli.py), which also read `SUPERNODE_*`
environment variables and an optional YAML `--config` file (CLI > env > file > default).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path

from common.netpolicy import AddressPolicy


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
    cdn_limit: int = 8  # concurrent CDN uploads per task per supernode
    seed_slots: int = 64  # concurrent uploads of the seed, all tasks
    fail_access_interval: float = 180.0
    task_expire_time: float = 180.0
    peer_gc_delay: float = 180.0
    gc_initial_delay: float = 6.0
    gc_meta_interval: float = 120.0
    disk_gc_threshold: int = 5 << 30  # below this free space, evict unused cached files
    max_file_size: int = 64 << 30
    max_fetches: int = 16
    register_wait: float = 10.0
    origin_read_timeout: float = 30.0
    origin_min_rate: int = 64 << 10
    pull_wait_max: float = 30.0
    wake_batch: int = 8
    log_level: str = "info"
    log_json: bool = False
    shutdown_timeout: float = 10.0

    def validate(self) -> Settings:
        for name in ("port", "download_port"):
            v = getattr(self, name)
            if not 0 <= v <= 65535:
                raise ValueError(f"--{name.replace('_', '-')} must be 0..65535")
        for name in ("up_limit", "down_limit", "cdn_limit", "seed_slots", "max_fetches"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
        self.origin_policy()  # raises on bad CIDRs
        return self

    def origin_policy(self) -> AddressPolicy:
        return AddressPolicy.build(self.allow_origin, self.deny_origin)

    def public_ip(self) -> str:
        return self.advertise_ip or detect_ip()
