"""One line of text for a network error, for people. aiohttp's own text names its TLS
setting even for plain http:// ("Cannot connect to host h:p ssl:default [Connect call
failed ...]"), which sent users hunting for a TLS problem that was a refused port."""

from __future__ import annotations

import re
import sys

from .httpclient import HttpError, os_reason

_SSL_NOISE = re.compile(r"\s+ssl:(?:default|None|False|True|<[^>]*>)")


def describe(exc: BaseException) -> str:
    if isinstance(exc, HttpError):
        return str(exc)  # dfget's own client: already one line for people
    aiohttp = sys.modules.get("aiohttp")  # only loaded when the origin is asked (not imported for this)
    if aiohttp is not None:
        if isinstance(exc, (aiohttp.ClientSSLError, aiohttp.ClientConnectorCertificateError)):
            return f"TLS error: {exc}"  # here the TLS detail is the point
        if isinstance(exc, aiohttp.ClientConnectorError):
            where = f"{exc.host}:{exc.port}" if exc.port else exc.host
            return f"cannot connect to {where}: {_os_reason(exc.os_error)}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = _SSL_NOISE.sub("", str(exc)).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _os_reason(err: OSError) -> str:
    return _SSL_NOISE.sub("", os_reason(err)) if not err.errno else os_reason(err)
