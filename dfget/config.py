"""Settings of one dfget run, parsed and validated once from the command line.

Everything downstream takes a frozen `DownloadConfig`; nothing re-reads flags.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

from common import units
from common.errors import Error
from common.hostport import hostport
from common.tls import ClientTls, ServerTls

DEFAULT_NODE_PORT = 8002
DEFAULT_PULL_LIMIT = 4
_NODE_RE = re.compile(r"^\[?([^\]=]+?)\]?(?::(\d{1,5}))?(?:=(\d{1,6}))?$")
_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
_HEADER_NAME_RE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(Error, ValueError):
    """A flag value that cannot be used (exit code 2)."""


@dataclass(frozen=True)
class Node:
    host: str
    port: int
    weight: int = 1
    # "https" or "http" as written in --node; "" when not written (dfget.supernodes
    # decides: https with --cacert, else http, upgraded to https if the port speaks TLS)
    scheme: str = ""

    @property
    def tls(self) -> bool:
        return self.scheme == "https"

    @property
    def base_url(self) -> str:
        return f"{self.scheme or 'http'}://{hostport(self.host, self.port)}"


@dataclass(frozen=True)
class DownloadConfig:
    url: str
    output: Path
    home: Path
    create_dirs: bool = False  # --create-dirs: make the output's missing directories
    nodes: tuple[Node, ...] = (Node("127.0.0.1", DEFAULT_NODE_PORT),)
    md5: str | None = None
    identifier: str | None = None
    # --digest sha256:<hex>: the task is the digest (identifier = digest), the whole file is
    # checked against it before the rename; with url "" the swarm must know the digest
    digest: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    filter_keys: tuple[str, ...] = ()
    locallimit: int = 0  # bytes/s; 0 = no cap (v1's 20 MB/s default throttled every fast link)
    totallimit: int = 0
    minrate: int = 64 * 1024
    timeout: float | None = None
    pattern: str = "p2p"
    notbs: bool = False
    showbar: bool = False
    verbose: bool = False
    log_level: str | None = None  # None: info with --verbose, else error
    log_json: bool = False
    json: bool = False
    ip: str | None = None
    port: int = 0
    pull_limit: int = DEFAULT_PULL_LIMIT
    # P2P with no verified piece for this long counts as failed (then back to source).
    stall_timeout: float = 120.0
    alivetime: float = 300.0
    expiretime: float = 180.0
    # Peer server is optional: tests and `--pattern source` may run without one.
    serve: bool = True
    # --cacert (trusted besides the system CAs) and --cert/--key (our client certificate)
    tls: ClientTls = field(default_factory=ClientTls)
    # the peer server we start serves pieces over TLS with these (--cert/--key/--client-ca)
    server_tls: ServerTls | None = None
    # -o -: the file goes to stdout as it is verified (dfget/stream.py)
    to_stdout: bool = False
    # --range bytes=A-B: only those bytes, through the swarm (dfget/stream.py)
    byte_range: str | None = None


def parse_nodes(text: str) -> tuple[Node, ...]:
    """`[http://|https://]host[:port][=weight],...` ordered by weight (highest first),
    then as given."""
    nodes: list[tuple[int, int, Node]] = []
    for i, item in enumerate(p.strip() for p in text.split(",")):
        if not item:
            continue
        scheme, sep, rest = item.partition("://")
        if not sep:
            scheme, rest = "", item
        elif scheme.lower() not in ("http", "https"):
            raise ConfigError(f"bad --node entry {item!r} (the scheme may be http:// or https://)")
        m = _NODE_RE.match(rest.rstrip("/"))
        if not m:
            raise ConfigError(f"bad --node entry {item!r} (use [https://]host[:port][=weight])")
        host, port_s, weight_s = m.groups()
        port = int(port_s) if port_s else DEFAULT_NODE_PORT
        weight = int(weight_s) if weight_s else 1
        if not 1 <= port <= 65535:
            raise ConfigError(f"bad port in --node entry {item!r}")
        nodes.append((-weight, i, Node(host, port, weight, scheme.lower())))
    if not nodes:
        raise ConfigError("--node is empty")
    return tuple(n for _, _, n in sorted(nodes, key=lambda t: (t[0], t[1])))


def parse_headers(values: tuple[str, ...] | list[str]) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw in values:
        name, sep, value = raw.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not _HEADER_NAME_RE.match(name) or any(c in value for c in "\r\n\x00"):
            raise ConfigError(f"bad --header {raw!r} (use 'Name: value')")
        headers[name] = value
    return headers


def parse_filter(text: str | None) -> tuple[str, ...]:
    return tuple(k for k in (text or "").split("&") if k)


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--url must be an http or https URL, got {url[:100]!r}")
    return url


def check_md5(md5: str | None) -> str | None:
    if md5 is not None and not _MD5_RE.match(md5):
        raise ConfigError("--md5 must be 32 hex digits")
    return md5.lower() if md5 else None


def default_output(url: str, output: str | None) -> Path:
    """`-o` as given; a directory gets the URL's last segment; nothing means the cwd."""
    name = unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    if output:
        path = Path(output).expanduser()
        if path.is_dir():
            if not name or name in (".", ".."):
                raise ConfigError("cannot name the output from the URL; give -o FILE")
            return (path / name).absolute()
        return path.absolute()
    if not name or name in (".", "..") or "/" in name:
        raise ConfigError("cannot name the output from the URL; give -o FILE")
    return (Path.cwd() / name).absolute()


def check_digest(digest: str | None, identifier: str | None, md5: str | None) -> str | None:
    """--digest sha256:<64 lower-case hex>: refused up front (a usage error) when it is
    malformed or fights -i/--md5 (the task's identity must be the digest alone)."""
    if digest is None:
        return None
    from common import content

    try:
        content.parse(digest)
    except content.BadDigest as exc:
        raise ConfigError(f"--digest: {exc}") from None
    if identifier is not None and identifier != digest:
        raise ConfigError("--digest and -i/--identifier name the task twice; give only --digest")
    if md5 is not None:
        raise ConfigError("--digest and --md5 cannot be combined (the digest already checks the bytes)")
    return digest


def parse_rate(text: str, flag: str) -> int:
    try:
        return units.parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def parse_duration(text: str, flag: str) -> float:
    try:
        return units.parse_duration(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


def local_ip_towards(node: Node) -> str:
    """The address of the interface that routes to the first supernode: what other peers
    can most likely reach (v1's users hit "P2P is not happening" with a wrong IP)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(node.host, node.port, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # UDP: no packet is sent, the kernel only picks the route
            return str(s.getsockname()[0])
    except OSError:  # socket.gaierror included
        return "::1" if ":" in node.host else "127.0.0.1"
