"""Task ids, URL filtering and id validation.

A task id names one file version cluster-wide: sha256 over a salted, canonical
description (filtered URL without credentials, md5 or identifier, optional Range).
Signed URLs whose signature keys are listed in `--filter` therefore map to one task.

A content-addressed identifier (`sha256:<64 hex>`, an OCI/registry blob digest) names
the bytes themselves: its task id comes from the identifier alone, so the same blob from
two repositories, tags or registries is one task. Whoever fetches it must check the
bytes against the digest (the supernode's CDN does, and so does dfdaemon).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SALT = b"dragonfly-py/task/v1\x00"
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
_CONTENT_ID = re.compile(r"^sha256:[0-9a-f]{64}\Z")
MAX_URL_LEN = 8192


def filter_url(url: str, filter_keys: list[str] | tuple[str, ...] = ()) -> str:
    """Canonical task URL: scheme/host lower-cased, credentials and fragment dropped,
    the query keys in `filter_keys` removed (order of the rest kept)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6 literal
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    drop = set(filter_keys)
    query = parts.query
    if drop and query:
        kept = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in drop]
        query = urlencode(kept)
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", query, ""))


def task_id(
    url: str,
    *,
    filter_keys: list[str] | tuple[str, ...] = (),
    md5: str | None = None,
    identifier: str | None = None,
    range_header: str | None = None,
) -> str:
    if identifier and not md5 and not range_header and is_content_identifier(identifier):
        return hashlib.sha256(_SALT + b"content\x00" + identifier.encode() + _SALT).hexdigest()
    h = hashlib.sha256(_SALT)
    h.update(filter_url(url, filter_keys).encode())
    h.update(b"\x00")
    h.update((md5 or identifier or "").encode())
    if range_header:
        h.update(b"\x00range=")
        h.update(range_header.encode())
    h.update(_SALT)
    return h.hexdigest()


def is_content_identifier(identifier: str | None) -> bool:
    """`sha256:<64 lower-case hex>`: an identifier that is the digest of the bytes."""
    return bool(identifier) and bool(_CONTENT_ID.match(identifier or ""))


def task_key(url: str, filter_keys: list[str] | tuple[str, ...] = (), identifier: str | None = None,
             md5: str | None = None, range_header: str | None = None) -> str:
    """What a registration must agree on with the task already registered under its id:
    the filtered URL, or for a content-addressed identifier the identifier (any URL
    serving those bytes is the same task)."""
    if identifier and not md5 and not range_header and is_content_identifier(identifier):
        return identifier
    return filter_url(url, filter_keys)


def redact_url(url: str) -> str:
    """The URL with any `user:pass@` removed: safe for logs and listings."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


# Request headers that carry credentials: kept out of Redis, logs and listings.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})


def split_credentials(headers: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(headers safe to store, credential headers to keep in memory only)."""
    plain = {k: v for k, v in headers.items() if k.lower() not in CREDENTIAL_HEADERS}
    secret = {k: v for k, v in headers.items() if k.lower() in CREDENTIAL_HEADERS}
    return plain, secret


def new_id() -> str:
    """A fresh 32-hex id (client ids, peer ids, supernode ids)."""
    return secrets.token_hex(16)


def is_task_id(value: str) -> bool:
    return bool(_HEX64.match(value))


def is_short_id(value: str) -> bool:
    return bool(_HEX32.match(value))
