"""Task ids, URL filtering and id validation.

A task id names one file version cluster-wide: sha256 over a salted, canonical
description (filtered URL without credentials, md5 or identifier, optional Range).
Signed URLs whose signature keys are listed in `--filter` therefore map to one task.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

_SALT = b"dragonfly-py/task/v1\x00"
_HEX32 = re.compile(r"^[0-9a-f]{32}\Z")
_HEX64 = re.compile(r"^[0-9a-f]{64}\Z")
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
    h = hashlib.sha256(_SALT)
    h.update(filter_url(url, filter_keys).encode())
    h.update(b"\x00")
    h.update((md5 or identifier or "").encode())
    if range_header:
        h.update(b"\x00range=")
        h.update(range_header.encode())
    h.update(_SALT)
    return h.hexdigest()


def redact_url(url: str) -> str:
    """The URL with any `user:pass@` removed: safe for logs and listings."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def new_id() -> str:
    """A fresh 32-hex id (client ids, peer ids, supernode ids)."""
    return secrets.token_hex(16)


def is_task_id(value: str) -> bool:
    return bool(_HEX64.match(value))


def is_short_id(value: str) -> bool:
    return bool(_HEX32.match(value))
