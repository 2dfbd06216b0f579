"""One-line notices on stderr that a user sees whatever the log level: things dfget did
on its own that change where the bytes come from or what keeps running afterwards
(going back to the origin, starting a peer server). Plain text, or one JSON object per
line under --log-json, like the log lines around them."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any, TextIO

from common.logs import JsonFormatter

_json = False
_before: Callable[[], None] | None = None  # the progress bar blanking its line


def configure(*, as_json: bool) -> None:
    global _json
    _json = as_json


def set_before(fn: Callable[[], None] | None) -> None:
    global _before
    _before = fn


def notice(message: str, stream: TextIO | None = None, **fields: Any) -> None:
    out = stream or sys.stderr
    if _before is not None:
        _before()
    if _json:
        record = logging.LogRecord("dfget", logging.WARNING, __file__, 0, message, None, None)
        record.__dict__.update(fields)
        line = JsonFormatter().format(record)
    else:
        line = f"dfget: {message}"
    out.write(line + "\n")
    out.flush()
