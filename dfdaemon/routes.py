"""Pure decisions of dfdaemon: which requests are registry blobs (through the swarm), which
are passed through, digest parsing and the proxy's URL rules. No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

# The distribution spec's repository name grammar: path components of lower-case
# alphanumerics joined by one separator ('.', '_', '__' or dashes), slash separated.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_NAME = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_SHA256 = re.compile(r"^sha256:([0-9a-f]{64})\Z")
MAX_NAME_LEN = 255
# Dragonfly v1's default: the GETs a registry answers with content-addressed bytes.
DEFAULT_P2P_RULE = r"^.+/blobs/sha256:[0-9a-f]{64}$"

RouteKind = Literal["blob", "registry", "metrics", "ping", "proxy", "not_found"]


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    name: str = ""
    digest: str = ""  # "sha256:<hex>" for blobs

    @property
    def hex(self) -> str:
        return self.digest.split(":", 1)[1] if self.digest else ""


def parse_digest(text: str) -> str | None:
    """The hex of a `sha256:<64 lower-case hex>` digest, else None (other algorithms and
    malformed digests are the registry's business, not the swarm's)."""
    m = _SHA256.match(text)
    return m.group(1) if m else None


def valid_name(name: str) -> bool:
    return 0 < len(name) <= MAX_NAME_LEN and bool(_NAME.match(name))


def classify(method: str, path: str, absolute: bool = False) -> Route:
    """Route of a request on the mirror's port. `path` is the decoded path; `absolute` is
    true for an absolute-form request line (the client uses us as its HTTP proxy)."""
    if absolute or method == "CONNECT":
        return Route("proxy")
    if path == "/metrics" and method in ("GET", "HEAD"):
        return Route("metrics")
    if path == "/_ping" and method in ("GET", "HEAD"):
        return Route("ping")
    if path != "/v2" and not path.startswith("/v2/"):
        return Route("not_found")
    if method == "GET":
        head, sep, tail = path[len("/v2/"):].rpartition("/blobs/")
        if sep and valid_name(head) and parse_digest(tail) is not None:
            return Route("blob", name=head, digest=tail)
    return Route("registry")


@dataclass(frozen=True)
class Rule:
    pattern: re.Pattern[str]
    p2p: bool  # True: through the swarm; False: direct


def parse_rules(specs: list[str] | tuple[str, ...]) -> tuple[Rule, ...]:
    """`--rule REGEX` (through the swarm) or `--rule 'direct:REGEX'`; the first rule whose
    regular expression matches the URL (re.search) decides. Raises ValueError."""
    rules: list[Rule] = []
    for spec in specs:
        p2p = True
        for prefix, val in (("p2p:", True), ("direct:", False)):
            if spec.startswith(prefix):
                spec, p2p = spec[len(prefix):], val
                break
        try:
            rules.append(Rule(re.compile(spec), p2p))
        except re.error as exc:
            raise ValueError(f"bad rule {spec!r}: {exc}") from None
    return tuple(rules)


def proxy_decision(method: str, url: str, rules: tuple[Rule, ...]) -> Literal["p2p", "direct", "tunnel", "refuse"]:
    """What the proxy does with one request: CONNECT is tunnelled untouched, a GET of an
    http(s) URL that a p2p rule matches goes through the swarm, everything else is
    forwarded as is. Non-http(s) absolute URLs are refused."""
    if method == "CONNECT":
        return "tunnel"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "refuse"
    if method != "GET":
        return "direct"
    for rule in rules:
        if rule.pattern.search(url):
            return "p2p" if rule.p2p else "direct"
    return "direct"


CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def origin_of(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the default port filled in: what 'same origin' compares."""
    p = urlsplit(url)
    try:
        port = p.port
    except ValueError:
        port = None
    scheme = p.scheme.lower()
    return scheme, (p.hostname or "").lower(), port or {"http": 80, "https": 443}.get(scheme)


# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own and never forwarded.
HOP_BY_HOP = frozenset(h.lower() for h in (
    "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "Proxy-Connection",
    "TE", "Trailer", "Transfer-Encoding", "Upgrade"))


def forward_headers(headers: list[tuple[str, str]], drop: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Headers to pass on: without hop-by-hop ones, those the Connection header names, and
    `drop` (case-insensitive)."""
    named = {t.strip().lower() for k, v in headers if k.lower() == "connection" for t in v.split(",")}
    gone = HOP_BY_HOP | named | {d.lower() for d in drop}
    return [(k, v) for k, v in headers if k.lower() not in gone]
